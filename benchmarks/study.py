"""Demo-scale study: GRPO, KDRL, RLAD, an alpha sweep, offline SFT, adaptive alpha, and two controls.

    python -m benchmarks.study [--quick] [--out docs/study] [--workers 2]

Everything runs on the embedded `arith` demo (`rlad_ds.demo.cache.prepare_demo`), at the demo recipe
(`rlad_ds.demo.recipe.PROFILE`: max_new_tokens 48, 16 prompts x G=8 per step, lr 1e-5, teacher not offloaded,
60 steps; see `MODES`). Each run is the real loop (`rlad_ds.trainer.Trainer.fit` over the models of
`rlad_ds.run_models.build_run_models`) in a worker process (one thread each), with a callback that evaluates the
student on a fixed held-out set through the evaluation path (`rlad_ds.generation.evaluate_examples`); the
workers take runs from a shared queue, so `--workers 2` keeps two CPU cores busy.

Controls that tell the mechanisms apart:

- ``kd``: on-policy distillation with no reward (`--method kd`): only the teacher KL term trains the
  student (the value and gradient of KDRL with every advantage zero).
- ``kdrl beta_kd=1``: KDRL with ten times the default KL weight (0.1), with both teachers: how much a
  stronger additive imitation term gains with a right teacher and loses with a wrong one.
- ``grpo_shuffled``: GRPO whose reward runner (injected into the trainer) returns each batch's rewards
  permuted at random across all its samples (same reward statistics, no link between a response and its
  reward).

Misaligned-teacher setting: a teacher with the demo teacher's architecture and SFT recipe, trained on worked
solutions with one systematic bug: when the units column carries, the tens column counts that carry twice,
e.g. ``347+285=`` -> ``7+5+0=12|4+8+1=14|3+2+1=06|>0642`` (true: 0632); its final answer follows its own
columns, so it is wrong exactly on the ``carry`` prompts (units digits summing to 10 or more) and right on the
others. The bug sits on the tens column's sum digit, a token the demo student is unsure of (mean p of the
correct token about 0.75), so imitating the teacher there changes what the student writes. It is built once
and cached beside the demo models; its greedy held-out accuracy per subset is recorded. Blind imitation of it
should hurt on the ``carry`` subset; the reward-gated methods should not.

Outputs: ``<out>.json`` (every run: per-seed final accuracies, per-subset scores, curves, timings),
``<out>.png`` (held-out accuracy vs step, mean over seeds), ``<out>.tables.md`` (the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

from benchmarks.misaligned_teacher import prepare_misaligned_teacher
from benchmarks.study_report import (
    KD,
    SWEEP_ALPHAS,
    plot,
    render_table,
    subset_accuracy,
    summarise,
    tables,
    token_confidence,
)
from rlad_ds.callbacks import Callback
from rlad_ds.demo.cache import cache_dir
from rlad_ds.tasks import arith

# Run time per mode: the full grid runs the demo recipe's 60 steps (48 runs, about 23 minutes on 2 cores once
# the models are cached); --quick is a smoke run of the whole pipeline.
MODES = {
    "full": dict(steps=60, seeds=3, sweep_seeds=3, eval_size=400, eval_every=10),
    "quick": dict(steps=10, seeds=1, sweep_seeds=1, eval_size=200, eval_every=5),
}


# ---- the run grid --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    name: str  # row label, e.g. "rlad a=0.5"
    group: str  # main / sweep / misaligned
    method: str  # trainer method
    seed: int
    teacher: str = "aligned"
    alpha: float = 0.5
    control: str | None = None  # shuffled
    adaptive: bool = False
    beta_kd: float = 0.1  # KDRL's KL weight (the trainer's default)


def build_jobs(seeds: int, sweep_seeds: int) -> list[Job]:
    jobs = []
    teacher_runs = [
        (KD, "kd", None, 0.1),
        ("kdrl", "kdrl", None, 0.1),
        ("kdrl beta_kd=1", "kdrl", None, 1.0),
        ("rlad a=0.5", "rlad", None, 0.1),
    ]
    for seed in range(seeds):
        jobs += [
            Job("grpo", "main", "grpo", seed),
            Job("grpo shuffled rewards", "main", "grpo", seed, control="shuffled"),
            Job("rlad adaptive alpha", "main", "rlad", seed, adaptive=True),
            Job("sft (offline distill)", "main", "sft", seed),
        ]
        for group, teacher in (("main", "aligned"), ("misaligned", "misaligned")):
            jobs += [
                Job(name, group, method, seed, teacher=teacher, control=control, beta_kd=beta)
                for name, method, control, beta in teacher_runs
            ]
    for seed in range(sweep_seeds):
        for alpha in SWEEP_ALPHAS:
            jobs.append(Job(f"rlad a={alpha}", "sweep", "rlad", seed, alpha=alpha))
    # Longest first (sft generates with the teacher), so the queue ends with short jobs.
    return sorted(jobs, key=lambda j: (j.method != "sft", j.seed))


# ---- a worker process ------------------------------------------------------------------------------------------------

_STATE: dict = {}


class _ShuffledRewards:
    """A reward runner whose scores come back permuted at random within each batch (the shuffled control)."""

    def __init__(self, inner, seed: int):
        self.inner, self.rng = inner, random.Random(seed)

    def run(self, completions, examples):
        result = self.inner.run(completions, examples)
        self.rng.shuffle(result.scores)
        return result


class _Recorder(Callback):
    """Training accuracy and alpha per step; held-out accuracy per subset every `eval_every` steps and at the end."""

    def __init__(self, mode: dict):
        self.mode, self.curve, self.train_accuracy, self.alphas, self.step_seconds, self.bad = mode, [], [], [], [], 0

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self.bad += not metrics["finite"]
        self.train_accuracy.append(metrics["accuracy"])
        self.alphas.append(metrics.get("alpha"))
        self.step_seconds.append(round(metrics["time/step"], 3))
        if step % self.mode["eval_every"] == 0 or step == self.mode["steps"]:
            self.curve.append([step, subset_accuracy(_eval_scores(trainer.models.student_rollout), _STATE["eval"])])


def _worker_init(paths: dict, threads: int) -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(key, None)
    from rlad_ds.distributed import init_process_group, single_process_env
    from rlad_ds.models import load_tokenizer
    from rlad_ds.rewards import RewardRunner

    single_process_env()
    init_process_group(1800)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _STATE.update(paths=paths, tokenizer=load_tokenizer(paths["student"]), rewards=RewardRunner("arith", workers=1))


def _config(job: Job, mode: dict):
    """The demo recipe (`rlad_ds.demo.recipe.PROFILE`) with the job's method, seed, teacher and loss fields."""
    from rlad_ds.config.parsing import config_from_layers
    from rlad_ds.demo.recipe import PROFILE
    from rlad_ds.methods import get_method

    method, paths = get_method(job.method), _STATE["paths"]
    teacher = paths["misaligned_teacher"] if job.teacher == "misaligned" else paths["teacher"]
    loss = {"method": job.method}
    loss.update({"alpha": job.alpha, "adaptive_alpha": job.adaptive} if "alpha" in method.reads else {})
    loss.update({"beta_kd": job.beta_kd} if "beta_kd" in method.reads else {})
    return config_from_layers(
        PROFILE,
        {
            "model": {"student": paths["student"], "teacher": teacher if method.needs_teacher else None},
            "loss": loss,
            "data": {"train_size": 4000},
            "eval": {"eval_size": 0},
            "train": {"max_steps": mode["steps"], "seed": job.seed, "report_to": "none", "save_steps": -1},
        },
    )


