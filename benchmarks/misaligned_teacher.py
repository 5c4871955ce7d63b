"""The study's misaligned teacher: the demo teacher's architecture and SFT recipe, trained on worked solutions with
one systematic bug (when the units column carries, the tens column counts that carry twice), so that it is wrong
exactly on the `carry` prompts and right on the others. Built once and cached beside the demo's models."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path

from benchmarks.study_report import carry_subset
from rlad_ds.tasks import arith

MISALIGNED_VERSION = 2


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


def prepare_misaligned_teacher(cache_dir: Path, seed: int = 0, progress: bool = True) -> Path:
    """The misaligned teacher's HF dir: demo teacher architecture + SFT recipe on `misaligned_solution` targets."""
    from rlad_ds.demo import cache, recipe

    spec = recipe.DEFAULT_RECIPE
    key = {
        "teacher": dataclasses.asdict(spec.teacher),
        "sft": dataclasses.asdict(spec.teacher_sft),
        "seed": seed,
        "version": MISALIGNED_VERSION,
        "demo_version": recipe.FORMAT_VERSION,
        "rule": "tens column counts the units carry twice",
        "alphabet": arith.ALPHABET,
        "template": recipe.DEMO_CHAT_TEMPLATE,
    }

    def complete(root: Path) -> bool:
        return (root / "info.json").is_file() and (root / "teacher" / "config.json").is_file()

    name = f"arith-misaligned-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
    build = functools.partial(_build, spec=spec, seed=seed, progress=progress)
    return cache.build_cached(Path(cache_dir), name, complete, build) / "teacher"


def _build(tmp: Path, spec, seed: int, progress: bool) -> None:
    """Train the misaligned teacher and write it, with info.json (its SFT and held-out accuracy per subset)."""
    from rlad_ds.demo import cache, recipe, sft

    tokenizer = recipe.demo_tokenizer()
    model = recipe.build_model(spec.teacher, tokenizer, seed * 1000 + 7)
    start = time.perf_counter()
    with cache.torch_threads(1):
        losses = sft.train_sft(
            model,
            tokenizer,
            spec.teacher_sft,
            seed * 1000 + 7,
            progress,
            desc="misaligned teacher SFT",
            solution=misaligned_solution,
        )
    info = {
        "rule": "when the units column carries, the tens column counts the carry twice",
        "sft_steps": len(losses),
        "sft_seconds": round(time.perf_counter() - start, 1),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
    }
    test = arith.generate("test", 256, seed)
    for name in ("carry", "no_carry"):
        part = [e for e in test if carry_subset(e) == name]
        info[f"heldout_greedy_{name}"] = sft.accuracy(model, tokenizer, part, greedy=True)
        info[f"heldout_examples_{name}"] = len(part)
    model.save_pretrained(tmp / "teacher", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "teacher")
    (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
