"""P3 worker, one process: what distillation costs on top of GRPO, against the teacher's scoring pass alone.

    python -m benchmarks.distill_cost --student DIR --teacher DIR --out FILE [--steps 5]

One set of models (`rlad_ds.run_models.build_run_models` for rlad: student + teacher) and two trainers over it, one
per method object (`rlad`, `grpo`: no teacher pass, grpo_loss), each running the real loop (`Trainer.fit`)
with a timing callback. The learning rate is 0, so the weights never change and, with the same seed at the
start of each run, both methods sample the very same rollouts (checked: the response lengths of each pair of
steps must agree). After each RLAD step the callback times the teacher's `score` on that step's batch alone.
The runs go rlad, grpo, grpo, rlad (ABBA), so a slow drift of the machine's load cancels; the first step of
each run is a warm-up and not counted.

    cost = median_i(rlad_i - grpo_i) / median_i(teacher_i)      (paired steps i; medians resist load spikes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import count_params
from rlad_ds.callbacks import Callback


class StepTimes(Callback):
    """Each step's time and response length; for a method with a teacher, the teacher's pass timed alone."""

    def __init__(self):
        self.rows = []

    def on_batch(self, trainer, batch) -> None:
        self.batch = batch

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        row = {
            "step": metrics["time/step"],
            "teacher_in_step": metrics.get("time/teacher", 0.0),
            "tokens": metrics["response_len"],
        }
        if trainer.method.teacher_scores:
            start = time.perf_counter()
            trainer.models.teacher_scorer.logprobs(self.batch.input_ids, self.batch.attention_mask)
            row["teacher_alone"] = time.perf_counter() - start
        self.rows.append(row)


def cost(runs: dict) -> dict:
    """The paired steps of the ABBA runs, their medians and the cost of distillation."""
    # ABBA: the first rlad run pairs with the grpo run right after it, the last with the one right before.
    pairs = [(r, g) for rlad_run, grpo_run in zip(runs["rlad"], runs["grpo"]) for r, g in zip(rlad_run, grpo_run)]
    rlad, grpo = [r["step"] for r, _ in pairs], [g["step"] for _, g in pairs]
    alone = [r["teacher_alone"] for r, _ in pairs]
    return {
        "pairs": pairs,
        "same_rollouts": all(r["tokens"] == g["tokens"] for r, g in pairs),
        "rlad_median_s": statistics.median(rlad),
        "grpo_median_s": statistics.median(grpo),
        "teacher_median_s": statistics.median(alone),
        "cost": statistics.median([a - b for a, b in zip(rlad, grpo)]) / statistics.median(alone),
        "step_ratio": statistics.median(rlad) / statistics.median(grpo),
    }


def configs(args) -> dict:
    """The rlad and grpo configs of the two trainers: the same student, data and batch, lr ~0."""
    from rlad_ds.config.parsing import config_from_layers

    run_steps = -(-args.steps // 2) + 1  # two runs per method, each with one warm-up step
    layers = {
        "model": {"student": args.student, "teacher": args.teacher},
        "rollout": {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens},
        "data": {"task": "arith", "train_size": 1000},
        # lr 1e-30 (it must be > 0): Adam's ~1e-30 steps leave every fp32 weight as it was.
        "train": {"prompts_per_step": args.prompts_per_step, "lr": 1e-30, "max_steps": run_steps, "save_steps": -1},
        "eval": {"eval_size": 0},
    }
    grpo = {"loss": {"method": "grpo"}, "model": {"teacher": None}}
    return {"rlad": config_from_layers(layers, {"loss": {"method": "rlad"}}), "grpo": config_from_layers(layers, grpo)}


def timed_runs(args) -> dict:
    """Every timed step of the runs rlad, grpo, grpo, rlad (ABBA), over one set of models."""
    import torch

    from rlad_ds.data import load_train_examples
    from rlad_ds.distributed import init_process_group, single_process_env
    from rlad_ds.methods import get_method
    from rlad_ds.models import load_tokenizer
    from rlad_ds.rewards import RewardRunner
    from rlad_ds.run_models import build_run_models
    from rlad_ds.tasks import get_task
    from rlad_ds.trainer import Trainer

    cfgs = configs(args)
    single_process_env()
    init_process_group(600)
    tokenizer = load_tokenizer(args.student)
    models = build_run_models(cfgs["rlad"], get_method("rlad"), Path(args.student), Path(args.teacher), tokenizer)
    train = load_train_examples(cfgs["rlad"].data, tokenizer)
    runs = {}
    with RewardRunner("arith") as rewards:
        for method in ("rlad", "grpo", "grpo", "rlad"):
            times = StepTimes()
            torch.manual_seed(1234)
            trainer = Trainer(
                cfgs[method], get_method(method), models, tokenizer, get_task("arith"), rewards, train, []
            )
            trainer.fit([times])
            runs.setdefault(method, []).append(times.rows[1:])  # the first step of a run is its warm-up
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (split over two runs)")
    parser.add_argument("--prompts_per_step", type=int, default=16)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()
    runs = timed_runs(args)
    import torch

    result = {
        "student_params": count_params(args.student),
        "teacher_params": count_params(args.teacher),
        "sequences_per_step": args.prompts_per_step * args.group_size,
        "threads": torch.get_num_threads(),
        **cost(runs),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
