"""What every entry point (both launchers, the benchmarks' workers) needs around a run: the process
environment, logging, one-line errors, and the process group's start and end."""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from datetime import timedelta
from typing import Callable, Sequence

from rlad_ds.errors import ConfigError, TrainingError

logger = logging.getLogger("rlad_ds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """A plain `python script.py` without a launcher acts as rank 0 of 1 (DeepSpeed would look for MPI)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run an entry point: a user mistake (ConfigError) is one line on stderr from rank 0 and exit code 2, a
    run that cannot go on (TrainingError) one line and exit code 1; `--debug` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # torch deprecates the collectives DeepSpeed 0.19 calls; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.basicConfig(level=logging.INFO if env_rank() == 0 else logging.WARNING,
                        format="[rlad_ds %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return main(argv)
    except (ConfigError, TrainingError) as error:
        if "--debug" in argv:
            raise
        if env_rank() == 0:
            print(f"rlad_ds: error: {error}", file=sys.stderr)
        end_process_group(barrier=False)
        return 2 if isinstance(error, ConfigError) else 1


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(timeout_s: int) -> None:
    """DeepSpeed's process group (NCCL on GPUs, gloo on CPU); a collective waiting longer than `timeout_s` fails."""
    import deepspeed

    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))


def end_process_group(barrier: bool = True) -> None:
    """Leave together (a rank exiting while another is still in a collective makes it abort)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()
            dist.barrier()
        dist.destroy_process_group()