def _held_out(mode: dict) -> None:
    """The fixed held-out prompts of every run (the arith test split, seed 0) and the demo's evaluation settings
    (greedy, max_new_tokens 48), loaded once per worker."""
    from rlad_ds.config.parsing import config_from_layers
    from rlad_ds.data import load_eval_examples
    from rlad_ds.demo.recipe import PROFILE

    if "eval" not in _STATE:
        _STATE["eval_cfg"] = config_from_layers(PROFILE, {"eval": {"eval_size": mode["eval_size"]}})
        _STATE["eval"] = list(load_eval_examples(_STATE["eval_cfg"], _STATE["tokenizer"]))


def _eval_scores(rollout) -> list[float]:
    """Greedy per-example scores of the rollout engine's model on the held-out prompts (the evaluation path)."""
    from rlad_ds.generation import evaluate_examples
    from rlad_ds.tasks import get_task

    results = evaluate_examples(
        rollout, _STATE["tokenizer"], get_task("arith"), _STATE["eval"], _STATE["eval_cfg"], _STATE["rewards"], "cpu"
    )
    return [p["scores"][0] for p in results["problems"]]


def _models(job: Job, mode: dict):
    import torch

    from rlad_ds.methods import get_method
    from rlad_ds.run_models import build_run_models

    cfg = _config(job, mode)
    random.seed(job.seed)
    torch.manual_seed(job.seed)
    _held_out(mode)
    method = get_method(job.method)
    teacher = cfg.model.teacher and Path(cfg.model.teacher)
    return cfg, method, build_run_models(cfg, method, Path(cfg.model.student), teacher, _STATE["tokenizer"])


