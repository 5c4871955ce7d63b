"""Whether a run can still learn, judged after every step: updates skipped for a non-finite loss or gradient, and
steps whose every reward call failed. Too many in a row stop the run with one line naming the fix. Every input is
already the same on every rank (reduced over ranks), so every rank decides alike and none is left waiting."""

from __future__ import annotations

import logging

from rlad_ds.errors import TrainingError

logger = logging.getLogger("rlad_ds")


class RunHealth:
    def __init__(self, max_bad_steps: int, max_failed_reward_steps: int, rank: int = 0):
        self.max_bad_steps, self.max_failed_reward_steps, self.rank = max_bad_steps, max_failed_reward_steps, rank
        self.bad_steps = 0  # consecutive non-finite (skipped) updates; saved in checkpoints
        self.failed_reward_steps = 0

    def count_finite(self, step: int, metrics: dict) -> TrainingError | None:
        """Count a skipped (non-finite) update into `metrics["skipped_steps"]`; the error that ends the run once
        there were too many in a row (raised by the caller after the step is reported: its numbers are what the
        user debugs from)."""
        self.bad_steps = 0 if metrics["finite"] else self.bad_steps + 1
        metrics["skipped_steps"] = self.bad_steps
        if not metrics["finite"] and self.rank == 0:
            logger.warning(
                "step %d: non-finite loss or gradient norm; the update was skipped (%d in a row)", step, self.bad_steps
            )
        if self.bad_steps >= self.max_bad_steps:
            return TrainingError(
                f"{self.bad_steps} consecutive non-finite steps; lower --lr or check the data and "
                f"rewards (see metrics.jsonl)"
            )
        return None

    def check_rewards(self, metrics: dict, first_error: str | None) -> None:
        """A run whose every reward call fails (the verifier raises or hangs) gets no signal: stop it."""
        self.failed_reward_steps = self.failed_reward_steps + 1 if metrics["reward_failed_frac"] >= 1.0 else 0
        if self.max_failed_reward_steps and self.failed_reward_steps >= self.max_failed_reward_steps:
            raise TrainingError(
                f"every reward call failed in {self.failed_reward_steps} consecutive steps (raised "
                f"or timed out), so nothing can be learned; first error: {first_error}; fix the "
                f"task's verifier or raise --reward_timeout_s"
            )
