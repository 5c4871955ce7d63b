"""Step time of TRL's GRPOTrainer against rlad_ds's own `--method grpo`: same student, prompts, reward and batch.

    python -m benchmarks.trl_compare [--steps 6] [--trl_python /tmp/trlvenv/bin/python] [--json FILE]

What is measured: the wall time of one optimizer step (sampling 16 prompts x 8 completions of at most 48 tokens,
scoring them, one forward + backward over all 128, one AdamW step), on one rank with one thread each, run after
run (never at once). Printed: the median step seconds of each side over steps 2..N (step 1 is warm-up), the
ratio rlad_ds / TRL, the generation share of the step, and the mean reward as a check that both train the same
thing. `--json FILE` writes the same numbers plus every step's times.

rlad_ds: `launchers/train.py --deepspeed ds_configs/zero3.json --method grpo --max_steps N --eval_size 0
--report_to none --save_steps -1 --output_dir TMP --overwrite_output_dir` (no --student: the built-in demo, its
recipe `rlad_ds.demo.recipe.PROFILE` over the defaults of `rlad_ds.config`) through the real launcher, `python -m
deepspeed.launcher.runner --hostfile (localhost slots=1) --no_ssh_check ...`, OMP_NUM_THREADS=1,
DS_ACCELERATOR=cpu. Times: `time/step` and `time/rollout` of TMP/metrics.jsonl.

TRL: `benchmarks/trl_side.py` run in the TRL venv's python (TRL never enters the project's environment; the venv
holds rlad_ds itself with --no-deps, for the data and the verifier only). The worker parses the same config tree
(`rlad_ds.config.parsing.parse_config` of the same flags under `rlad_ds.demo.recipe.PROFILE`) and takes every
setting from it: the demo student (`prepare_demo`, cached), its tokenizer and raw chat template, the first N x 16
prompts in rlad_ds's own order (`load_train_examples`, then the DistributedSampler order of
`Trainer.prompts_for_step`, with TRL's shuffling off), the reward `rlad_ds.rewards.score` (the task's verifier,
called in-process), and GRPOConfig(use_cpu, fp32, no gradient checkpointing, num_generations=G,
max_completion_length, temperature, top_p, top_k, lr, AdamW betas / eps / weight decay as in ds_configs/zero3.json,
constant lr, grad clip, beta=beta_ref, num_iterations=ppo_epochs, epsilon=clip_low, epsilon_high=clip_high,
loss_type "grpo" (the per-sequence token mean, = seq-mean-token-mean), scale_rewards "group" (= scale_adv_by_std),
no vLLM, logging every step, report_to none). torch.set_num_threads(1). A TrainerCallback times on_step_begin ->
on_step_end; a wrapper around `GRPOTrainer._generate_single_turn` (tokenised prompts -> `model.generate`) times
generation, since TRL logs its own timings only to wandb / mlflow / trackio.

One TRL step is one optimizer step over 16 prompts x 8 completions: TRL's per_device_train_batch_size counts
completions, so it is G x prompts_per_step = 128 with gradient_accumulation_steps=1 and steps_per_generation=1,
which makes generation_batch_size 128 (one generate call of 128 rows per optimizer step) and, with
num_iterations=1, leaves out TRL's extra old-log-prob pass (as rlad_ds does with ppo_epochs 1). The worker
checks the resolved GRPOConfig values and counts the generate calls and rows of every timed step (exactly 1 and
128, or it fails).

Differences left on purpose (they are the two designs, or cannot be matched): rlad_ds runs under DeepSpeed
ZeRO-3 (the student gathered for each rollout, ZeRO hooks in training) and scores in its isolated reward
worker processes (2, with a timeout), TRL runs plain PyTorch and calls the verifier in-process; the random
streams differ, so the completions differ (the mean rewards should agree roughly); advantages use the population
std + 1e-6 in rlad_ds, TRL's Bessel-corrected std + 1e-4. Each side's generation time is its own boundary: rlad_ds's
`time/rollout` (tokenising, gathering, generate), TRL's `_generate_single_turn` (padding, generate, EOS mask).

Setting up the TRL venv (the CPU build of torch is pinned so that pip cannot pull a CUDA build):

    python -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install torch==2.13.0
    /tmp/trlvenv/bin/pip install trl            # check: torch stays 2.13.0+cpu (tested with trl 1.16.0)
    /tmp/trlvenv/bin/pip install --no-deps -e /work/main     # rlad_ds for its data and verifier (no deepspeed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.trl_side import RECIPE_FLAGS, median_after_warmup

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = "/tmp/trlvenv/bin/python"
VENV_HELP = (
    "no TRL python at {python}: python -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 "
    "&& /tmp/trlvenv/bin/pip install trl && /tmp/trlvenv/bin/pip install --no-deps -e {root}"
)
# ---- the driver (runs in the project's environment) ---------------------------------------------------------------


def trl_versions(python: str) -> dict | None:
    """{trl, torch, transformers} versions of the TRL python, or None if it is missing or cannot import TRL."""
    if not Path(python).is_file():
        return None
    code = (
        "import json, trl, torch, transformers as t; print(json.dumps({'trl': trl.__version__, "
        "'torch': torch.__version__, 'transformers': t.__version__}))"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict) -> None:
    """Run `cmd` in the repository root with its output in `log`; raise with the log's tail if it fails."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = "timeout"
    if code != 0:
        raise RuntimeError(f"{code}: {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def run_rlad(steps: int, work: Path, timeout: float) -> dict:
    """rlad_ds's GRPO on the demo through the real launcher on one rank; its per-step times from metrics.jsonl."""
    from benchmarks.common import deepspeed_cmd, worker_env

    out = work / "rlad_ds"
    flags = [
        "--deepspeed",
        "ds_configs/zero3.json",
        *RECIPE_FLAGS,
        "--max_steps",
        steps,
        "--report_to",
        "none",
        "--save_steps",
        -1,
        "--output_dir",
        out,
        "--overwrite_output_dir",
    ]
    log = work / "rlad_ds.log"
    start = time.perf_counter()
    run_logged(deepspeed_cmd("launchers/train.py", flags, 1, work), log, timeout, worker_env({"OMP_NUM_THREADS": "1"}))
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    engine = next(  # the trainer's own line: "student rollout: gathered (auto)"
        (
            line.split("student rollout:", 1)[1].strip()
            for line in log.read_text().splitlines()
            if "student rollout:" in line and " not used " not in line
        ),
        "unknown",
    )
    return {
        "step_s": [r["time/step"] for r in rows],
        "generate_s": [r["time/rollout"] for r in rows],
        "rewards": [r["reward_mean"] for r in rows],
        "rollout_engine": engine,
        "wall_s": wall,
    }


def run_trl(python: str, steps: int, work: Path, timeout: float) -> dict:
    """The TRL worker (this module with --trl_worker) in the TRL venv's python."""
    from benchmarks.common import worker_env

    out = work / "trl.json"
    cmd = [python, "-m", "benchmarks.trl_side", "--steps", str(steps), "--out", str(out)]
    start = time.perf_counter()
    run_logged(cmd, work / "trl.log", timeout, worker_env({"OMP_NUM_THREADS": "1"}))
    result = json.loads(out.read_text())
    steps_ = result.pop("steps")
    return {
        **result,
        "step_s": [s["step_s"] for s in steps_],
        "generate_s": [s["generate_s"] for s in steps_],
        "threads": sorted({s["threads"] for s in steps_}),
        "wall_s": time.perf_counter() - start,
    }


def summary(side: dict) -> dict:
    """Medians over the steps after the first, and the median generation share of a step."""
    shares = [g / s for g, s in zip(side["generate_s"], side["step_s"])]
    rewards = side["rewards"]
    return {
        "median_step_s": median_after_warmup(side["step_s"]),
        "median_generate_s": median_after_warmup(side["generate_s"]),
        "generation_share": median_after_warmup(shares),
        "mean_reward": statistics.fmean(rewards) if rewards else float("nan"),
    }


def format_table(result: dict) -> str:
    r, t = result["rlad_ds"]["summary"], result["trl"]["summary"]
    lines = [
        f"{'':24}{'rlad_ds':>12}{'TRL ' + result['trl']['trl']:>16}",
        f"{'median step (s)':24}{r['median_step_s']:>12.3f}{t['median_step_s']:>16.3f}",
        f"{'median generation (s)':24}{r['median_generate_s']:>12.3f}{t['median_generate_s']:>16.3f}",
        f"{'generation share':24}{r['generation_share']:>12.1%}{t['generation_share']:>16.1%}",
        f"{'mean reward':24}{r['mean_reward']:>12.3f}{t['mean_reward']:>16.3f}",
        f"ratio rlad_ds / TRL (median step): {result['ratio']:.2f}   "
        f"({result['steps']} steps each, step 1 excluded; rlad_ds rollout: "
        f"{result['rlad_ds']['rollout_engine']}; TRL threads: {result['trl']['threads']})",
    ]
    return "\n".join(lines)


def compare(steps: int, trl_python: str, versions: dict) -> dict:
    """Both runs, one after the other, in a temporary directory; the result record."""
    timeout = 600 + 120 * steps
    with tempfile.TemporaryDirectory(prefix="trl_compare_") as tmp:
        work = Path(tmp)
        rlad = run_rlad(steps, work, timeout)
        trl = run_trl(trl_python, steps, work, timeout)
    rlad["summary"], trl["summary"] = summary(rlad), summary(trl)
    trl.update(versions)
    return {
        "steps": steps,
        "rlad_ds": rlad,
        "trl": trl,
        "ratio": rlad["summary"]["median_step_s"] / trl["summary"]["median_step_s"],
        "load_average": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per side (the first is warm-up)")
    parser.add_argument("--trl_python", default=DEFAULT_TRL_PYTHON, help="python of the venv that has TRL")
    parser.add_argument("--json", default=None, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    versions = trl_versions(args.trl_python)
    if versions is None:
        print(VENV_HELP.format(python=args.trl_python, root=ROOT), file=sys.stderr)
        return 2
    result = compare(args.steps, args.trl_python, versions)
    print(format_table(result))
    print(
        json.dumps({"rlad_ds": result["rlad_ds"]["summary"], "trl": result["trl"]["summary"], "ratio": result["ratio"]})
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
