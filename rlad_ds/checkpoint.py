"""Checkpoints that can be trusted, resume that never picks the wrong one, and the HF export of the student.

Layout of OUTPUT_DIR/checkpoints/step_00000042/: DeepSpeed's files, `rng_rank{r}.*` per rank, `trainer_state.json`
and last the `COMPLETE` marker, the manifest (`rlad_ds.manifest`). A save checks first that every parameter
partition is finite; a write that fails on any rank is agreed by all ranks, the partial dir is removed and the run
ends in one line. `--resume auto` takes the newest complete checkpoint of this run that verifies, else an older one;
another number of ranks resumes through DeepSpeed's universal format (`step_N/universal`). Nothing here unpickles
what this package did not write."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rlad_ds.callbacks import Callback
from rlad_ds.errors import ConfigError, TrainingError, error_line
from rlad_ds.launch import env_rank, world
from rlad_ds.manifest import (CHECKSUM, MARKER, STEP_DIR, checkpoint_root, complete_checkpoints, hash_own,
                              marker_step, read_marker, verify, write_json_atomic)

logger = logging.getLogger("rlad_ds")
UNIVERSAL = "universal"


def _differences(old: dict, new: dict) -> list[str]:
    """The config fields (section.field) in which two run identities differ."""
    keys = {(s, k) for d in (old, new) for s, v in d.items() for k in (v if isinstance(v, dict) else [None])}

    def get(d, s, k):
        return d.get(s) if k is None else (d.get(s) or {}).get(k, "<absent>")

    return sorted(s if k is None else f"{s}.{k}" for s, k in keys if get(old, s, k) != get(new, s, k))


def _same_run(directory: Path, identity: dict | None) -> None:
    recorded = (read_marker(directory) or {}).get("identity")
    if identity is None or recorded is None or recorded == identity:  # old markers record no identity
        return
    raise ConfigError(f"checkpoint {directory} belongs to a different run (it differs in "
                      f"{', '.join(_differences(recorded, identity)[:5])}); choose another --output_dir, or pass "
                      f"--overwrite_output_dir to start afresh (the old run is moved aside)")


def _unfinished(directory: Path, max_steps: int | None) -> Path:
    step = marker_step(directory)
    if max_steps is not None and step >= max_steps:
        raise ConfigError(f"run in {directory.parent.parent} already finished step {step} (--max_steps "
                          f"{max_steps}); raise --max_steps to continue it, pass --overwrite_output_dir to run it "
                          f"again from step 0 (the old run is moved aside), or choose another --output_dir")
    return directory


def resolve_resume(resume: str, output_dir: str | Path, identity: dict | None = None,
                   max_steps: int | None = None) -> Path | None:
    """The checkpoint dir `--resume` names: auto = the newest complete one of this run that verifies (or None),
    none = None, or a path. Another run's checkpoint, a damaged path and a finished run are refused."""
    if resume == "none":
        return None
    if resume != "auto" and not (Path(resume) / MARKER).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker); pass a "
                          f"checkpoints/step_N dir written by this trainer, auto, or none")
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
        raise ConfigError(f"no checkpoint in {checkpoint_root(output_dir)} verifies ({failed[0][0].name}: "
                          f"{failed[0][1]}); pass --overwrite_output_dir to start again (the old run is moved aside)")
    return None


def resume_point(cfg) -> Path | None:
    """`resolve_resume` for a run: --overwrite_output_dir starts from step 0, so an explicit path contradicts it."""
    train = cfg.train
    if train.overwrite_output_dir:
        if train.resume not in ("auto", "none"):
            raise ConfigError(f"--resume {train.resume} contradicts --overwrite_output_dir (a fresh start from step 0,"
                              f" the old run moved aside); drop one of the two")
        return None
    return resolve_resume(train.resume, train.output_dir, run_identity(cfg), train.max_steps)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier():
    if _distributed():
        dist.barrier()


def _gather(value) -> list:
    """Every rank's `value` (in-memory objects from the other ranks, never from files)."""
    if not _distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _raise_first(errors, kind=TrainingError) -> None:
    """Every rank raises the first rank's error, so that all stop together (rank 0 prints it)."""
    errors = [e for e in errors if e]
    if errors:
        raise kind(errors[0])


