"""The run directory's policy: what makes two runs the same run (`run_identity`), which checkpoint `--resume` takes,
an output dir that holds another run, and `--overwrite_output_dir` moving an old run aside (never deleting it)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rlad_ds.checkpoint.manifest import MARKER, checkpoint_root, complete_checkpoints, marker_step, read_marker, verify
from rlad_ds.distributed import env_rank, world
from rlad_ds.errors import ConfigError, reason_line

logger = logging.getLogger("rlad_ds")


def _differences(old: dict, new: dict) -> list[str]:
    """The config fields (section.field) in which two run identities differ."""
    keys = {(s, k) for d in (old, new) for s, v in d.items() for k in (v if isinstance(v, dict) else [None])}

    def get(d, s, k):
        return d.get(s) if k is None else (d.get(s) or {}).get(k, "<absent>")

    return sorted(s if k is None else f"{s}.{k}" for s, k in keys if get(old, s, k) != get(new, s, k))


def _same_run(directory: Path, identity: dict | None) -> None:
    recorded = (read_marker(directory) or {}).get("identity")
    if identity is None or recorded is None or recorded == identity:  # no identity recorded: verify() judges
        return
    raise ConfigError(
        f"checkpoint {directory} belongs to a different run (it differs in "
        f"{', '.join(_differences(recorded, identity)[:5])}); choose another --output_dir, or pass "
        f"--overwrite_output_dir to start afresh (the old run is moved aside)"
    )


def _unfinished(directory: Path, max_steps: int | None) -> Path:
    step = marker_step(directory)
    if max_steps is not None and step >= max_steps:
        raise ConfigError(
            f"run in {directory.parent.parent} already finished step {step} (--max_steps "
            f"{max_steps}); raise --max_steps to continue it, pass --overwrite_output_dir to run it "
            f"again from step 0 (the old run is moved aside), or choose another --output_dir"
        )
    return directory


def resolve_resume(
    resume: str, output_dir: str | Path, identity: dict | None = None, max_steps: int | None = None
) -> Path | None:
    """The checkpoint dir `--resume` names: auto = the newest complete one of this run that verifies (or None),
    none = None, or a path. Another run's checkpoint, a damaged path and a finished run are refused."""
    if resume == "none":
        return None
    if resume != "auto" and not (Path(resume) / MARKER).is_file():
        raise ConfigError(
            f"--resume {resume}: not a complete checkpoint (no {MARKER} marker); pass a "
            f"checkpoints/step_N dir written by this trainer, auto, or none"
        )
    failed = []
    for path in [Path(resume)] if resume != "auto" else reversed(complete_checkpoints(output_dir)):
        _same_run(path, identity)
        problem = verify(path)
        if problem is None:
            for bad, why in failed if env_rank() == 0 else ():
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


def resume_point(cfg) -> Path | None:
    """`resolve_resume` for a run: --overwrite_output_dir starts from step 0, so an explicit path contradicts it."""
    train = cfg.train
    if train.overwrite_output_dir:
        if train.resume not in ("auto", "none"):
            raise ConfigError(
                f"--resume {train.resume} contradicts --overwrite_output_dir (a fresh start from step 0,"
                f" the old run moved aside); drop one of the two"
            )
        return None
    return resolve_resume(train.resume, train.output_dir, run_identity(cfg), train.max_steps)


def move_aside(output_dir: str | Path) -> Path | None:
    """--overwrite_output_dir: rank 0 renames a non-empty OUTPUT_DIR to OUTPUT_DIR.old-<time> (nothing is deleted)
    while the others wait; collective, before anything of this run is written. Returns the new path."""
    from deepspeed.accelerator import get_accelerator

    out, target, failed = Path(output_dir), None, 0.0
    if world()[0] == 0 and out.is_dir() and any(out.iterdir()):
        target = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        target = target.with_name(f"{target.name}-{os.getpid()}") if target.exists() else target  # same second
        try:
            os.rename(out, target)
            logger.info("--overwrite_output_dir: moved the previous run in %s aside to %s", out, target)
        except OSError as error:
            failed = 1.0
            message = (
                f"cannot move {out} aside to {target} ({reason_line(error)}); fix that or choose another --output_dir"
            )
    if dist.is_available() and dist.is_initialized():  # a flag, not objects: no engine has set this rank's device yet
        flag = torch.tensor([failed], device=get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
        dist.all_reduce(flag)
        failed = float(flag.item())
    if failed:
        raise ConfigError(message if world()[0] == 0 else f"rank 0 could not move {out} aside")
    return target


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
        "sequence_parallel_size",  # how the ranks share the work, not what is computed
    },
    "rollout": {
        "rollout",
        "vllm_gpu_memory_utilization",
        "vllm_kv_cache_gb",
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
    """Refuse an output dir that holds a different run, unless told to overwrite (then it is moved aside later)."""
    record = Path(cfg.train.output_dir) / "run_config.json"
    if not record.is_file() or cfg.train.overwrite_output_dir:
        return
    try:
        previous = json.loads(record.read_text())
    except json.JSONDecodeError:
        raise ConfigError(
            f"--output_dir {cfg.train.output_dir} has an unreadable run_config.json; choose another "
            f"--output_dir or pass --overwrite_output_dir"
        ) from None
    if previous != run_identity(cfg):
        raise ConfigError(
            f"--output_dir {cfg.train.output_dir} holds a different run (see its run_config.json); "
            f"choose another --output_dir or pass --overwrite_output_dir"
        )
    if cfg.train.resume == "none" and complete_checkpoints(cfg.train.output_dir):
        raise ConfigError(
            f"--output_dir {cfg.train.output_dir} already has checkpoints of this run; pass "
            f"--resume auto to continue it or --overwrite_output_dir to start again"
        )
