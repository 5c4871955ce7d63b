"""Where metrics go: OUTPUT_DIR/metrics.jsonl (always), TensorBoard or wandb, and a rank-0 progress bar.

A `Trainer.fit` callback. Only rank 0 writes. On resume the JSONL keeps the lines up to the resumed step
and drops the rest, so a resumed run's file reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlad_ds.callbacks import Callback
from rlad_ds.evaluation import eval_metrics


class MetricsLogger(Callback):
    def __init__(
        self,
        output_dir: str | Path,
        *,
        rank: int,
        total_steps: int,
        start_step: int = 0,
        report_to: str = "tensorboard",
        config: dict | None = None,
    ):
        self.enabled = rank == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = self.wandb = self.bar = None
        if not self.enabled:
            return
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        elif report_to == "wandb":
            import wandb  # optional: pip install -e ".[wandb]"

            self.wandb = wandb.init(config=config, dir=str(output_dir), resume="allow")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="rlad", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        self.bar.update(max(step - self.bar.n, 0))
        shown = {k: record[k] for k in ("reward_mean", "accuracy", "loss", "response_len") if k in record}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self.log(step, metrics)

    def on_evaluate(self, trainer, step: int, results: dict) -> None:
        if step == 0:  # later evaluations are part of their step's line
            self.log(0, eval_metrics(results))

    def on_train_end(self, trainer, history: dict) -> None:
        self.close()

    def close(self) -> None:
        if not self.enabled or self.file.closed:
            return
        self.bar.close()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def initial_eval_accuracy(output_dir: str | Path) -> float | None:
    """The held-out accuracy evaluated before the run's first step, from its metrics.jsonl (a resumed run does not
    evaluate it again); None when it was not evaluated."""
    path = Path(output_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    first = json.loads(lines[0]) if lines and lines[0].strip() else {}
    return first.get("eval_accuracy") if first.get("step") == 0 else None


def _plain(value):
    """JSON-safe scalars: tensors and numpy numbers become floats, non-finite floats become strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