def _first_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f': {error.filename}' if error.filename else ''}"
    return error_line(error, limit=300)


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
            message = f"cannot move {out} aside to {target} ({_first_line(error)}); fix that or choose another " \
                      f"--output_dir"
    if _distributed():  # a flag, not objects: no engine has set this rank's device yet
        flag = torch.tensor([failed], device=get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
        dist.all_reduce(flag)
        failed = float(flag.item())
    if failed:
        raise ConfigError(message if world()[0] == 0 else f"rank 0 could not move {out} aside")
    return target


def _save_rng(directory: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))
    version, state, gauss = random.getstate()
    write_json_atomic(directory / f"rng_rank{rank}.json", {"python": [version, list(state), gauss]})


def _params_finite(engine) -> bool:
    """This rank's parameters are finite: under ZeRO-3 its own partitions (`ds_tensor`), no gather."""
    module = getattr(engine, "module", None)
    params = list(module.parameters()) if module is not None else []
    return all(bool(torch.isfinite(getattr(p, "ds_tensor", p).data).all()) for p in params)


def _rejoin_save(engine) -> None:
    """A rank whose write failed inside DeepSpeed's save still joins the collectives left in it (ZeRO-3's epilogue
    gathers persistent parameters, then a barrier), so that the other ranks reach the agreement after it."""
    if _distributed():
        if engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()
        dist.barrier()


def _free_gib(path: Path) -> float:
    path = path.absolute()
    while not path.exists():  # the checkpoint dir may not exist yet: its filesystem is the nearest parent's
        path = path.parent
    return shutil.disk_usage(path).free / 2**30


def _last_good(output_dir) -> str:
    found = complete_checkpoints(output_dir)
    return f"{found[-1].name} ({found[-1]})" if found else "none was written"


def _write_files(engine, root: Path, directory: Path, rank: int, trainer_state: dict) -> dict:
    """This rank's share of a checkpoint: DeepSpeed's files, its RNG, (rank 0) the trainer state; their hashes."""
    try:
        engine.save_checkpoint(str(root), tag=directory.name, save_latest=False)
    except Exception:
        _rejoin_save(engine)
        raise
    _save_rng(directory, rank)
    if rank == 0:
        write_json_atomic(directory / "trainer_state.json", trainer_state)
    return hash_own(directory, rank)


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Save a complete, verified, resumable checkpoint for `step` (collective: every rank calls it)."""
    root, rank = checkpoint_root(output_dir), world()[0]
    directory = root / f"step_{step:08d}"

    def failure(error: BaseException) -> str:
        return (f"cannot write checkpoint {directory} on rank {rank} ({_first_line(error)}; {_free_gib(root):.1f} "
                f"GiB free on that filesystem): nothing of it is kept, the last complete one is "
                f"{_last_good(output_dir)}; free space or fix permissions, then run the same command to resume")

    error = None
    if rank == 0:
        try:
            shutil.rmtree(directory, ignore_errors=True)  # a partial leftover of a crashed save of this very step
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = failure(e)
    agreed = _gather((_params_finite(engine), error))
    if not all(finite for finite, _ in agreed):
        raise TrainingError(f"parameters are not finite after step {step}: checkpoint not written, the last good "
                            f"one is {_last_good(output_dir)}; lower --lr (or check the data and rewards) and resume "
                            f"from it")
    _raise_first(e for _, e in agreed)
    files, error = {}, None
    try:
        files = _write_files(engine, root, directory, rank, trainer_state)
    except Exception as e:  # any failure on one rank must reach all, or they would wait for it in a collective
        error = failure(e)
    shares = _gather((error, files))
    if rank == 0:
        error = next((e for e, _ in shares if e), None)
        try:
            if error is None:
                write_json_atomic(directory / MARKER, {
                    "step": step, "world_size": world()[1], "identity": trainer_state.get("identity"),
                    "checksum": CHECKSUM, "files": {k: v for _, part in shares for k, v in part.items()}})
        except OSError as e:
            error = failure(e)
        if error:
            shutil.rmtree(directory, ignore_errors=True)
        else:  # only now, with the new one complete, are old checkpoints and leftovers removed
            for old in complete_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for partial in root.iterdir():  # leftovers of crashed saves, never resumable
                if STEP_DIR.match(partial.name) and not (partial / MARKER).exists():
                    shutil.rmtree(partial, ignore_errors=True)
    _raise_first([e for e, _ in shares] + _gather(error))
    return directory


def _load_rng(directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"rng_rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = json.loads((directory / f"rng_rank{rank}.json").read_text())["python"]
    random.setstate((version, tuple(state), gauss))


def seed_rng(seed: int, step: int, rank: int) -> int:
    """Seed Python and torch from (seed, step, rank) alone: resuming on another world size, where no rank's
    saved RNG state is this rank's."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little")
    random.seed(value)
    torch.manual_seed(value)
    return value


