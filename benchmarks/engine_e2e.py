"""P5: the demo recipe end to end with each rollout engine, on 2 ranks through the real launcher.

`launchers/train.py` runs the demo's task and recipe (`rlad_ds.demo.recipe.PROFILE`: arith, 16 prompts x G=8 per step,
48 new tokens, lr 1e-5) with `--rollout gathered` and `--rollout vllm`, seed by seed, on the same SFT models. The
demo's own student has head_dim 16, below the 32 that vLLM's CPU attention needs, so these runs use
`rlad_ds.demo.recipe.VLLM_RECIPE`: the demo recipe with the student's 4 x 16 query heads (2 x 16 key/value)
regrouped as 2 x 32 (1 x 32): the same hidden size, layers and parameter count give or take the q/k norms,
SFT-trained once (`python -m rlad_ds.demo --vllm` builds the same) and cached beside the demo models.

From each run's metrics.jsonl: the median step time (first step excluded: warm-up), the median share of the
weight sync in the step, and the held-out greedy accuracy at the end (`eval_accuracy`, 200 problems).
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


def run_one(models: dict, work: Path, engine: str, seed: int, steps: int, timeout: float = 1800) -> dict:
    out = work / f"p5_{engine}_{seed}"
    flags = train_flags(models, out, engine, seed, steps)
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
    return {
        "engine": engine,
        "seed": seed,
        "step_s": statistics.median(r["time/step"] for r in steps_),
        "rollout_s": statistics.median(r["time/rollout"] for r in steps_),
        "sync_share": statistics.median(r["time/weight_sync"] / r["time/step"] for r in steps_),
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
    share = statistics.median(r["sync_share"] for r in by["vllm"])
    where = f"demo recipe, head_dim-32 student, 2 ranks x 1 thread, {m['steps']} steps x {m['seeds']} seeds"
    ratio = make_record(f"P5 step time, vLLM / gathered ({where})", step["vllm"] / step["gathered"], "x", "<= 1.0")
    sync = make_record(f"P5 weight sync share of the vLLM step ({where})", share, "x", "<= 0.10")
    acc = {e: [r["eval_after"] for r in rs] for e, rs in by.items()}
    details = {
        ratio["name"]: f"step {step['vllm']:.2f} s vs {step['gathered']:.2f} s; rollout {rollout['vllm']:.2f} s "
        f"vs {rollout['gathered']:.2f} s (medians)",
        sync["name"]: "held-out greedy accuracy after training, per seed: "
        + "; ".join(f"{e} {', '.join(f'{a:.3f}' for a in acc[e] if a is not None)}" for e in acc),
    }
    return [ratio, sync], details
