"""The demo's verdict, a `Trainer.fit` callback: held-out accuracy of the student before and after training
and of the teacher on the same prompts, `summary.json`, `curves.png` and a table on the terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlad_ds.callbacks import Callback
from rlad_ds.generation import evaluate_examples
from rlad_ds.metrics import initial_eval_accuracy


class DemoSummary(Callback):
    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.start = time.perf_counter()

    def on_train_end(self, trainer, history: dict) -> None:
        seconds = time.perf_counter() - self.start  # the loop and its evaluations, not the teacher's below
        teacher = None
        if trainer.models.teacher_rollout is not None and trainer.eval_examples:
            # The same held-out prompts and evaluation path, through the teacher (collective: every rank).
            results = evaluate_examples(
                trainer.models.teacher_rollout,
                trainer.tokenizer,
                trainer.task,
                trainer.eval_examples,
                trainer.cfg,
                trainer.rewards,
                trainer.models.device,
            )
            teacher = results["overall"][f"mean@{results['ks'][0]}"]
        if trainer.rank != 0:
            return
        before = history["eval_before"]
        summary = {
            # A resumed run (more steps for a finished demo) evaluated the initial student in its first part.
            "student_before": before if before is not None else initial_eval_accuracy(self.output_dir),
            "student_after": history["eval_after"],
            "teacher": teacher,
            "method": trainer.method.name,
            "steps": trainer.step,
            "train_seconds": round(seconds, 1),
            "eval_prompts": len(trainer.eval_examples),
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot_curves(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")
        print(f"\nheld-out accuracy (greedy, {summary['eval_prompts']} prompts), --method {trainer.method.name}")
        print("| model | accuracy |\n|---|---|")
        for key in ("student_before", "student_after", "teacher"):
            value = summary[key]
            shown = (
                f"{value:.3f}"
                if value is not None
                else f"not loaded (--method {trainer.method.name} uses none)"
                if key == "teacher"
                else "n/a"
            )
            print(f"| {key.replace('_', ' ')} | {shown} |")
        print(f"\nwrote {self.output_dir / 'summary.json'}, {self.output_dir / 'curves.png'}")


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training reward and held-out accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["reward_mean"]) for r in records if "reward_mean" in r]
    held_out = [(r["step"], r["eval_accuracy"]) for r in records if r.get("eval_accuracy") is not None]
    if train:
        ax.plot(*zip(*train), label="training reward (sampled)")
    if held_out:
        ax.plot(*zip(*held_out), marker="o", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
