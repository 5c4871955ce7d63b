"""Whether a run can still learn, judged after every step and at its end: updates skipped for a non-finite loss or
gradient, steps whose every reward call failed, and steps with no learning signal. Too many non-finite or failed
steps in a row stop the run with one line naming the fix, and so does a run that ends before that with every step's
rewards failed; a vanished learning signal is warned about (it may come back), and named again in the run's last
line. Every input is already the same on every rank (reduced over ranks), so every rank decides alike and none is
left waiting."""

from __future__ import annotations

import logging

from rlad_ds.errors import TrainingError

logger = logging.getLogger("rlad_ds")


# Steps in a row in which every group's rewards were equal (no advantage anywhere, so nothing is learned) before
# the run is warned: one such step is common (8 samples of an easy or hard batch all right or all wrong), the
# demo's healthy runs have none, a collapsed policy (--lr far too high) has them from then on.
NO_SIGNAL_STEPS = 5


class RunHealth:
    def __init__(self, max_bad_steps: int, max_failed_reward_steps: int, rank: int = 0):
        self.max_bad_steps, self.max_failed_reward_steps, self.rank = max_bad_steps, max_failed_reward_steps, rank
        self.bad_steps = 0  # consecutive non-finite (skipped) updates; saved in checkpoints
        self.failed_reward_steps = 0
        self.steps_run = 0  # steps this process ran (a resumed run counts from its resumption)
        self.signal_steps = 0  # steps with some group's rewards unequal
        self.no_signal_steps = 0  # consecutive steps with every group's rewards equal
        self.signal_reward_sum = 0.0  # reward_mean summed over the steps with signal
        self.no_signal_reward = 0.0
        self.reward_error: str | None = None  # the first failed reward call of the last step, while they all fail

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
        self.reward_error = first_error if self.failed_reward_steps else None
        if self.max_failed_reward_steps and self.failed_reward_steps >= self.max_failed_reward_steps:
            raise TrainingError(
                f"every reward call failed in {self.failed_reward_steps} consecutive steps (raised "
                f"or timed out), so nothing can be learned; first error: {first_error}; fix the "
                f"task's verifier or raise --reward_timeout_s"
            )

    def check_signal(self, step: int, metrics: dict) -> None:
        """Warn, once per stretch, when every group's rewards have been equal (`zero_std_frac` 1) for
        NO_SIGNAL_STEPS steps: the advantages are all 0 and the loss teaches nothing. Methods without advantages
        (kd, sft) have no such signal; steps whose rewards all failed are `check_rewards`' to judge."""
        self.steps_run += 1
        if "zero_std_frac" not in metrics or metrics.get("reward_failed_frac", 0.0) >= 1.0:
            return
        if metrics["zero_std_frac"] < 1.0:
            self.signal_steps, self.no_signal_steps = self.signal_steps + 1, 0
            self.signal_reward_sum += metrics["reward_mean"]
            return
        self.no_signal_steps += 1
        self.no_signal_reward = metrics["reward_mean"]
        if self.no_signal_steps == NO_SIGNAL_STEPS and self.rank == 0:
            logger.warning("step %d: %s", step, self.no_signal_line())

    def no_signal_line(self) -> str:
        n, reward = self.no_signal_steps, self.no_signal_reward
        line = (
            f"no learning signal for {n} steps: every group's rewards were equal (zero_std_frac 1.0, reward_mean "
            f"{reward:.3f}), so every advantage is 0 and nothing is learned"
        )
        if not self.signal_steps:
            return f"{line}; the task is too hard or too easy for this student: check its rewards and data"
        before = self.signal_reward_sum / self.signal_steps
        if reward < before:
            return (
                f"{line}; the reward fell from {before:.3f} (mean of the {self.signal_steps} steps that had signal): "
                f"the policy collapsed, lower --lr"
            )
        return f"{line}; the reward rose from {before:.3f}: the prompts are solved alike, harder data teaches more"

    def end_of_run(self) -> TrainingError | None:
        """A run that ended with every one of its steps' reward calls failed, before --max_failed_reward_steps
        could stop it, learned nothing: the error its last line reports (exit 1)."""
        if self.max_failed_reward_steps and self.steps_run and self.failed_reward_steps >= self.steps_run:
            return TrainingError(
                f"every reward call failed in all {self.steps_run} steps of this run (raised or timed out), so "
                f"nothing was learned; first error: {self.reward_error}; fix the task's verifier or raise "
                f"--reward_timeout_s"
            )
        return None

    def warnings(self) -> list[str]:
        """What the run's last line must still say about its health."""
        return [self.no_signal_line()] if self.no_signal_steps >= NO_SIGNAL_STEPS else []
