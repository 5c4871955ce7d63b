"""Calls with a hard deadline in persistent worker processes: the layer below `rewards` and `tasks`.

Why processes: a verifier can hang (sympy on `9^9^9^9^9`), and a thread cannot be stopped; worse, C-level
big-number arithmetic holds the GIL, so even the thread waiting on the timeout stalls. Only a process can
be stopped for sure. To keep that cheap, workers are started once (fresh interpreters, not forks: the
trainer process holds CUDA/NCCL threads that make fork unsafe) and kept across calls: a call costs one pipe
round trip (tens of microseconds). A worker that misses its deadline is killed and restarted by its next
call (one interpreter start, about a second with sympy).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection

STARTUP_TIMEOUT_S = 120.0

_IN_WORKER = False


def in_worker() -> bool:
    """True inside an `IsolatedWorker` process, whose parent enforces the deadline."""
    return _IN_WORKER


class WorkerError(RuntimeError):
    """The call raised inside the worker (the message is `Type: text`) or the worker died."""


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(fd: int, target: str, parent_pid: int) -> None:
    """Entry point of a worker process: serve `target(*args)` calls over the socket `fd` until EOF."""
    global _IN_WORKER
    _IN_WORKER = True
    # A worker lives and dies with the process that started it: a launcher's SIGTERM / a Ctrl-C reach every
    # process of the job, and a worker that died of them mid-step would fail that step's rewards; it is killed
    # by its owner instead, or by the kernel when its owner dies (even by kill -9).
    from rlad_ds.hygiene import set_parent_death_signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the owner died before the line above took effect
        return
    conn = Connection(fd)
    try:
        fn = _resolve(target)
    except BaseException as error:  # report why it cannot start instead of dying silently
        conn.send(("fatal", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(*args)))
        except Exception as error:
            conn.send(("error", f"{type(error).__name__}: {error}"))


_WORKER_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[3]); from rlad_ds.isolation import "
    "_worker_main; _worker_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[4]))"
)


class IsolatedWorker:
    """One worker process running `target(*args)` calls ("module:function") one at a time.

    Started as a fresh interpreter (subprocess + socketpair) rather than multiprocessing "spawn", which
    re-runs the caller's main script and so breaks plain scripts without an `if __name__` guard.
    """

    def __init__(self, target: str, warm_up: tuple | None = None):
        self.target = target
        self.warm_up = warm_up  # the arguments of a first call made as the process starts, under its deadline
        self.process = None
        self.conn = None

    def start(self) -> None:
        """Start the process and wait until `target` is imported; raises WorkerError if it cannot be."""
        parent, child = socket.socketpair()
        path = json.dumps([p for p in sys.path if p])
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(child.fileno()), self.target, path, str(os.getpid())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = Connection(parent.detach())
        _LIVE.add(self)
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            self.kill()
            raise WorkerError(f"worker for {self.target} did not start within {STARTUP_TIMEOUT_S:.0f}s")
        status, message = self._receive()
        if status == "ready" and self.warm_up is not None:
            status, message = self._warmed_up()
        if status != "ready":
            self.kill()
            raise WorkerError(f"worker cannot load {self.target}: {message}")

    def _warmed_up(self) -> tuple[str, str | None]:
        """The warm-up call, under the start-up deadline. Its error is not the worker's: the calls that need what
        it failed to load report it themselves, each under its own deadline."""
        self.conn.send(self.warm_up)
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            return "error", f"its warm-up took over {STARTUP_TIMEOUT_S:.0f}s"
        status, message = self._receive()
        return ("ready", None) if status in ("ok", "error") and self.alive else (status, message)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, args: tuple) -> None:
        """Start the call `target(*args)`, (re)starting the process first if it is not running."""
        if not self.alive:
            self.kill()  # releases a dead process's socket
            self.start()
        self.conn.send(args)

    def receive(self):
        """The pending call's value; raises WorkerError if it raised or the worker died."""
        status, value = self._receive()
        if status != "ok":
            raise WorkerError(value)
        return value

    def _receive(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            return "error", "worker process died"

    def call(self, args: tuple, timeout_s: float):
        """`target(*args)` with a hard deadline: TimeoutError (worker killed) or WorkerError on failure."""
        self.send(args)
        if not self.conn.poll(timeout_s):
            self.kill()
            raise TimeoutError(f"{self.target} took over {timeout_s}s")
        return self.receive()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.conn.close()
        self.process, self.conn = None, None
        _LIVE.discard(self)


_LIVE: weakref.WeakSet[IsolatedWorker] = weakref.WeakSet()


@atexit.register
def _kill_live_workers() -> None:
    for worker in list(_LIVE):
        worker.kill()
