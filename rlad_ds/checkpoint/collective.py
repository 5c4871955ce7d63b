"""How the ranks agree about a checkpoint: every rank's value gathered, the first error raised on all of them (so that
none waits in a collective for one that has left), and a checkpoint verified together, each rank hashing its share.
Without a process group (one process, the tests) each is the plain local operation."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from rlad_ds.checkpoint.manifest import verify
from rlad_ds.distributed import world
from rlad_ds.errors import TrainingError


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if distributed():
        dist.barrier()


def gather(value) -> list:
    """Every rank's `value` (in-memory objects from the other ranks, never from files)."""
    if not distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def raise_first(errors, kind=TrainingError) -> None:
    """Every rank raises the first rank's error, so that all stop together (rank 0 prints it)."""
    errors = [e for e in errors if e]
    if errors:
        raise kind(errors[0])


def verify_together(directory: Path, digests: bool = True) -> str | None:
    """`manifest.verify` with the checksums shared out among the ranks (each reads about 1/world of the bytes);
    the same answer on every rank."""
    rank, world_size = world()
    return next((p for p in gather(verify(directory, digests, share=(rank, world_size))) if p), None)
