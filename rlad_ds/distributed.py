"""The process group: this process's rank and world size, and the group's start and end (NCCL on GPUs, gloo on
CPU). Every entry point, the trainer and the collective parts of checkpoints read their rank from here."""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Callable
from datetime import timedelta

from rlad_ds import hygiene


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """A plain `python script.py` without a launcher acts as rank 0 of 1 (DeepSpeed would look for MPI)."""
    if "RANK" in os.environ:
        return
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
    )


def env_rank() -> int:
    """The rank the launcher gave this process (0 without one), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over ranks in one collective (loss normalisers, a stop request, a sampling round's need)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def init_process_group(timeout_s: int) -> None:
    """DeepSpeed's process group; a collective waiting longer than `timeout_s` fails (a dead rank)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    hygiene.use_environment_build_dir()
    hygiene.adopt_orphaned_descendants()  # a signal during the op's build leaves no compiler running
    hygiene.check_build_locks()  # DeepSpeed JIT-builds its CPU comm op right here; a stale lock would hang it forever
    hygiene.remove_stale_shm_buffers()
    # Each rank on its own device from the start (the engine sets the same later): object collectives before any
    # engine exists (a checkpoint verified together) run on the current device, which NCCL needs to be this rank's.
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Registered before the buffer exists: a signal that lands while the op is built or the ranks map each other's
    # buffers exits from inside init_distributed, and the buffer it created must go too.
    atexit.register(hygiene.remove_own_shm_buffer)
    hygiene.announce_op_build("ShareMemCommBuilder", "its CPU all-reduce through shared memory")
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))


_BEFORE_END: list[Callable[[], None]] = []


def before_end(callback: Callable[[], None]) -> None:
    """Run `callback` when the process group ends, after the ranks' last barrier and before the group is destroyed:
    an in-process vLLM engine tears its groups down over the default one, which must still exist then."""
    _BEFORE_END.append(callback)


def end_process_group(barrier: bool = True) -> None:
    """Leave together (a rank exiting while another is still in a collective makes it abort)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()
            dist.barrier()
    while _BEFORE_END:
        _BEFORE_END.pop()()
    if dist.is_available() and dist.is_initialized():  # a callback may have ended it already (vLLM's shutdown does)
        dist.destroy_process_group()
