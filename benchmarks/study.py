"""Demo-scale study: GRPO, KDRL, RLAD, an alpha sweep, offline SFT, adaptive alpha, and two controls.

    python benchmarks/study.py [--quick] [--out docs/study] [--workers 2]

Everything runs on the embedded `arith` demo (`rlad_ds.demo.prepare_demo`), at the demo recipe
(`rlad_ds.main.apply_demo_defaults`: max_new_tokens 48, 16 prompts x G=8 per step, lr 1e-5, teacher
not offloaded, 60 steps; see `MODES`). Each run is one `rlad_ds.trainer.Trainer` in a worker process (one
thread each); the workers take runs from a shared queue, so `--workers 2` keeps two CPU cores busy.

Controls that tell the mechanisms apart (implemented here, not as package options):

- ``kd_only``: KDRL with every advantage set to zero after the batch is built, so only the teacher KL
  term trains the student (on-policy KD, no reward).
- ``kdrl beta_kd=1``: KDRL with ten times the default KL weight (0.1), with both teachers: how much a
  stronger additive imitation term gains with a right teacher and loses with a wrong one.
- ``grpo_shuffled``: GRPO with the batch's rewards permuted at random across all its samples before the
  group advantages are computed (same reward statistics, no link between a response and its reward).

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
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlad_ds.tasks import arith  # noqa: E402

CACHE = Path(os.environ.get("RLAD_CACHE", Path.home() / ".cache" / "rlad_ds")) / "demo"
MISALIGNED_VERSION = 2

# Run time per mode: the full grid runs the demo recipe's 60 steps (48 runs, about 23 minutes on 2 cores once
# the models are cached); --quick is a smoke run of the whole pipeline.
MODES = {
    "full": dict(steps=60, seeds=3, sweep_seeds=3, eval_size=400, curve_size=400, eval_every=10),
    "quick": dict(steps=10, seeds=1, sweep_seeds=1, eval_size=200, curve_size=200, eval_every=5),
}
SWEEP_ALPHAS = (0.1, 0.3, 0.7, 0.9)  # 0.5 is the main RLAD run


# ---- pure pieces (unit-tested in tests/test_study.py) ---------------------------------------------------------------

def misaligned_solution(example: dict) -> str:
    """The misaligned teacher's worked solution: when the units column carries, the tens column adds it twice."""
    a, b, carry, steps, digits = example["a"], example["b"], 0, [], []
    for column in range(3):
        da, db = a % 10, b % 10
        total = da + db + carry + (carry if column == 1 else 0)
        steps.append(f"{da}+{db}+{carry}={total:02d}")
        digits.append(total % 10)
        carry, a, b = total // 10, a // 10, b // 10
    return "|".join(steps) + f"|>{carry}{digits[2]}{digits[1]}{digits[0]}"


def carry_subset(example: dict) -> str:
    """'carry' when the units column carries (the misaligned teacher is wrong there), else 'no_carry'."""
    return "carry" if example["a"] % 10 + example["b"] % 10 >= 10 else "no_carry"


