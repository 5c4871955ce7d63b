"""The demo's SFT teacher and student: shipped with the package for the demo's recipe, built once per recipe and
machine and reused for any other (or when asked): `prepare_demo`.

A build is named ``arith-<key>``, where `key` hashes the recipe, the seed, the tokenizer and a format version
(`rlad_ds.demo.recipe.recipe_key`), so changing any of them trains anew. The demo recipe's build is shipped in
``rlad_ds/demo/models/arith-<key>/`` (its files pinned by SHA256SUMS, checked on use): an SFT build's floats
differ between CPUs, so the demo starts from the same models on every machine. Other builds are written under
``cache_dir/arith-<key>/``, in a temporary directory that is renamed into place only when complete, under a file
lock, so an interrupted run never leaves a half cache that would be reused and concurrent callers (e.g. two ranks)
train once. ``demo.json`` beside the model dirs records the recipe, parameter counts, timings and held-out
accuracies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from rlad_ds.demo.recipe import (
    DEFAULT_RECIPE,
    FORMAT_VERSION,
    SHIPPED_SHA256SUMS,
    DemoRecipe,
    build_model,
    count_parameters,
    demo_tokenizer,
    recipe_key,
)
from rlad_ds.demo.sft import accuracy, train_sft
from rlad_ds.errors import ConfigError
from rlad_ds.tasks import arith

SHIPPED_ROOT = Path(__file__).resolve().parent / "models"
SUMS = "SHA256SUMS"


def cache_dir(root: str | Path | None = None) -> Path:
    """Where the demo's models live under a `--cache_dir` root (None: that field's default)."""
    if root is None:
        from rlad_ds.config.schema import ModelConfig

        root = ModelConfig.cache_dir
    return Path(root).expanduser() / "demo"


@contextlib.contextmanager
def torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(root: Path) -> bool:
    return (root / "demo.json").is_file() and all((root / r / "config.json").is_file() for r in ("student", "teacher"))


def _build(root: Path, recipe: DemoRecipe, seed: int, progress: bool) -> None:
    """Train and save both models plus demo.json into `root` (a fresh temporary dir)."""
    tokenizer = demo_tokenizer()
    info = {
        "recipe": dataclasses.asdict(recipe),
        "seed": seed,
        "format_version": FORMAT_VERSION,
        "tokenizer_size": len(tokenizer),
    }
    test = arith.generate("test", recipe.eval_examples, seed) if recipe.eval_examples else []
    for offset, role in enumerate(("teacher", "student")):
        spec, sft = getattr(recipe, role), getattr(recipe, f"{role}_sft")
        model = build_model(spec, tokenizer, seed * 1000 + offset)
        stop = None
        if role == "student" and recipe.student_target is not None:
            check = arith.generate("train", recipe.student_check_examples, seed + 10_000)

            def reached_target(m, check=check):
                return accuracy(m, tokenizer, check, greedy=False, seed=seed) >= recipe.student_target

            stop = reached_target
        start = time.perf_counter()
        losses = train_sft(
            model,
            tokenizer,
            sft,
            seed * 1000 + offset,
            progress,
            desc=f"demo SFT {role}",
            stop=stop,
            check_every=recipe.student_check_every,
        )
        record = {
            "parameters": count_parameters(model),
            "sft_steps": len(losses),
            "sft_seconds": round(time.perf_counter() - start, 1),
            "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        }
        if test:
            start = time.perf_counter()
            record["heldout_greedy"] = accuracy(model, tokenizer, test, greedy=True, seed=seed)
            record["heldout_sampled_t1"] = accuracy(model, tokenizer, test, greedy=False, seed=seed)
            record["eval_seconds"] = round(time.perf_counter() - start, 1)
        info[role] = record
        model.save_pretrained(root / role, safe_serialization=True)
        tokenizer.save_pretrained(root / role)
    (root / "demo.json").write_text(json.dumps(info, indent=2) + "\n")


def build_cached(cache_dir: Path, name: str, complete, build) -> Path:
    """`cache_dir / name`, made once by `build(tmp_dir)` and reused while `complete(root)` holds.

    Concurrent callers wait on a file lock while one builds; the result appears by an atomic rename, so a
    killed build never leaves a half-written `name` (its temporary dir is removed by the next build).
    """
    root = cache_dir / name
    if complete(root):
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{name}.lock"):
        if complete(root):  # another process built it while we waited
            return root
        for stale in cache_dir.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            if root.exists():  # an incomplete leftover from a run that predates the lock
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _sums(root: Path) -> str:
    """A SHA256SUMS file's text for every file under `root` (`sha256sum -c SHA256SUMS` checks it)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS)
    return "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n" for p in files)


def shipped_build(recipe: DemoRecipe = DEFAULT_RECIPE, seed: int = 0) -> Path | None:
    """The build of `recipe` shipped with the package, its files checked against the pinned SHA256SUMS; None when
    the package ships no build of this recipe and seed."""
    root = SHIPPED_ROOT / f"arith-{recipe_key(recipe, seed)}"
    if not root.is_dir():
        return None
    recorded = (root / SUMS).read_bytes() if (root / SUMS).is_file() else b""
    if hashlib.sha256(recorded).hexdigest() != SHIPPED_SHA256SUMS or _sums(root).encode() != recorded:
        raise ConfigError(
            f"the demo's models shipped in {root} are damaged or not the pinned ones (sha256sum -c {SUMS} there "
            f"says which file); reinstall rlad_ds, or pass --demo_build to train them on this machine"
        )
    return root


def ship(build: Path) -> str:
    """Copy a build into the package as the shipped one (a maintainer's step after a recipe change); returns the
    sha256 of its SHA256SUMS, to pin as `SHIPPED_SHA256SUMS` in recipe.py."""
    target = SHIPPED_ROOT / build.name
    for old in SHIPPED_ROOT.glob("arith-*"):
        shutil.rmtree(old)
    shutil.copytree(build, target)
    (target / SUMS).write_text(_sums(target))
    return hashlib.sha256((target / SUMS).read_bytes()).hexdigest()


def prepare_demo(
    cache_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    recipe: DemoRecipe = DEFAULT_RECIPE,
    num_threads: int | None = None,
    shipped: bool = True,
) -> dict[str, Path]:
    """HF dirs of the demo's SFT student and teacher: the package's own for the demo recipe (unless `shipped` is
    False), else trained on the first call and cached after.

    `num_threads` (default: every CPU) applies only while training. ``demo.json`` beside the returned dirs
    records parameter counts, SFT time and held-out accuracy (greedy and sampled at temperature 1).
    """
    root = shipped_build(recipe, seed) if shipped else None
    if root is not None:
        return {"student": root / "student", "teacher": root / "teacher"}
    cache_dir = Path(cache_dir)
    name = f"arith-{recipe_key(recipe, seed)}"

    def build(tmp: Path) -> None:
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(
                f"rlad_ds demo: training the SFT teacher and student once (about 2-3 min on 2 CPU cores), "
                f"cached in {cache_dir / name}"
            )
        with torch_threads(num_threads or os.cpu_count()):
            _build(tmp, recipe, seed, progress)

    root = build_cached(cache_dir, name, _complete, build)
    return {"student": root / "student", "teacher": root / "teacher"}


def demo_info(paths: dict[str, Path]) -> dict:
    """The demo.json record of a `prepare_demo` result."""
    return json.loads((Path(paths["teacher"]).parent / "demo.json").read_text())
