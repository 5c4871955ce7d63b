"""P5: the demo recipe end to end with each rollout engine, on 2 ranks through the real launcher.

`launchers/train.py` runs the demo's task and recipe (`rlad_ds.demo.recipe.PROFILE`: arith, 16 prompts x G=8 per step,
48 new tokens, lr 1e-5) with `--rollout gathered` and `--rollout vllm`, seed by seed, on the same SFT models. The
demo's own student has head_dim 16, below the 32 that vLLM's CPU attention needs, so these runs use
`rlad_ds.demo.recipe.VLLM_RECIPE`: the demo recipe with the student's 4 x 16 query heads (2 x 16 key/value)
regrouped as 2 x 32 (1 x 32): the same hidden size, layers and parameter count give or take the q/k norms,
SFT-trained once (`python -m rlad_ds.demo --vllm` builds the same) and cached beside the demo models.

From each run's metrics.jsonl: the median step time (first step excluded: warm-up), the median share of the
weight sync in the step, and the held-out greedy accuracy at the end (`eval_accuracy`, 200 problems).

The rollout-correction comparison (docs/rollout_correction.md) runs the same recipe three ways, seed by seed:
`gathered` (no sampler log-probs: the correction is off), `vllm` with the default `--rollout_correction auto` (tis),
and `vllm` with `--dynamic_sampling`, and reports each one's held-out accuracy per seed, the mismatch metrics and
the sampling rounds:

    python -m benchmarks.engine_e2e --correction [--steps 60] [--seeds 3] [--dynamic_seeds N]
        [--student DIR --teacher DIR] [--json F]
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from benchmarks.common import ROOT, deepspeed_cmd, make_record, worker_env

VLLM_SKIP = "vLLM not installed"


def train_flags(models: dict, out: Path, engine: str, seed: int, steps: int) -> list[str]:
    """The demo's PROFILE as flags (it applies only without --student), plus the rollout, seed and length."""
    from rlad_ds.demo.recipe import PROFILE

    flags = [
        "--student",
        models["student"],
        "--teacher",
        models["teacher"],
        "--output_dir",
        out,
        "--rollout",
        engine,
        "--seed",
        seed,
        "--max_steps",
        steps,
        "--report_to",
        "none",
        "--eval_steps",
        0,
    ]
    for values in PROFILE.values():
        for name, value in values.items():
            if name not in ("max_steps", "output_dir", "eval_steps"):
                flags += [f"--{name}", value]
    return [str(f) for f in flags]


def run_one(
    models: dict, work: Path, engine: str, seed: int, steps: int, timeout: float = 1800, extra=(), label: str = ""
) -> dict:
    out = work / f"p5_{label or engine}_{seed}"
    flags = train_flags(models, out, engine, seed, steps) + list(extra)
    cmd = deepspeed_cmd(
        "launchers/train.py", ["--deepspeed", "ds_configs/zero3.json", *flags, "--overwrite_output_dir"], 2, work
    )
    proc = subprocess.run(
        cmd, cwd=ROOT, env=worker_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "time/step" in r][1:]
    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    logged = {
        key: statistics.mean(r[key] for r in steps_)
        for key in ("rollout_kl", "rollout_ratio_max", "rollout_corrected_frac", "sampling_rounds", "zero_std_frac")
        if steps_ and key in steps_[0]
    }
    return {
        "engine": engine,
        "label": label or engine,
        "seed": seed,
        **logged,
        "step_s": statistics.median(r["time/step"] for r in steps_),
        "rollout_s": statistics.median(r["time/rollout"] for r in steps_),
        "sync_share": statistics.median(r["time/weight_sync"] / r["time/step"] for r in steps_),
        # The student's training passes after the rollout: a rollout that loses ZeRO-3's prefetch trace slows them.
        "train_forward_s": statistics.median(r["time/train_forward"] for r in steps_),
        "train_backward_s": statistics.median(r["time/train_backward"] for r in steps_),
        "eval_before": evals[0] if evals else None,
        "eval_after": evals[-1] if evals else None,
    }


def run_p5(steps: int, seeds: int, work: Path) -> dict:
    import importlib.util

    from rlad_ds.demo.cache import cache_dir, prepare_demo
    from rlad_ds.demo.recipe import VLLM_RECIPE

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": VLLM_SKIP}
    models = {k: str(v) for k, v in prepare_demo(cache_dir(), recipe=VLLM_RECIPE).items()}
    runs = [run_one(models, work, engine, seed, steps) for seed in range(seeds) for engine in ("gathered", "vllm")]
    return {"steps": steps, "seeds": seeds, "runs": runs}