def aggregate(values: list[float]) -> dict:
    """Mean, sample std (ddof 1; 0 for one value), min, max and n of per-seed values."""
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def format_agg(agg: dict) -> str:
    """'0.642 ± 0.031 (0.610-0.670)' or '0.642' for a single value; 'n/a' when empty."""
    if not agg["n"]:
        return "n/a"
    if agg["n"] == 1:
        return f"{agg['mean']:.3f}"
    return f"{agg['mean']:.3f} ± {agg['std']:.3f} ({agg['min']:.3f}-{agg['max']:.3f})"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells, header has {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def subset_accuracy(scores: list[float], examples: list[dict], subset=carry_subset) -> dict[str, float]:
    """Accuracy per subset of `examples` (and 'all')."""
    groups: dict[str, list[float]] = {}
    for score, example in zip(scores, examples):
        groups.setdefault(subset(example), []).append(score)
    out = {name: sum(v) / len(v) for name, v in sorted(groups.items())}
    out["all"] = sum(scores) / max(len(scores), 1)
    return out


# ---- the run grid --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    name: str          # row label, e.g. "rlad a=0.5"
    group: str         # main / sweep / misaligned
    method: str        # trainer method
    seed: int
    teacher: str = "aligned"
    alpha: float = 0.5
    control: str | None = None  # kd_only / shuffled
    adaptive: bool = False
    beta_kd: float = 0.1  # KDRL's KL weight (the trainer's default)


def build_jobs(seeds: int, sweep_seeds: int) -> list[Job]:
    jobs = []
    teacher_runs = [("kd only (kdrl, A=0)", "kdrl", "kd_only", 0.1), ("kdrl", "kdrl", None, 0.1),
                    ("kdrl beta_kd=1", "kdrl", None, 1.0), ("rlad a=0.5", "rlad", None, 0.1)]
    for seed in range(seeds):
        jobs += [Job("grpo", "main", "grpo", seed),
                 Job("grpo shuffled rewards", "main", "grpo", seed, control="shuffled"),
                 Job("rlad adaptive alpha", "main", "rlad", seed, adaptive=True),
                 Job("sft (offline distill)", "main", "sft", seed)]
        for group, teacher in (("main", "aligned"), ("misaligned", "misaligned")):
            jobs += [Job(name, group, method, seed, teacher=teacher, control=control, beta_kd=beta)
                     for name, method, control, beta in teacher_runs]
    for seed in range(sweep_seeds):
        for alpha in SWEEP_ALPHAS:
            jobs.append(Job(f"rlad a={alpha}", "sweep", "rlad", seed, alpha=alpha))
    # Longest first (sft generates with the teacher), so the queue ends with short jobs.
    return sorted(jobs, key=lambda j: (j.method != "sft", j.seed))


# ---- the misaligned teacher ------------------------------------------------------------------------------------------

def prepare_misaligned_teacher(cache_dir: Path, seed: int = 0, progress: bool = True) -> Path:
    """The misaligned teacher's HF dir: demo teacher architecture + SFT recipe on `misaligned_solution` targets."""
    from rlad_ds import demo

    recipe = demo.DEFAULT_RECIPE
    blob = json.dumps({"teacher": dataclasses.asdict(recipe.teacher), "sft": dataclasses.asdict(recipe.teacher_sft),
                       "seed": seed, "version": MISALIGNED_VERSION, "demo_version": demo.FORMAT_VERSION,
                       "rule": "tens column counts the units carry twice", "alphabet": arith.ALPHABET,
                       "template": demo.DEMO_CHAT_TEMPLATE}, sort_keys=True)

    def complete(root: Path) -> bool:
        return (root / "info.json").is_file() and (root / "teacher" / "config.json").is_file()

    def build(tmp: Path) -> None:
        tokenizer = demo.demo_tokenizer()
        model = demo.build_model(recipe.teacher, tokenizer, seed * 1000 + 7)
        start = time.perf_counter()
        with demo._threads(1):
            losses = demo.train_sft(model, tokenizer, recipe.teacher_sft, seed * 1000 + 7, progress,
                                    desc="misaligned teacher SFT", solution=misaligned_solution)
        info = {"rule": "when the units column carries, the tens column counts the carry twice",
                "sft_steps": len(losses), "sft_seconds": round(time.perf_counter() - start, 1),
                "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4)}
        test = arith.generate("test", 256, seed)
        for name in ("carry", "no_carry"):
            part = [e for e in test if carry_subset(e) == name]
            info[f"heldout_greedy_{name}"] = demo.evaluate_accuracy(model, tokenizer, part, greedy=True)
            info[f"heldout_examples_{name}"] = len(part)
        model.save_pretrained(tmp / "teacher", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "teacher")
        (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")

    name = f"arith-misaligned-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    return demo.build_cached(Path(cache_dir), name, complete, build) / "teacher"


# ---- a worker process ------------------------------------------------------------------------------------------------

_STATE: dict = {}


class _ShuffledRewards:
    """Wraps a RewardRunner; while `active`, the scores of each batch come back permuted at random."""

    def __init__(self, inner, seed: int):
        self.inner, self.rng, self.active = inner, random.Random(seed), False

    def run(self, completions, examples):
        result = self.inner.run(completions, examples)
        if self.active:
            self.rng.shuffle(result.scores)
        return result

    def close(self):
        pass


def _trainer_class():
    from rlad_ds.trainer import Trainer

    class StudyTrainer(Trainer):
        control: str | None = None

        def make_batch(self, examples, timer):
            if self.control == "shuffled":
                self.rewards.active = True
                try:
                    return super().make_batch(examples, timer)
                finally:
                    self.rewards.active = False
            batch, stats = super().make_batch(examples, timer)
            if self.control == "kd_only":
                batch.advantages = batch.advantages.zero_()
            return batch, stats

    return StudyTrainer


def _worker_init(paths: dict, threads: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    logging.getLogger("deepspeed").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    from rlad_ds.main import _single_process_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(key, None)
    _single_process_env()
    import deepspeed

    deepspeed.init_distributed(verbose=False)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    from rlad_ds.models import load_tokenizer
    from rlad_ds.rewards import RewardRunner

    _STATE.update(paths=paths, tokenizer=load_tokenizer(paths["student"]), rewards=RewardRunner("arith", workers=1))


def _config(job: Job, mode: dict):
    from rlad_ds.config import Config
    from rlad_ds.main import apply_demo_defaults

    cfg = Config()
    apply_demo_defaults(cfg)  # the demo recipe: arith, 48 new tokens, 16 prompts x G=8, lr 1e-5, no offload
    cfg.train.max_steps, cfg.train.seed, cfg.train.report_to = mode["steps"], job.seed, "none"
    cfg.train.eval_steps, cfg.train.save_steps = 0, 0
    cfg.data.train_size = 4000
    cfg.loss.method, cfg.loss.alpha, cfg.loss.adaptive_alpha = job.method, job.alpha, job.adaptive
    cfg.loss.beta_kd = job.beta_kd
    return cfg


def _eval_scores(trainer, examples: list[dict], rollout=None) -> list[float]:
    """Greedy per-example scores of the student (or `rollout`'s model) on `examples` (world size 1)."""
    import torch
    from deepspeed.runtime.rollout import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=trainer.cfg.rollout.max_new_tokens, temperature=0.0,
                              n_samples_per_prompt=1)
    with torch.no_grad():
        out = (rollout or trainer.rollout).generate(trainer.encode_prompts(examples), sampling)
    return list(_STATE["rewards"].run(trainer.completions(out), examples).scores)


def _load_eval(mode: dict) -> list[dict]:
    from rlad_ds.config import DataConfig
    from rlad_ds.data import load_eval_examples

    return load_eval_examples(DataConfig(task="arith"), _STATE["tokenizer"], size=mode["eval_size"], seed=0)


def _setup(job: Job, mode: dict):
    import torch

    from rlad_ds.data import load_train_examples

    cfg = _config(job, mode)
    random.seed(job.seed)
    torch.manual_seed(job.seed)
    paths = _STATE["paths"]
    trainer = _trainer_class()(cfg)
    trainer.control = job.control
    teacher = paths["misaligned_teacher"] if job.teacher == "misaligned" else paths["teacher"]
    trainer.setup(Path(paths["student"]), Path(teacher), "arith",
                  list(load_train_examples(cfg.data, _STATE["tokenizer"], seed=job.seed)), [], _STATE["tokenizer"])
    trainer.rewards.close()  # one shared runner per worker instead of one per run
    trainer.rewards = _ShuffledRewards(_STATE["rewards"], 10_000 + job.seed) if job.control == "shuffled" \
        else _STATE["rewards"]
    return trainer


def run_references(mode: dict) -> dict:
    """Greedy held-out scores of the initial student and of both teachers (same eval set and code as the runs)."""
    from rlad_ds.rollout import PerLayerRollout

    examples = _load_eval(mode)
    out = {}
    for teacher in ("aligned", "misaligned"):
        trainer = _setup(Job("ref", "ref", "kdrl", 0, teacher=teacher), mode)
        if teacher == "aligned":
            out["student_before"] = _eval_scores(trainer, examples)
        out[f"teacher_{teacher}"] = _eval_scores(trainer, examples,
                                                 PerLayerRollout(trainer.teacher.engine, trainer.tokenizer))
    return {"scores": out, "examples": [{"a": e["a"], "b": e["b"]} for e in examples]}


def run_job(job_and_mode) -> dict:
    job, mode = job_and_mode
    job = Job(**job)
    start = time.perf_counter()
    examples = _load_eval(mode)
    curve_examples = examples[:mode["curve_size"]]
    trainer = _setup(job, mode)
    setup_s = time.perf_counter() - start
    curve, train_acc, alphas, step_s, bad = [], [], [], [], 0
    for step in range(mode["steps"]):
        metrics = trainer.train_step(step)
        trainer.step = step + 1
        bad += not metrics["finite"]
        train_acc.append(metrics["accuracy"])
        alphas.append(metrics["alpha"])
        step_s.append(round(metrics["time/step"], 3))
        if (step + 1) % mode["eval_every"] == 0 and step + 1 < mode["steps"]:
            curve.append([step + 1, subset_accuracy(_eval_scores(trainer, curve_examples), curve_examples)])
    final = _eval_scores(trainer, examples)
    curve.append([mode["steps"], subset_accuracy(final[:len(curve_examples)], curve_examples)])
    result = {"job": dataclasses.asdict(job), "final": sum(final) / len(final),
              "subsets": subset_accuracy(final, examples), "curve": curve, "train_accuracy": train_acc,
              "alpha_trace": alphas, "step_seconds": step_s, "non_finite_steps": bad, "setup_s": round(setup_s, 1),
              "seconds": round(time.perf_counter() - start, 1), "pid": os.getpid()}
    del trainer
    return result


def _task(item):
    kind, payload = item
    return run_references(payload) if kind == "refs" else run_job(payload)


# ---- the report ------------------------------------------------------------------------------------------------------

def summarise(results: list[dict], refs: dict, mode: dict) -> dict:
    """Per (group, name): per-seed final accuracies, per-subset values, aggregated; curves averaged over seeds."""
    from collections import defaultdict

    ref_examples = refs["examples"]
    reference = {k: subset_accuracy(v, ref_examples) for k, v in refs["scores"].items()}
    rows = defaultdict(list)
    for r in results:
        rows[(r["job"]["group"], r["job"]["name"])].append(r)
    summary = {}
    for (group, name), runs in rows.items():
        runs = sorted(runs, key=lambda r: r["job"]["seed"])
        subsets = sorted({k for r in runs for k in r["subsets"]})
        steps = [s for s, _ in runs[0]["curve"]]
        curve = [[s, {k: statistics.fmean(r["curve"][i][1][k] for r in runs) for k in runs[0]["curve"][i][1]}]
                 for i, s in enumerate(steps)]
        train = [statistics.fmean(r["train_accuracy"][i] for r in runs) for i in range(len(runs[0]["train_accuracy"]))]
        summary[f"{group}/{name}"] = {
            "group": group, "name": name, "seeds": [r["job"]["seed"] for r in runs],
            "final": aggregate([r["final"] for r in runs]), "per_seed": [r["final"] for r in runs],
            "subsets": {k: aggregate([r["subsets"][k] for r in runs]) for k in subsets},
            "curve_mean": curve, "train_accuracy_mean": train,
            "final_alpha_mean": statistics.fmean(r["alpha_trace"][-1] for r in runs),
            "seconds_mean": statistics.fmean(r["seconds"] for r in runs)}
    return {"reference": reference, "rows": summary}


MAIN_ORDER = ["grpo", "grpo shuffled rewards", "kd only (kdrl, A=0)", "kdrl", "kdrl beta_kd=1", "rlad a=0.5",
              "rlad adaptive alpha", "sft (offline distill)"]


def tables(summary: dict, mode: dict, eval_size: int) -> str:
    ref, rows = summary["reference"], summary["rows"]
    out = [f"Held-out accuracy, greedy, {eval_size} fixed test-split prompts; after {mode['steps']} steps "
           f"(16 prompts x G=8 per step). Cells: mean ± sample std (min-max) over seeds.", ""]
    main_rows = [["student before (initial)", "-", f"{ref['student_before']['all']:.3f}", "-"],
                 ["teacher (aligned, reference)", "-", f"{ref['teacher_aligned']['all']:.3f}", "-"]]
    for name in MAIN_ORDER:
        row = rows.get(f"main/{name}")
        if row:
            main_rows.append([name, str(len(row["seeds"])), format_agg(row["final"]),
                              " / ".join(f"{v:.3f}" for v in row["per_seed"])])
    out += ["### Aligned teacher (the demo teacher)", "",
            render_table(["method", "seeds", "held-out accuracy", "per seed"], main_rows), ""]
    sweep = []
    for alpha in sorted(set(SWEEP_ALPHAS) | {0.5}):
        key = "main/rlad a=0.5" if alpha == 0.5 else f"sweep/rlad a={alpha}"
        row = rows.get(key)
        if row:
            sweep.append([f"{alpha}", str(len(row["seeds"])), format_agg(row["final"])])
    if "main/grpo" in rows:
        sweep.append(["1.0 (= grpo)", str(len(rows["main/grpo"]["seeds"])), format_agg(rows["main/grpo"]["final"])])
    out += ["### RLAD alpha sweep (aligned teacher; alpha = 1 is GRPO)", "",
            render_table(["alpha", "seeds", "held-out accuracy"], sweep), ""]
    parts = ("all", "carry", "no_carry")
    mis = [["student before (initial)", "-"] + [f"{ref['student_before'][k]:.3f}" for k in parts],
           ["teacher (misaligned, reference)", "-"] + [f"{ref['teacher_misaligned'][k]:.3f}" for k in parts]]
    for key, label in [("main/grpo", "grpo (no teacher)"), ("misaligned/kd only (kdrl, A=0)", "kd only (kdrl, A=0)"),
                       ("misaligned/kdrl", "kdrl"), ("misaligned/kdrl beta_kd=1", "kdrl beta_kd=1"),
                       ("misaligned/rlad a=0.5", "rlad a=0.5")]:
        row = rows.get(key)
        if row:
            mis.append([label, str(len(row["seeds"]))] + [format_agg(row["subsets"][k]) if k != "all"
                                                          else format_agg(row["final"])
                                                          for k in parts])
    n_carry = sum(carry_subset(e) == "carry" for e in summary.get("examples", []))
    out += ["### Misaligned teacher (wrong whenever the units column carries)", "",
            f"`carry`: the units digits sum to 10 or more ({n_carry} of {eval_size} prompts; the teacher is wrong "
            "there), `no_carry`: they do not (the teacher is right).", "",
            render_table(["method", "seeds", "all", "carry (teacher wrong)", "no_carry (teacher right)"], mis), ""]
    return "\n".join(out)


def plot(summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, rows = summary["reference"], summary["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    misaligned = ["main/grpo", "misaligned/kd only (kdrl, A=0)", "misaligned/kdrl", "misaligned/kdrl beta_kd=1",
                  "misaligned/rlad a=0.5"]
    panels = [("aligned teacher: held-out accuracy (greedy), all prompts", [f"main/{n}" for n in MAIN_ORDER], "all"),
              ("alpha sweep (aligned teacher), all prompts",
               [f"sweep/rlad a={a}" for a in SWEEP_ALPHAS[:2]] + ["main/rlad a=0.5"]
               + [f"sweep/rlad a={a}" for a in SWEEP_ALPHAS[2:]] + ["main/grpo"], "all"),
              ("misaligned teacher: 'carry' prompts (units column carries, teacher wrong)", misaligned, "carry"),
              ("misaligned teacher: 'no_carry' prompts (teacher right)", misaligned, "no_carry")]
    for ax, (title, keys, part) in zip(axes.flat, panels):
        before = ref["student_before"][part]
        for key in keys:
            row = rows.get(key)
            if not row:
                continue
            xs = [0] + [s for s, _ in row["curve_mean"]]
            ys = [before] + [v[part] for _, v in row["curve_mean"]]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{row['name']} (n={len(row['seeds'])})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy, mean over seeds")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---- where the student is unsure ------------------------------------------------------------------------------------

def token_confidence(student_dir: str, examples: list[dict]) -> list[dict]:
    """Per position of the worked solution: the student's mean probability of the correct token (teacher forcing).

    On-policy KD on sampled tokens moves a token's log-prob with a gradient scaled by (1 - p): a teacher can
    only pull the student where the student is unsure, which is where a misaligned teacher has to be wrong.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlad_ds.demo import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    width = len(arith.solution(examples[0]))
    sums, below = [0.0] * width, [0] * width
    for example in examples:
        prompt_ids = tokenizer(render_prompt(tokenizer, arith.prompt(example)), add_special_tokens=False).input_ids
        target_ids = tokenizer(arith.solution(example), add_special_tokens=False).input_ids
        if len(target_ids) != width:
            raise ValueError("token_confidence expects one token per character of the worked solution")
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([prompt_ids + target_ids])).logits[0].float(), -1)
        for i, token in enumerate(target_ids):
            p = probs[len(prompt_ids) + i - 1, token].item()
            sums[i] += p
            below[i] += p < 0.9
    sample = arith.solution(examples[0])
    return [{"position": i, "example_char": sample[i], "mean_p": sums[i] / len(examples),
             "frac_below_0.9": below[i] / len(examples)} for i in range(width)]


# ---- main ------------------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, 1 seed (<= 5 min on 2 cores)")
    parser.add_argument("--out", default="docs/study", help="output prefix: <out>.json, <out>.png, <out>.tables.md")
    parser.add_argument("--workers", type=_positive_int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="override the mode's steps")
    parser.add_argument("--seeds", type=_positive_int, default=None, help="override the mode's seeds")
    parser.add_argument("--sweep_seeds", type=_positive_int, default=None, help="override the mode's sweep seeds")
    parser.add_argument("--confidence", action="store_true",
                        help="only print the initial student's per-position confidence in the correct solution")
    args = parser.parse_args(argv)
    if args.confidence:
        from rlad_ds.demo import prepare_demo

        student = prepare_demo(CACHE, seed=0)["student"]
        rows = token_confidence(str(student), arith.generate("test", 300, 0))
        cells = [[str(r["position"]), f"`{r['example_char']}`".replace("|", "\\|"), f"{r['mean_p']:.3f}",
                  f"{r['frac_below_0.9']:.2f}"] for r in rows]
        print(render_table(["position", "char (first example)", "mean p(correct)", "fraction p < 0.9"], cells))
        return 0
    mode = dict(MODES["quick" if args.quick else "full"])
    for key in ("steps", "seeds", "sweep_seeds"):
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    wall = time.perf_counter()
    from rlad_ds.demo import demo_info, prepare_demo

    demo_paths = prepare_demo(CACHE, seed=0)
    paths = {k: str(v) for k, v in demo_paths.items()}
    paths["misaligned_teacher"] = str(prepare_misaligned_teacher(CACHE))
    misaligned_info = json.loads((Path(paths["misaligned_teacher"]).parent / "info.json").read_text())
    prep_s = time.perf_counter() - wall
    jobs = build_jobs(mode["seeds"], mode["sweep_seeds"])
    items = [("refs", mode)] + [("job", (dataclasses.asdict(j), mode)) for j in jobs]
    print(f"study: {len(jobs)} runs x {mode['steps']} steps on {args.workers} workers "
          f"(prepared models in {prep_s:.0f} s)", flush=True)
    import multiprocessing as mp

    results, refs = [], None
    with mp.get_context("spawn").Pool(args.workers, initializer=_worker_init, initargs=(paths, 1)) as pool:
        for out in pool.imap_unordered(_task, items):
            if "scores" in out:
                refs = out
                print(f"  [{time.perf_counter() - wall:6.0f} s] references done", flush=True)
                continue
            results.append(out)
            j = out["job"]
            print(f"  [{time.perf_counter() - wall:6.0f} s] {len(results)}/{len(jobs)} {j['group']}/{j['name']} "
                  f"seed {j['seed']}: {out['final']:.3f} ({out['seconds']:.0f} s)", flush=True)
    wall_s = time.perf_counter() - wall
    summary = summarise(results, refs, mode)
    summary["examples"] = refs["examples"]
    text = tables(summary, mode, mode["eval_size"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    record = {"command": " ".join(["python", "benchmarks/study.py"] + (argv if argv is not None else sys.argv[1:])),
              "mode": mode, "workers": args.workers, "wall_seconds": round(wall_s, 1),
              "prepare_seconds": round(prep_s, 1), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                            "processor": platform.processor(),
                                                            "torch": torch.__version__},
              "demo": demo_info(demo_paths), "misaligned_teacher": misaligned_info, "summary": summary, "runs": results}
    Path(f"{out}.json").write_text(json.dumps(record, indent=1) + "\n")
    Path(f"{out}.tables.md").write_text(text + f"\nWall time: {wall_s:.0f} s ({args.workers} workers).\n")
    plot(summary, Path(f"{out}.png"))
    print(text)
    print(f"wall time {wall_s:.0f} s; wrote {out}.json, {out}.png, {out}.tables.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
