"""One run per output dir: rank 0 holds an exclusive `flock` on OUTPUT_DIR/.rlad_ds.lock for the life of the run.

Rank 0 takes it before anything loads; a second run's rank 0 finds it held and stops in one line naming the
holder's pid and host (written into the file), and the launcher ends that run's other ranks. Rank 0 is the process
that writes the run's records and markers and prunes its checkpoints, so its lock is what makes them its own. The
kernel releases the lock when the process ends, however it ends (kill -9 included): nothing stale is left to
remove. Across nodes the output dir is a shared filesystem whose `flock` reaches every client (NFSv4, Lustre with
the `flock` mount option)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from rlad_ds.errors import ConfigError

LOCK = ".rlad_ds.lock"


class OutputDirLock:
    """The lock of one output dir, held from `acquire` until the process ends or `release`."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self._created: list[Path] = []  # what acquire created, innermost first: the lock file, dirs up the path
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.output_dir / LOCK

    def acquire(self) -> OutputDirLock:
        missing = [d for d in (self.output_dir, *self.output_dir.parents) if not d.exists()]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._created = ([] if self.path.exists() else [self.path]) + missing
        for _ in range(3):  # the file may be replaced between open and flock (a run moved aside): lock the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(
                    f"--output_dir {self.output_dir} is in use by another run ({self.holder()}); wait for it to "
                    f"end or stop it, or choose another --output_dir"
                ) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:
            raise ConfigError(f"cannot lock {self.path}: it keeps being replaced; choose another --output_dir")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, as its file says."""
        try:
            holder = json.loads(self.path.read_text())
            return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock was taken
            return f"a process holds {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def abandon(self) -> None:
        """A run refused after taking the lock: remove the lock file and the dirs that `acquire` created, where
        nothing else was put in them (a run that never started leaves nothing behind)."""
        if self._fd is not None:
            for path in self._created:
                try:
                    path.unlink() if path == self.path else path.rmdir()
                except OSError:  # something else is in it now: it stays, and so does everything above it
                    break
        self.release()

    def relock(self) -> None:
        """After OUTPUT_DIR was renamed aside (this lock's file with it): lock the new, empty OUTPUT_DIR."""
        old, self._fd = self._fd, None
        try:
            self.acquire()
        finally:
            if old is not None:
                os.close(old)
