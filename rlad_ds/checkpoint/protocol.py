"""The collective save and load of a checkpoint: every rank writes and hashes its own files, the ranks agree on
success before the manifest is written, and a load on another number of ranks goes through DeepSpeed's universal
format.

Layout of OUTPUT_DIR/checkpoints/step_00000042/: DeepSpeed's files, `rng_rank{r}.*` per rank, `trainer_state.json`
and last the `COMPLETE` marker, the manifest (`rlad_ds.checkpoint.manifest`). A save checks first that every
parameter partition is finite; a write that fails on any rank is agreed by all ranks, the partial dir is removed and
the run ends in one line. Nothing here unpickles what this package did not write."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from rlad_ds.checkpoint.collective import distributed, gather, raise_first
from rlad_ds.checkpoint.manifest import (
    MARKER,
    STEP_DIR,
    HashingWriter,
    checkpoint_root,
    complete_checkpoints,
    hash_own,
    write_json_atomic,
)
from rlad_ds.checkpoint.universal import universal_checkpoint
from rlad_ds.distributed import world
from rlad_ds.errors import ConfigError, TrainingError, reason_line
from rlad_ds.rng import load_rng_state, save_rng_state, seed_rng

logger = logging.getLogger("rlad_ds")


def _finite(tensor) -> bool:
    """Every element finite. A sum carries any nan or inf through in one pass, 15x faster than isfinite().all() on
    CPU; only a sum that is not finite (which finite values can reach by overflow) is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _params_finite(engine) -> bool:
    """This rank's parameters are finite: under ZeRO-3 its own partitions (`ds_tensor`), no gather."""
    module = getattr(engine, "module", None)
    params = list(module.parameters()) if module is not None else []
    return all(_finite(getattr(p, "ds_tensor", p).data) for p in params)


def _rejoin_save(engine) -> None:
    """A rank whose write failed inside DeepSpeed's save still joins the collectives left in it (ZeRO-3's epilogue
    gathers persistent parameters, then a barrier), so that the other ranks reach the agreement after it."""
    if distributed():
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


def _hash_while_writing(engine) -> dict | None:
    """Under sha256: DeepSpeed's torch checkpoint engine made to hash each file as torch.save writes it (once per
    engine), so that no file is read back. Returns the dict it fills, {name: [size, sha256]}; None where the
    engine writes otherwise (another checkpoint engine, a replaced save), whose files are hashed after."""
    saver = getattr(engine, "checkpoint_engine", None)
    if type(saver).__name__ != "TorchCheckpointEngine" or ("save" in vars(saver) and not hasattr(saver, "hashed")):
        return None
    if not hasattr(saver, "hashed"):
        saver.hashed = {}

        def save_hashed(state_dict, path):  # TorchCheckpointEngine.save, into a file that hashes what it is given
            with open(path, "wb") as f:
                writer = HashingWriter(f)
                torch.save(state_dict, writer, _use_new_zipfile_serialization=saver.zipfile_serialization)
            saver.hashed[Path(path).name] = [writer.size, writer.hexdigest()]

        saver.save = save_hashed
    saver.hashed.clear()
    return saver.hashed


def _write_files(engine, root: Path, directory: Path, rank: int, trainer_state: dict, verify_mode: str) -> dict:
    """This rank's share of a checkpoint: DeepSpeed's files, its RNG, (rank 0) the trainer state; their entries in
    the manifest."""
    hashed = _hash_while_writing(engine) if verify_mode == "sha256" else None
    try:
        engine.save_checkpoint(str(root), tag=directory.name, save_latest=False)
    except Exception:
        _rejoin_save(engine)
        raise
    save_rng_state(directory, rank)
    if rank == 0:
        write_json_atomic(directory / "trainer_state.json", trainer_state)
    return hash_own(directory, rank, verify_mode, hashed)