def _convert_universal(directory: Path, ranks: int) -> Path:
    """DeepSpeed's ds_to_universal of a checkpoint, once, by rank 0 into step_N/universal (the others wait)."""
    import argparse
    import contextlib
    import io

    target, error = directory / UNIVERSAL, None
    if world()[0] == 0 and not target.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = directory / f"{UNIVERSAL}.tmp"  # renamed when done: a crash mid-conversion is redone, never used
        shutil.rmtree(tmp, ignore_errors=True)
        # One worker: no process pool forked from a process inside a process group.
        args = argparse.Namespace(input_folder=str(directory), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
            os.replace(tmp, target)
            (directory / "latest_universal").unlink(missing_ok=True)  # names the tmp dir; tags are explicit here
        except Exception as e:
            error = (f"cannot convert checkpoint {directory} to DeepSpeed's universal format for another number of "
                     f"ranks ({_first_line(e)}); resume with the {ranks} ranks that wrote "
                     f"it")
    _raise_first(_gather(error), ConfigError)
    return target


def load_checkpoint(engine, directory: Path, seed: int = 0) -> dict:
    """Restore model, optimizer, scheduler and RNG from a complete checkpoint (collective); return trainer state.

    Written by another number of ranks: loaded through DeepSpeed's universal checkpoint, RNG seeded anew."""
    state = json.loads((directory / "trainer_state.json").read_text())
    rank, world_size = world()
    universal = state.get("world_size", world_size) != world_size
    load_dir, tag = directory.parent, directory.name
    if universal:
        load_dir, tag = directory, _convert_universal(directory, state["world_size"]).name
    # The flag engine.load_checkpoint consults (the config's checkpoint.load_universal), read at load time only.
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        error = None if load_path is not None else "DeepSpeed found no model states"
    except Exception as e:  # e.g. PytorchStreamReader errors, a bare AssertionError
        if _distributed() and engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()  # the collective left in DeepSpeed's load
        error = _first_line(e)
    finally:
        engine._config.load_universal_checkpoint = previous
    _raise_first([e and f"cannot load checkpoint {directory} on rank {r} ({e}); --resume an older checkpoints/step_N "
                  f"dir, or start again with --overwrite_output_dir" for r, e in enumerate(_gather(error))],
                 ConfigError)
    if universal:
        seed_rng(seed, state["step"], rank)
        if rank == 0:
            logger.info("checkpoint %s was written by %d ranks, this run has %d: loaded through DeepSpeed's universal "
                        "checkpoint, RNG seeded from (seed, step, rank)", directory, state["world_size"], world_size)
    else:
        _load_rng(directory, rank)
    return state


class ExportHF(Callback):
    """At the end of the run, the trained student as a plain transformers model dir (safetensors + tokenizer)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, history: dict) -> None:
        export_hf(trainer.engines.student, trainer.tokenizer, self.out_dir)


def export_hf(engine, tokenizer, out_dir: str | Path) -> Path | None:
    """Write the consolidated student as an HF dir (safetensors + tokenizer); collective, rank 0 writes."""
    out_dir = Path(out_dir)
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # gathers ZeRO-3 partitions onto rank 0
    if world()[0] == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module = engine.module
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    _barrier()
    return out_dir


# Fields that may change between a run and its resumption without making it a different run.
_RESUMABLE = {"train": {"max_steps", "resume", "save_steps", "keep_last", "overwrite_output_dir", "report_to",
                        "collective_timeout_s", "output_dir", "save_on_signal", "signal_grace_s", "max_bad_steps",
                        "max_failed_reward_steps"},
              "rollout": {"engine", "vllm_gpu_memory_utilization", "vllm_kv_cache_gb"},  # how samples are made
              "eval": {"eval_size", "eval_steps", "eval_dataset", "eval_split", "eval_samples", "eval_k",
                       "eval_temperature", "eval_top_p", "eval_top_k", "eval_offload"}}


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
        raise ConfigError(f"--output_dir {cfg.train.output_dir} has an unreadable run_config.json; choose another "
                          f"--output_dir or pass --overwrite_output_dir") from None
    if previous != run_identity(cfg):
        raise ConfigError(f"--output_dir {cfg.train.output_dir} holds a different run (see its run_config.json); "
                          f"choose another --output_dir or pass --overwrite_output_dir")
    if cfg.train.resume == "none" and complete_checkpoints(cfg.train.output_dir):
        raise ConfigError(f"--output_dir {cfg.train.output_dir} already has checkpoints of this run; pass "
                          f"--resume auto to continue it or --overwrite_output_dir to start again")