def run_references(mode: dict) -> dict:
    """Greedy held-out scores of the initial student and of both teachers (same eval set and path as the runs)."""
    out = {}
    for teacher in ("aligned", "misaligned"):
        _, _, models = _models(Job("ref", "ref", "kdrl", 0, teacher=teacher), mode)
        if teacher == "aligned":
            out["student_before"] = _eval_scores(models.student_rollout)
        out[f"teacher_{teacher}"] = _eval_scores(models.teacher_rollout)
    return {"scores": out, "examples": [{"a": e["a"], "b": e["b"]} for e in _STATE["eval"]]}


def run_job(job_and_mode) -> dict:
    from rlad_ds.data import load_train_examples
    from rlad_ds.tasks import get_task
    from rlad_ds.trainer import Trainer

    job, mode = job_and_mode
    job = Job(**job)
    start = time.perf_counter()
    cfg, method, models = _models(job, mode)
    rewards = _ShuffledRewards(_STATE["rewards"], 10_000 + job.seed) if job.control == "shuffled" else _STATE["rewards"]
    train = list(load_train_examples(cfg.data, _STATE["tokenizer"], seed=job.seed))
    setup_s = time.perf_counter() - start
    recorder = _Recorder(mode)
    Trainer(cfg, method, models, _STATE["tokenizer"], get_task("arith"), rewards, train, []).fit([recorder])
    final = recorder.curve[-1][1]
    return {
        "job": dataclasses.asdict(job),
        "final": final["all"],
        "subsets": final,
        "curve": recorder.curve,
        "train_accuracy": recorder.train_accuracy,
        "alpha_trace": recorder.alphas,
        "step_seconds": recorder.step_seconds,
        "non_finite_steps": recorder.bad,
        "setup_s": round(setup_s, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "pid": os.getpid(),
    }


def _task(item):
    kind, payload = item
    return run_references(payload) if kind == "refs" else run_job(payload)


# ---- main ------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _print_confidence() -> None:
    from rlad_ds.demo.cache import prepare_demo

    rows = token_confidence(str(prepare_demo(cache_dir(), seed=0)["student"]), arith.generate("test", 300, 0))
    cells = [
        [
            str(r["position"]),
            f"`{r['example_char']}`".replace("|", "\\|"),
            f"{r['mean_p']:.3f}",
            f"{r['frac_below_0.9']:.2f}",
        ]
        for r in rows
    ]
    print(render_table(["position", "char (first example)", "mean p(correct)", "fraction p < 0.9"], cells))


def _run_grid(paths: dict, mode: dict, workers: int, wall: float) -> tuple[list[dict], dict]:
    """Every job and the references on a pool of worker processes; the results as they come."""
    import multiprocessing as mp

    jobs = build_jobs(mode["seeds"], mode["sweep_seeds"])
    items = [("refs", mode)] + [("job", (dataclasses.asdict(j), mode)) for j in jobs]
    print(f"study: {len(jobs)} runs x {mode['steps']} steps on {workers} workers", flush=True)
    results, refs = [], None
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(paths, 1)) as pool:
        for out in pool.imap_unordered(_task, items):
            if "scores" in out:
                refs = out
                print(f"  [{time.perf_counter() - wall:6.0f} s] references done", flush=True)
                continue
            results.append(out)
            j = out["job"]
            print(
                f"  [{time.perf_counter() - wall:6.0f} s] {len(results)}/{len(jobs)} {j['group']}/{j['name']} "
                f"seed {j['seed']}: {out['final']:.3f} ({out['seconds']:.0f} s)",
                flush=True,
            )
    return results, refs


