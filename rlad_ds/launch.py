"""What every entry point (both launchers, the benchmarks' workers) needs around a run: the process
environment, logging, one-line errors, the process group's start and end, and the run's guards: what a
signal or the launcher's death does (`STOP`), JIT-build locks left by killed runs, and DeepSpeed's CPU
all-reduce buffers in /dev/shm, removed at exit."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
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
    previous = guard_signals()
    try:
        return main(argv)
    except (ConfigError, TrainingError) as error:
        if "--debug" in argv:
            raise
        if env_rank() == 0:
            kind = "" if hasattr(error, "exit_code") else "error: "  # a stop that was asked for is no error
            print(f"rlad_ds: {kind}{error}", file=sys.stderr)
        end_process_group(barrier=False)
        return 2 if isinstance(error, ConfigError) else getattr(error, "exit_code", 1)
    finally:  # an entry point called in-process (tests, notebooks) leaves the caller's handlers as they were
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(timeout_s: int) -> None:
    """DeepSpeed's process group (NCCL on GPUs, gloo on CPU); a collective waiting longer than `timeout_s` fails."""
    import deepspeed

    check_build_locks()  # DeepSpeed JIT-builds its CPU comm op right here; a stale lock would hang it forever
    remove_stale_shm_buffers()
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    atexit.register(_remove_own_shm_buffer)


def end_process_group(barrier: bool = True) -> None:
    """Leave together (a rank exiting while another is still in a collective makes it abort)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()
            dist.barrier()
        dist.destroy_process_group()


# ---- signals and the launcher's death ----------------------------------------------------------------------------

class StopRequest:
    """What this rank does on SIGTERM / SIGINT (also sent to itself when its launcher dies).

    With `save` on and the trainer's last step + checkpoint time (`seconds_needed`) within `grace_s` (what a
    launcher waits before SIGKILL: DeepSpeed's, SLURM's and Kubernetes' defaults are 30 s), the signal is only
    recorded: the trainer finishes its step, all ranks agree, save a checkpoint and exit. Otherwise (no step
    done yet, no time, opt-out, or a second signal) the rank exits at once, the last complete checkpoint intact.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.exit_code, self.requested_at = 0, 0.0
        self.seconds_needed: float | None = None
        self.grace_s = 30.0
        self.save = True

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and time.monotonic() - self.requested_at < 1.0:
            return  # Ctrl-C reaches every process, then DeepSpeed's launcher SIGTERMs the ranks: one request
        if self.requested or not self.save or self.seconds_needed is None or self.seconds_needed > self.grace_s:
            why = ("a second signal" if self.requested else "--save_on_signal is off" if not self.save
                   else "no step finished yet" if self.seconds_needed is None
                   else f"a step and a checkpoint take {self.seconds_needed:.0f} s, over --signal_grace_s "
                        f"{self.grace_s:g}")
            if env_rank() == 0:
                logger.warning("%s: exiting now (%s); the last complete checkpoint is where a rerun resumes", name,
                               why)
            raise SystemExit(128 + signum)
        self.signal_name, self.exit_code, self.requested_at = name, 128 + signum, time.monotonic()
        if env_rank() == 0:
            logger.warning("%s: finishing this step, then saving a checkpoint and exiting (about %.0f s of the "
                           "%g s grace)", name, self.seconds_needed, self.grace_s)


STOP = StopRequest()


def guard_signals() -> dict:
    """SIGTERM / SIGINT go to `STOP`; under DeepSpeed's launcher, this rank also stops when the launcher dies.
    Returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.signal(signum, STOP.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    _watch_launcher()
    return previous


def set_parent_death_signal(signum: int) -> None:
    """Linux: the kernel sends `signum` to this process when its parent exits (no orphans after a kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # 1 = PR_SET_PDEATHSIG


def _watch_launcher() -> None:
    """`deepspeed` runs `deepspeed.launcher.launch`, which runs the ranks. A SIGTERM to `deepspeed` alone (how
    supervisors stop a job) leaves `launch` and the ranks running; a kill of `launch` leaves the ranks. So each
    rank asks for SIGTERM when `launch` exits, and watches whether `launch` lost its own parent."""
    parent = os.getppid()
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:  # not Linux, or no /proc
        return
    if b"deepspeed.launcher.launch" not in command:
        return
    import psutil

    set_parent_death_signal(signal.SIGTERM)
    launcher = psutil.Process(parent).ppid()

    def watch():
        while True:
            time.sleep(1.0)
            try:
                gone = os.getppid() != parent or psutil.Process(parent).ppid() != launcher
            except psutil.Error:
                gone = True
            if gone:
                if env_rank() == 0:
                    logger.warning("the deepspeed launcher is gone: stopping this run")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="rlad_ds-launcher-watch", daemon=True).start()


# ---- what a run leaves on the machine ----------------------------------------------------------------------------

SHM_DIR = Path("/dev/shm")


def _shm_prefix() -> str:
    # The name DeepSpeed's CPU comm op gives its buffers (ops/csrc/cpu/comm/shm.cpp): uid, MASTER_ADDR,
    # MASTER_PORT, rank.
    return f"deepspeed_allreduce_buffer_{os.getuid()}_"


def _remove_own_shm_buffer() -> None:
    """Every rank's own 69 MB all-reduce buffer, at exit (success or failure): DeepSpeed never removes it.
    The other ranks have mapped it since init, so removing the name does not disturb them."""
    name = f"{_shm_prefix()}{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{env_rank()}"
    try:
        (SHM_DIR / name).unlink()
    except OSError:
        pass


def _mapped_files() -> set[str]:
    """Every file some process of this machine has mapped (that we may read: ours, or all as root)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
        except OSError:
            continue
    return mapped


def remove_stale_shm_buffers(min_age_s: float = 60.0) -> int:
    """Remove all-reduce buffers of killed runs (kill -9 skips every exit handler): ours by uid, of another
    port than this job's, older than `min_age_s` and mapped by no process. Returns how many."""
    port = os.environ.get("MASTER_PORT")
    candidates = [p for p in SHM_DIR.glob(f"{_shm_prefix()}*") if f"_{port}_" not in p.name]
    if not candidates:
        return 0
    mapped, removed = _mapped_files(), 0
    for path in candidates:
        try:
            if str(path) not in mapped and time.time() - path.stat().st_mtime > min_age_s:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _open_files() -> set[str]:
    held = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            held.add(os.path.realpath(os.readlink(fd)))
        except OSError:
            continue
    return held


def check_build_locks() -> None:
    """Refuse to start on a JIT-build lock that no process holds. torch's build lock (`FileBaton`) is a file kept
    open by the building process; a build killed mid-way leaves it, and every later start-up of any run on the
    machine then waits on it forever, silently."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = [str(p) for p in root.glob("**/lock")] if root.is_dir() else []
    if not locks or not Path("/proc/self/fd").is_dir():
        return
    time.sleep(0.2)  # a lock being released right now exists for an instant with no holder
    held = _open_files()
    stale = [lock for lock in locks if os.path.realpath(lock) not in held and os.path.exists(lock)]
    if stale:
        raise ConfigError(f"{stale[0]} is the lock of a JIT build that was killed mid-way (no process holds it); "
                          f"every start-up would wait on it forever: delete it (rm {stale[0]}) and start again")