def save_checkpoint(
    engine, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int, verify_mode: str = "sha256"
) -> Path:
    """Save a complete, resumable checkpoint for `step` with its manifest of sizes and, under `verify_mode`
    sha256, checksums (collective: every rank calls it)."""
    root, rank = checkpoint_root(output_dir), world()[0]
    directory = root / f"step_{step:08d}"

    def failure(error: BaseException) -> str:
        return (
            f"cannot write checkpoint {directory} on rank {rank} ({reason_line(error)}; {_free_gib(root):.1f} "
            f"GiB free on that filesystem): nothing of it is kept, the last complete one is "
            f"{_last_good(output_dir)}; free space or fix permissions, then run the same command to resume"
        )

    error = None
    if rank == 0:
        try:
            shutil.rmtree(directory, ignore_errors=True)  # a partial leftover of a crashed save of this very step
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = failure(e)
    agreed = gather((_params_finite(engine), error))
    if not all(finite for finite, _ in agreed):
        raise TrainingError(
            f"parameters are not finite after step {step}: checkpoint not written, the last good "
            f"one is {_last_good(output_dir)}; lower --lr (or check the data and rewards) and resume "
            f"from it"
        )
    raise_first(e for _, e in agreed)
    files, error = {}, None
    try:
        files = _write_files(engine, root, directory, rank, trainer_state, verify_mode)
    except Exception as e:  # any failure on one rank must reach all, or they would wait for it in a collective
        error = failure(e)
    shares = gather((error, files))
    if rank == 0:
        marker = {"step": step, "world_size": world()[1], "identity": trainer_state.get("identity")}
        error = _finish(directory, output_dir, {**marker, "checksum": verify_mode}, shares, keep_last, failure)
    raise_first([e for e, _ in shares] + gather(error))
    return directory


def _finish(directory: Path, output_dir, marker: dict, shares: list, keep_last: int, failure) -> str | None:
    """Rank 0, after every rank wrote its files: the manifest, written last, then old checkpoints and leftovers of
    crashed saves pruned; or, if any rank failed, the partial dir removed. Returns the error, or None."""
    error = next((e for e, _ in shares if e), None)
    try:
        if error is None:
            files = {name: entry for _, part in shares for name, entry in part.items()}
            write_json_atomic(directory / MARKER, {**marker, "files": files})
    except OSError as e:
        error = failure(e)
    if error:
        shutil.rmtree(directory, ignore_errors=True)
        return error
    for old in complete_checkpoints(output_dir)[:-keep_last]:  # only now, with the new one complete
        shutil.rmtree(old, ignore_errors=True)
    for partial in checkpoint_root(output_dir).iterdir():  # leftovers of crashed saves, never resumable
        if STEP_DIR.match(partial.name) and not (partial / MARKER).exists():
            shutil.rmtree(partial, ignore_errors=True)
    return None


def load_checkpoint(engine, directory: Path, seed: int = 0, verify_mode: str = "sha256") -> dict:
    """Restore model, optimizer, scheduler and RNG from a complete checkpoint (collective); return trainer state.

    Written by another number of ranks: loaded through DeepSpeed's universal checkpoint (verified under
    `verify_mode` first, converted again if damaged), RNG seeded anew."""
    state = json.loads((directory / "trainer_state.json").read_text())
    rank, world_size = world()
    universal = state.get("world_size", world_size) != world_size
    load_dir, tag = directory.parent, directory.name
    if universal:
        load_dir, tag = directory, universal_checkpoint(directory, state["world_size"], verify_mode).name
    # The flag engine.load_checkpoint consults (the config's checkpoint.load_universal), read at load time only.
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        error = None if load_path is not None else "DeepSpeed found no model states"
    except Exception as e:  # e.g. PytorchStreamReader errors, a bare AssertionError
        if distributed() and engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()  # the collective left in DeepSpeed's load
        error = reason_line(e)
    finally:
        engine._config.load_universal_checkpoint = previous
    raise_first(
        [
            e
            and f"cannot load checkpoint {directory} on rank {r} ({e}); --resume an older checkpoints/step_N "
            f"dir, or start again with --overwrite_output_dir"
            for r, e in enumerate(gather(error))
        ],
        ConfigError,
    )
    if universal:
        seed_rng(seed, state["step"], rank)
        if rank == 0:
            logger.info(
                "checkpoint %s was written by %d ranks, this run has %d: loaded through DeepSpeed's universal "
                "checkpoint, RNG seeded from (seed, step, rank)",
                directory,
                state["world_size"],
                world_size,
            )
    else:
        load_rng_state(directory, rank)
    return state
