"""The hooks of `Trainer.fit`: metrics logging, checkpoint export, the demo's summary, the study and the
benchmarks are callbacks, so they all run the real loop."""

from __future__ import annotations


class Callback:
    """Hooks of `Trainer.fit`; override what you need. `trainer` gives access to everything (read-only)."""

    def on_batch(self, trainer, batch) -> None:
        """A step's batch is ready (rollouts, rewards, log-probs), before the update."""

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        """After optimizer step `step` (1-based); `metrics` includes `eval_accuracy` when it evaluated."""

    def on_evaluate(self, trainer, step: int, results: dict) -> None:
        """After a held-out evaluation at `step` (0: before training); `results` as `evaluate` returns."""

    def on_checkpoint(self, trainer, step: int, path) -> None:
        """After a complete checkpoint of `step` was written to `path`."""

    def on_train_end(self, trainer, history: dict) -> None:
        """After the last step; `history` holds `eval_before` and `eval_after` (accuracies or None; `eval_before` is
        None for a resumed run), `reward_mean` (the last step's) and `start_step` (0, or the step resumed from)."""
