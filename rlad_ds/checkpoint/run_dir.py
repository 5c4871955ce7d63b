"""The run directory's policy: what makes two runs the same run (`run_identity`), which checkpoint `--resume` takes,
an output dir that holds another run, and `--overwrite_output_dir` moving an old run aside (never deleting it, and
never a directory that holds no run)."""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from rlad_ds.checkpoint.collective import verify_together
from rlad_ds.checkpoint.lock import LOCK
from rlad_ds.checkpoint.manifest import MARKER, checkpoint_root, complete_checkpoints, marker_step, read_marker, verify
from rlad_ds.distributed import env_rank, world
from rlad_ds.errors import ConfigError, reason_line

logger = logging.getLogger("rlad_ds")
RUN_RECORD = "run_config.json"  # written by every run before its first step: what makes a dir a run's
EXPORT_DIR = "student_hf"  # in every finished run's output dir: the trained student as a transformers model dir


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    """The config fields (section.field) in which two run identities differ, with both values."""
    keys = {(s, k) for d in (old, new) for s, v in d.items() for k in (v if isinstance(v, dict) else [None])}

    def get(d, s, k):
        return d.get(s, "<absent>") if k is None else (d.get(s) or {}).get(k, "<absent>")

    def show(value) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 40 else text[:37] + "..."

    found = sorted((s if k is None else f"{s}.{k}", get(old, s, k), get(new, s, k)) for s, k in keys)
    found = [(name, a, b) for name, a, b in found if a != b]
    shown = [f"{name}: {show(a)} there, {show(b)} now" for name, a, b in found[:limit]]
    return "; ".join(shown) + (f"; and {len(found) - limit} more" if len(found) > limit else "")


def _same_run(directory: Path, identity: dict | None, explicit: bool) -> None:
    recorded = (read_marker(directory) or {}).get("identity")
    if identity is None or recorded is None or recorded == identity:  # no identity recorded: verify() judges
        return
    fix = (
        "pass the flags of the run that wrote it, or --resume a checkpoint of this run"
        if explicit
        else "choose another --output_dir, or pass --overwrite_output_dir to start afresh (the old run is moved aside)"
    )
    raise ConfigError(
        f"checkpoint {directory} belongs to a different run (it differs in {_differences(recorded, identity)}); {fix}"
    )


def _unfinished(directory: Path, max_steps: int | None) -> Path:
    step = marker_step(directory)
    if max_steps is not None and step >= max_steps:
        output_dir = directory.parent.parent
        export = (
            ""
            if (output_dir / EXPORT_DIR).is_dir()
            else f", export it (no {EXPORT_DIR}/ there) by running the same command with launchers/export.py"
        )
        raise ConfigError(
            f"run in {output_dir} already finished step {step} (--max_steps {max_steps}); raise --max_steps to "
            f"continue it{export}, pass --overwrite_output_dir to run it again from step 0 (the old run is moved "
            f"aside), or choose another --output_dir"
        )
    return directory


def resolve_resume(
    resume: str,
    output_dir: str | Path,
    identity: dict | None = None,
    max_steps: int | None = None,
    check=verify,
    quiet: bool = False,
) -> Path | None:
    """The checkpoint dir `--resume` names: auto = the newest complete one of this run that passes `check` (or
    None), none = None, or a path. Another run's checkpoint, a damaged path and a finished run are refused."""
    if resume == "none":
        return None
    if resume != "auto" and not (Path(resume) / MARKER).is_file():
        raise ConfigError(
            f"--resume {resume}: not a complete checkpoint (no {MARKER} marker); pass a "
            f"checkpoints/step_N dir written by this trainer, auto, or none"
        )
    failed = []
    for path in [Path(resume)] if resume != "auto" else reversed(complete_checkpoints(output_dir)):
        _same_run(path, identity, explicit=resume != "auto")
        problem = check(path)
        if problem is None:
            for bad, why in failed if env_rank() == 0 and not quiet else ():
                logger.warning("%s fails verification (%s); resuming from %s", bad.name, why, path.name)
            return _unfinished(path, max_steps)
        failed.append((path, problem))
    if failed and resume != "auto":
        raise ConfigError(f"--resume {resume} fails verification ({failed[0][1]}); resume from another checkpoint")
    if failed:
        raise ConfigError(
            f"no checkpoint in {checkpoint_root(output_dir)} verifies ({failed[0][0].name}: "
            f"{failed[0][1]}); pass --overwrite_output_dir to start again (the old run is moved aside)"
        )
    return None