def p5_records(m: dict) -> tuple[list[dict], dict]:
    if "skipped" in m:
        return [], {}
    by = {engine: [r for r in m["runs"] if r["engine"] == engine] for engine in ("gathered", "vllm")}
    step = {e: statistics.median(r["step_s"] for r in rs) for e, rs in by.items()}
    rollout = {e: statistics.median(r["rollout_s"] for r in rs) for e, rs in by.items()}
    passes = {
        e: {k: statistics.median(r[k] for r in rs) for k in ("train_forward_s", "train_backward_s")}
        for e, rs in by.items()
    }
    share = statistics.median(r["sync_share"] for r in by["vllm"])
    where = f"demo recipe, head_dim-32 student, 2 ranks x 1 thread, {m['steps']} steps x {m['seeds']} seeds"
    ratio = make_record(f"P5 step time, vLLM / gathered ({where})", step["vllm"] / step["gathered"], "x", "<= 1.0")
    sync = make_record(f"P5 weight sync share of the vLLM step ({where})", share, "x", "<= 0.10")
    acc = {e: [r["eval_after"] for r in rs] for e, rs in by.items()}
    details = {
        ratio["name"]: f"step {step['vllm']:.2f} s vs {step['gathered']:.2f} s; rollout {rollout['vllm']:.2f} s "
        f"vs {rollout['gathered']:.2f} s; training forward {passes['vllm']['train_forward_s']:.3f} s vs "
        f"{passes['gathered']['train_forward_s']:.3f} s, backward {passes['vllm']['train_backward_s']:.3f} s vs "
        f"{passes['gathered']['train_backward_s']:.3f} s (medians)",
        sync["name"]: "held-out greedy accuracy after training, per seed: "
        + "; ".join(f"{e} {', '.join(f'{a:.3f}' for a in acc[e] if a is not None)}" for e in acc),
    }
    return [ratio, sync], details


CORRECTION_RUNS = {
    "gathered": ("gathered", ()),
    "vllm": ("vllm", ()),
    "vllm+dynamic": ("vllm", ("--dynamic_sampling",)),
}


def correction_comparison(models: dict, steps: int, seeds: int, work: Path, dynamic_seeds: int | None = None) -> dict:
    """Each of CORRECTION_RUNS on each seed (`vllm+dynamic` on the first `dynamic_seeds`), one run at a time."""
    runs = [
        run_one(models, work, engine, seed, steps, extra=extra, label=label)
        for seed in range(seeds)
        for label, (engine, extra) in CORRECTION_RUNS.items()
        if label != "vllm+dynamic" or dynamic_seeds is None or seed < dynamic_seeds
    ]
    return {"steps": steps, "seeds": seeds, "models": models, "runs": runs}


def _mean_cell(runs: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in runs if key in r]
    return format(statistics.mean(values), fmt) if values else "-"


def correction_summary(result: dict) -> str:
    """Per configuration: held-out accuracy per seed, mean and spread (max - min), and the logged means."""
    lines = ["| run | held-out accuracy per seed | mean | spread | step s | rollout_kl | ratio max | corrected | "
             "rounds | zero_std_frac |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    means = {}
    for label in CORRECTION_RUNS:
        runs = [r for r in result["runs"] if r["label"] == label]
        acc = [r["eval_after"] for r in runs]
        means[label] = (statistics.mean(acc), max(acc) - min(acc))

        cells = [
            _mean_cell(runs, key, fmt)
            for key, fmt in (
                ("step_s", ".2f"),
                ("rollout_kl", ".1e"),
                ("rollout_ratio_max", ".4f"),
                ("rollout_corrected_frac", ".4f"),
                ("sampling_rounds", ".2f"),
                ("zero_std_frac", ".3f"),
            )
        ]
        accuracies = ", ".join(f"{a:.3f}" for a in acc)
        lines.append(
            f"| {label} | {accuracies} | {means[label][0]:.3f} | {means[label][1]:.3f} | {' | '.join(cells)} |"
        )
    gap = abs(means["vllm"][0] - means["gathered"][0])
    spread = max(means["vllm"][1], means["gathered"][1])
    lines.append(f"\n|mean vllm - mean gathered| = {gap:.3f}; largest seed spread {spread:.3f}: "
                 f"{'within' if gap <= spread else 'outside'} the seed spread")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="P5's demo recipe: the rollout-correction comparison")
    parser.add_argument("--correction", action="store_true", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dynamic_seeds", type=int, help="seeds of the vllm+dynamic run (default: every seed)")
    parser.add_argument("--student", help="the head_dim-32 student (default: VLLM_RECIPE's, built and cached)")
    parser.add_argument("--teacher", help="its teacher (default: VLLM_RECIPE's)")
    parser.add_argument("--workdir", default="/tmp/rlad_ds_p5_correction")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.student and args.teacher:
        models = {"student": args.student, "teacher": args.teacher}
    else:
        from rlad_ds.demo.cache import cache_dir, prepare_demo
        from rlad_ds.demo.recipe import VLLM_RECIPE

        models = {k: str(v) for k, v in prepare_demo(cache_dir(), recipe=VLLM_RECIPE).items()}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result = correction_comparison(models, args.steps, args.seeds, work, args.dynamic_seeds)
    print(correction_summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
