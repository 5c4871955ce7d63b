"""How far vLLM's sampler is from the trainer, and what each rollout-correction preset would do about it, measured on
the demo recipe's head_dim-32 student (the one P5 trains): the measurement behind `--rollout_correction auto`.

    python -m benchmarks.rollout_mismatch --precision bf16 [--max_new_tokens 48] [--student DIR --teacher DIR]
        [--json FILE]

One process, one rank: `launchers/train.py`'s own path builds the run (`parse_config` of the demo recipe's flags with
`--rollout vllm`, `build_run_models`, `Trainer.make_batch`), vLLM samples one step's prompts (16 x G=8 at temperature
1), and the trainer scores the same tokens (`student_scorer`, the old-policy pass). From the pairs: `rollout_kl`,
the largest and smallest trainer / sampler token ratio, the largest |log-ratio| summed over a response, and for
every preset at its default bounds the share of response tokens outside its bounds, the share of responses it
touches, and the effective sample size of its weights over the tokens the loss keeps, (sum w)^2 / (n sum w^2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rlad_ds.loss_terms import kl_estimate, masked_mean
from rlad_ds.losses import rollout_correction, rollout_ratio, within
from rlad_ds.sampler_mismatch import PRESETS


def preset_effect(old, rollout_logp, mask) -> dict:
    """For each preset at its default bounds: tokens outside the bounds, responses touched, and the weights' ESS."""
    on = mask.bool()
    rows = on.any(-1)
    effect = {}
    for name, preset in PRESETS.items():
        options = preset.kwargs(None, None)
        x = rollout_ratio(old, rollout_logp, mask, options["level"], options["statistic"])
        outside = ~within(x, options["low"], options["high"]) & on
        weights, keep = rollout_correction(old, rollout_logp, mask, **options)
        w = weights[keep.bool()]
        ess = (w.sum() ** 2 / (len(w) * w.square().sum())).item() if w.numel() and w.square().sum() > 0 else 0.0
        effect[name] = {
            "tokens_outside": masked_mean(outside.double(), on).item(),
            "responses_touched": (outside.any(-1) & rows).double().sum().item() / max(rows.sum().item(), 1),
            "ess": ess,
        }
    return effect


def mismatch(old, rollout_logp, mask) -> dict:
    on = mask.bool()
    log_ratio = (old - rollout_logp) * mask
    return {
        "tokens": int(on.sum()),
        "rollout_kl": masked_mean(kl_estimate(rollout_logp, old, "k3"), on).item(),
        "ratio_max": log_ratio.masked_fill(~on, float("-inf")).exp().max().item(),
        "ratio_min": log_ratio.masked_fill(~on, float("inf")).exp().min().item(),
        "abs_log_ratio_mean": masked_mean(log_ratio.abs(), on).item(),
        "row_log_ratio_sum_max": log_ratio.sum(-1).abs().max().item(),
        "presets": preset_effect(old.double(), rollout_logp.double(), mask),
    }


def measure(precision: str, max_new_tokens: int, seed: int, models: dict | None = None) -> dict:
    from benchmarks.engine_e2e import train_flags
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.data import load_train_examples
    from rlad_ds.demo.cache import cache_dir, prepare_demo
    from rlad_ds.demo.recipe import VLLM_RECIPE
    from rlad_ds.distributed import end_process_group, init_process_group, single_process_env
    from rlad_ds.methods import get_method
    from rlad_ds.models import load_tokenizer
    from rlad_ds.rewards import RewardRunner
    from rlad_ds.run_models import build_run_models
    from rlad_ds.step_metrics import StepMetrics
    from rlad_ds.tasks import get_task
    from rlad_ds.timing import Timer
    from rlad_ds.trainer import Trainer

    models = models or {k: str(v) for k, v in prepare_demo(cache_dir(), recipe=VLLM_RECIPE).items()}
    flags = train_flags(models, Path("/tmp/rlad_ds_rollout_mismatch"), "vllm", seed, 1)
    cfg, _ = parse_config([*flags, "--precision", precision, "--max_new_tokens", str(max_new_tokens)])
    single_process_env()
    init_process_group(600)
    tokenizer, method = load_tokenizer(cfg.model.student), get_method(cfg.loss.method)
    run = build_run_models(cfg, method, Path(cfg.model.student), Path(cfg.model.teacher), tokenizer)
    with RewardRunner.from_config(cfg.data) as rewards:
        train = load_train_examples(cfg.data, tokenizer, seed=cfg.train.seed, rewards=rewards)
        task = get_task(cfg.data.task, cfg.data.task_args)
        trainer = Trainer(cfg, method, run, tokenizer, task, rewards, train, [])
        torch.manual_seed(seed)
        batch = trainer.make_batch(0, Timer(), StepMetrics(run.device))
        old = run.student_scorer.logprobs(batch.input_ids, batch.attention_mask)
    result = mismatch(old.double(), batch.rollout_logp.double(), batch.loss_mask)
    end_process_group()
    return {"precision": precision, "max_new_tokens": max_new_tokens, "seed": seed, **result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student", help="a head_dim >= 32 student (default: VLLM_RECIPE's, built and cached)")
    parser.add_argument("--teacher", help="its teacher (default: VLLM_RECIPE's)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    models = {"student": args.student, "teacher": args.teacher} if args.student and args.teacher else None
    result = measure(args.precision, args.max_new_tokens, args.seed, models)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