def resume_point(cfg, together: bool = False) -> Path | None:
    """`resolve_resume` for a run: --overwrite_output_dir starts from step 0, so an explicit path contradicts it.

    Before the process group (every rank alone): the refusals, and sizes only. `together` (collective, after it):
    the same choice with the checksums (under --checkpoint_verify sha256) shared out among the ranks."""
    train = cfg.train
    if train.overwrite_output_dir:
        if train.resume not in ("auto", "none"):
            raise ConfigError(
                f"--resume {train.resume} contradicts --overwrite_output_dir (a fresh start from step 0,"
                f" the old run moved aside); drop one of the two"
            )
        return None
    digests = train.checkpoint_verify == "sha256"
    check = partial(verify_together, digests=digests) if together else partial(verify, digests=False)
    return resolve_resume(train.resume, train.output_dir, run_identity(cfg), train.max_steps, check, not together)


def not_a_run(output_dir: str | Path) -> str | None:
    """Why --overwrite_output_dir may not move OUTPUT_DIR aside (it holds no run, or it is where this process runs),
    or None: only a directory that holds a run is ever moved."""
    out = Path(output_dir).resolve()
    if not out.is_dir():
        return None
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        return f"--output_dir {output_dir} is the current directory or holds it; run from elsewhere or choose another"
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if others and not (out / RUN_RECORD).is_file():
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (
            f"--output_dir {output_dir} holds files but no run (no {RUN_RECORD}: {shown}); --overwrite_output_dir "
            f"moves aside only a run's dir: choose a new or empty --output_dir"
        )
    return None