def _write(out: Path, record: dict, text: str, summary: dict) -> None:
    import platform

    import torch

    record["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(record, indent=1) + "\n")
    Path(f"{out}.tables.md").write_text(
        text + f"\nWall time: {record['wall_seconds']:.0f} s ({record['workers']} workers).\n"
    )
    plot(summary, Path(f"{out}.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, 1 seed (<= 5 min on 2 cores)")
    parser.add_argument("--out", default="docs/study", help="output prefix: <out>.json, <out>.png, <out>.tables.md")
    parser.add_argument("--workers", type=_positive_int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="override the mode's steps")
    parser.add_argument("--seeds", type=_positive_int, default=None, help="override the mode's seeds")
    parser.add_argument("--sweep_seeds", type=_positive_int, default=None, help="override the mode's sweep seeds")
    parser.add_argument(
        "--confidence",
        action="store_true",
        help="only print the initial student's per-position confidence in the correct solution",
    )
    args = parser.parse_args(argv)
    if args.confidence:
        _print_confidence()
        return 0
    mode = dict(MODES["quick" if args.quick else "full"])
    mode.update({key: getattr(args, key) for key in ("steps", "seeds", "sweep_seeds") if getattr(args, key)})
    wall = time.perf_counter()
    from rlad_ds.demo.cache import demo_info, prepare_demo

    demo_paths = prepare_demo(cache_dir(), seed=0)
    paths = {
        **{k: str(v) for k, v in demo_paths.items()},
        "misaligned_teacher": str(prepare_misaligned_teacher(cache_dir())),
    }
    prep_s = time.perf_counter() - wall
    results, refs = _run_grid(paths, mode, args.workers, wall)
    wall_s = time.perf_counter() - wall
    summary = {**summarise(results, refs, mode), "examples": refs["examples"]}
    text = tables(summary, mode, mode["eval_size"])
    misaligned_info = json.loads((Path(paths["misaligned_teacher"]).parent / "info.json").read_text())
    record = {
        "command": " ".join(["python", "-m", "benchmarks.study"] + (argv if argv is not None else sys.argv[1:])),
        "mode": mode,
        "workers": args.workers,
        "wall_seconds": round(wall_s, 1),
        "prepare_seconds": round(prep_s, 1),
        "demo": demo_info(demo_paths),
        "misaligned_teacher": misaligned_info,
        "summary": summary,
        "runs": results,
    }
    _write(Path(args.out), record, text, summary)
    print(text)
    print(f"wall time {wall_s:.0f} s; wrote {args.out}.json, {args.out}.png, {args.out}.tables.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
