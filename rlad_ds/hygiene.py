"""What a run leaves on the machine, and what killed runs left: DeepSpeed's CPU all-reduce buffers in /dev/shm,
JIT-built ops (one build dir per environment, announced when a build is due) and their locks that no process
holds, and child processes whose parent died (the kernel's parent-death signal). Reads /proc; needs no process
group."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

from rlad_ds.errors import ConfigError

logger = logging.getLogger("rlad_ds")
SHM_DIR = Path("/dev/shm")
_ADOPTING = False  # adopt_orphaned_descendants has run in this process


def set_parent_death_signal(signum: int) -> None:
    """Linux: the kernel sends `signum` to this process when its parent exits (no orphans after a kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # 1 = PR_SET_PDEATHSIG


def adopt_orphaned_descendants() -> None:
    """Linux: this process becomes the reaper of its orphaned descendants, and ends every descendant still running
    when it exits. A signal during a JIT build exits the rank from inside `subprocess.run`, which SIGKILLs ninja;
    the compilers ninja started (each in its own process group) would otherwise compile on, orphaned, for minutes."""
    global _ADOPTING
    if _ADOPTING:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # 36 = PR_SET_CHILD_SUBREAPER
    atexit.register(end_descendants)
    _ADOPTING = True


def end_descendants(timeout_s: float = 3.0) -> None:
    """SIGTERM every descendant of this process, SIGKILL those still there after `timeout_s`."""
    import psutil

    try:
        descendants = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for process in descendants:
        try:
            process.terminate()
        except psutil.Error:
            pass
    for process in psutil.wait_procs(descendants, timeout=timeout_s)[1]:
        try:
            process.kill()
        except psutil.Error:
            pass


def _shm_prefix() -> str:
    # The name DeepSpeed's CPU comm op gives its buffers (ops/csrc/cpu/comm/shm.cpp): uid, MASTER_ADDR,
    # MASTER_PORT, rank.
    return f"deepspeed_allreduce_buffer_{os.getuid()}_"


def remove_own_shm_buffer() -> None:
    """This rank's own 69 MB all-reduce buffer, at exit (success or failure): DeepSpeed never removes it.
    The other ranks have mapped it since init, so removing the name does not disturb them."""
    name = (
        f"{_shm_prefix()}{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{os.environ.get('RANK', '0')}"
    )
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
        raise ConfigError(
            f"{stale[0]} is the lock of a JIT build that was killed mid-way (no process holds it); "
            f"every start-up would wait on it forever: delete it (rm {stale[0]}) and start again"
        )


def use_environment_build_dir() -> Path:
    """Where torch JIT-builds DeepSpeed's ops for this process: TORCH_EXTENSIONS_DIR when the user set it, else a dir
    of this environment under torch's default root, named by Python, torch, DeepSpeed and `sys.prefix`, and set as
    TORCH_EXTENSIONS_DIR. torch's own default is one dir per Python and CUDA version, whose ninja file records the
    source paths of one DeepSpeed install: two environments sharing it rebuild the same op alternately, a minute
    or more on every start."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from importlib.metadata import version

    from torch.utils.cpp_extension import get_default_build_root

    prefix = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    name = f"py{sys.version_info.major}{sys.version_info.minor}-torch{version('torch')}-deepspeed{version('deepspeed')}"
    path = Path(get_default_build_root()) / f"{name}-{prefix}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


def announce_op_build(builder_class: str, why: str) -> bool:
    """Say once (rank 0), before DeepSpeed compiles an op, what it builds, why, for how long and where it is kept;
    silent when the op is prebuilt, already built for this environment, or not built on this accelerator. True
    when a build is due."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(builder_class)
    if builder is None or installed_ops.get(builder.name, False) or not builder.is_compatible(False):
        return False
    root = use_environment_build_dir()
    if (root / builder.name / f"{builder.name}.so").is_file():
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info(
            "compiling DeepSpeed's %s op (%s) for this environment: once, a minute or more; later runs load it from %s",
            builder.name,
            why,
            root / builder.name,
        )
    return True