def move_aside(output_dir: str | Path) -> Path | None:
    """--overwrite_output_dir: rank 0 renames OUTPUT_DIR, if it holds a run, to OUTPUT_DIR.old-<time> (nothing is
    deleted) while the others wait; collective, before anything of this run is written. Returns the new path."""
    from deepspeed.accelerator import get_accelerator

    out, target, failed, message = Path(output_dir).absolute(), None, 0.0, None
    others = [p for p in out.iterdir() if p.name != LOCK] if world()[0] == 0 and out.is_dir() else []
    if others:
        target = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        target = target.with_name(f"{target.name}-{os.getpid()}") if target.exists() else target  # same second
        try:
            if (message := not_a_run(output_dir)) is None:
                os.rename(out, target)
                logger.info("--overwrite_output_dir: moved the previous run in %s aside to %s", out, target)
        except OSError as error:
            message = (
                f"cannot move {out} aside to {target} ({reason_line(error)}); fix that or choose another --output_dir"
            )
        failed = float(message is not None)
    if dist.is_available() and dist.is_initialized():  # a flag on this rank's device, which the others agree on
        flag = torch.tensor([failed], device=get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
        dist.all_reduce(flag)
        failed = float(flag.item())
    if failed:
        raise ConfigError(message if world()[0] == 0 else f"rank 0 could not move {out} aside")
    return target


def settle_output_dir(cfg, lock, resume_from: Path | None) -> Path | None:
    """Right after the process group starts (collective): --overwrite_output_dir moves the old run aside (never
    deleted; rank 0's `lock` then takes the new, empty dir), and a checkpoint chosen before is chosen again with the
    checksums shared out among the ranks. Returns the checkpoint to resume, or None."""
    if cfg.train.overwrite_output_dir and move_aside(cfg.train.output_dir) is not None and lock is not None:
        lock.relock()
    return resume_point(cfg, together=True) if resume_from is not None else None


_RESUMABLE = {
    "train": {
        "max_steps",
        "resume",
        "save_steps",
        "keep_last",
        "overwrite_output_dir",
        "report_to",
        "collective_timeout_s",
        "output_dir",
        "save_on_signal",
        "signal_grace_s",
        "max_bad_steps",
        "max_failed_reward_steps",
        "checkpoint_verify",
        "sequence_parallel_size",  # how the ranks share the work, not what is computed
    },
    "rollout": {
        "rollout",
        "vllm_gpu_memory_utilization",
        "vllm_kv_cache_gb",
        "vllm_sleep_level",
        "kv_cache_budget_gb",
    },  # how samples are made
    "model": {"cache_dir", "tiled_mlp_shards", "offload_activations"},
    "eval": {
        "eval_size",
        "eval_steps",
        "eval_dataset",
        "eval_split",
        "eval_samples",
        "eval_k",
        "eval_temperature",
        "eval_top_p",
        "eval_top_k",
        "eval_offload",
    },
}


def run_identity(cfg) -> dict:
    """The config fields that define a run (what `--resume` must match), as JSON-ready values."""
    identity = json.loads(json.dumps(cfg.to_dict()))
    for section, fields in _RESUMABLE.items():
        identity[section] = {k: v for k, v in identity[section].items() if k not in fields}
    return identity


def check_output_dir(cfg) -> None:
    """Refuse an output dir that holds a different run, unless told to overwrite (then it is moved aside later), and
    one that --overwrite_output_dir would have to move aside but holds no run."""
    out = Path(cfg.train.output_dir)
    if cfg.train.overwrite_output_dir:
        if (problem := not_a_run(out)) is not None:
            raise ConfigError(problem)
        return
    if not (out / RUN_RECORD).is_file():
        return
    try:
        previous = json.loads((out / RUN_RECORD).read_text())
    except json.JSONDecodeError:
        raise ConfigError(
            f"--output_dir {out} has an unreadable {RUN_RECORD}; choose another --output_dir or pass "
            f"--overwrite_output_dir"
        ) from None
    identity = run_identity(cfg)
    if previous != identity:
        differences = _differences(previous, identity) if isinstance(previous, dict) else "all of it"
        raise ConfigError(
            f"--output_dir {out} holds a different run (it differs in {differences}); choose another "
            f"--output_dir or pass --overwrite_output_dir"
        )
    if cfg.train.resume == "none" and complete_checkpoints(out):
        raise ConfigError(
            f"--output_dir {out} already has checkpoints of this run; pass --resume auto to continue it or "
            f"--overwrite_output_dir to start again"
        )


def export_source(cfg) -> Path:
    """The checkpoint `launchers/export.py` exports: the run's newest that verifies (or `--resume PATH`), of a run
    with these flags."""
    out = Path(cfg.train.output_dir)
    if not (out / RUN_RECORD).is_file():
        raise ConfigError(f"--output_dir {out} holds no run (no {RUN_RECORD}); pass the --output_dir of a run")
    try:
        previous = json.loads((out / RUN_RECORD).read_text())
    except json.JSONDecodeError:
        previous = None
    if previous != run_identity(cfg):
        differences = _differences(previous, run_identity(cfg)) if isinstance(previous, dict) else "all of it"
        raise ConfigError(
            f"--output_dir {out} holds a run of other flags (it differs in {differences}); export it with the "
            f"flags it was trained with"
        )
    resume = cfg.train.resume if cfg.train.resume not in ("auto", "none") else "auto"
    check = partial(verify, digests=cfg.train.checkpoint_verify == "sha256")
    directory = resolve_resume(resume, out, run_identity(cfg), check=check)
    if directory is None:
        raise ConfigError(f"no checkpoint in {checkpoint_root(out)} to export from (--save_steps -1 writes none)")
    return directory
