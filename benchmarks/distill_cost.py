"""P3 worker, one process: what distillation costs on top of GRPO, against the teacher's scoring pass alone.

One `rlad_ds.trainer.Trainer` (set up for rlad, so it holds the teacher) runs `train_step` on the same prompts
as rlad and as grpo (GRPO = the same trainer with the method switched and the teacher detached, exactly what a
grpo run does: no teacher pass, grpo_loss). The learning rate is 0, so the weights never change and, with the
same seed before each step, both methods sample the very same rollouts (checked: the response token counts of
each pair of steps must agree). The teacher's `score` is wrapped to keep its inputs, and after each RLAD step
the same `score` call is timed again on its own. The first step of each method is a warm-up and not counted.

    cost = median_i(rlad_i - grpo_i) / median_i(teacher_i)      (paired steps i; medians resist load spikes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import count_params, single_process_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--prompts_per_step", type=int, default=16)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()

    single_process_env()
    import deepspeed
    import torch

    from rlad_ds.config import Config
    from rlad_ds.data import load_eval_examples, load_train_examples
    from rlad_ds.models import load_tokenizer
    from rlad_ds.trainer import Trainer

    cfg = Config()
    cfg.model.student, cfg.model.teacher = args.student, args.teacher
    cfg.model.teacher_offload = False  # as the demo runs it; on CPU an offload would only add copies
    cfg.data.task, cfg.data.train_size = "arith", 1000
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = args.group_size, args.max_new_tokens
    cfg.train.prompts_per_step, cfg.train.lr, cfg.train.report_to = args.prompts_per_step, 0.0, "none"
    cfg.loss.method = "rlad"

    deepspeed.init_distributed()
    tokenizer = load_tokenizer(args.student)
    trainer = Trainer(cfg)
    trainer.setup(Path(args.student), Path(args.teacher), "arith", load_train_examples(cfg.data, tokenizer),
                  load_eval_examples(cfg.data, tokenizer, size=0), tokenizer)
    teacher = trainer.teacher
    scored = {}
    original_score = teacher.score

    def recording_score(input_ids, attention_mask, **kwargs):
        scored.update(input_ids=input_ids, attention_mask=attention_mask, kwargs=kwargs)
        return original_score(input_ids, attention_mask, **kwargs)

    teacher.score = recording_score

    def run(method: str, step: int) -> dict:
        cfg.loss.method = method
        trainer.teacher = teacher if method == "rlad" else None
        torch.manual_seed(1234 + step)
        metrics = trainer.train_step(step)
        return {"step": metrics["time/step"], "teacher_in_step": metrics.get("time/teacher", 0.0),
                "tokens": metrics["response_len"]}

    rows = []
    for step in range(args.steps + 1):
        order = ("rlad", "grpo") if step % 2 == 0 else ("grpo", "rlad")
        row = {method: run(method, step) for method in order}
        start = time.perf_counter()
        original_score(scored["input_ids"], scored["attention_mask"], **scored["kwargs"])
        row["teacher_alone"] = time.perf_counter() - start
        rows.append(row)
    timed = rows[1:]
    rlad = [r["rlad"]["step"] for r in timed]
    grpo = [r["grpo"]["step"] for r in timed]
    alone = [r["teacher_alone"] for r in timed]
    result = {
        "student_params": count_params(args.student), "teacher_params": count_params(args.teacher),
        "rows": rows, "same_rollouts": all(r["rlad"]["tokens"] == r["grpo"]["tokens"] for r in rows),
        "rlad_median_s": statistics.median(rlad), "grpo_median_s": statistics.median(grpo),
        "teacher_median_s": statistics.median(alone),
        "cost": statistics.median([a - b for a, b in zip(rlad, grpo)]) / statistics.median(alone),
        "step_ratio": statistics.median(rlad) / statistics.median(grpo),
        "sequences_per_step": args.prompts_per_step * args.group_size, "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    trainer.rewards.close()


if __name__ == "__main__":
    main()
