"""Scoring completions: `score` for one, `RewardRunner` for a batch with a hard per-call timeout.

Why processes: a verifier can hang (sympy on `9^9^9^9^9`), and a thread cannot be stopped; worse, C-level
big-number arithmetic holds the GIL, so even the thread waiting on the timeout stalls. Only a process can
be stopped for sure. To keep that cheap, workers are started once (fresh interpreters, not forks: the
trainer process holds CUDA/NCCL threads that make fork unsafe) and kept across batches: a call costs one pipe round trip
(tens of microseconds). A worker that misses its deadline is killed and replaced (one interpreter start,
about a second with sympy); its call scores 0 and is counted as a timeout. A verifier exception scores 0
and is counted as an error. Neither stops the run.

Workers resolve the task by name, so a `RewardRunner` takes what `rlad_ds.tasks.get_task` accepts in a
fresh process: a built-in name or `module:function`.
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Sequence

STARTUP_TIMEOUT_S = 120.0
MAX_MESSAGES = 20  # error messages kept per batch, for the log


def score(task: str, completion: str, example: dict) -> float:
    """Accuracy in [0, 1] of `completion` on the raw record `example` for a registered task (in-process)."""
    from rlad_ds.tasks import get_task

    return float(get_task(task).score(completion, example))


_IN_WORKER = False


def in_worker() -> bool:
    """True inside an `IsolatedWorker` process, whose parent enforces the deadline."""
    return _IN_WORKER


class WorkerError(RuntimeError):
    """The call raised inside the worker (the message is `Type: text`) or the worker died."""


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(fd: int, target: str) -> None:
    """Entry point of a worker process: serve `target(*args)` calls over the socket `fd` until EOF."""
    global _IN_WORKER
    _IN_WORKER = True
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


_WORKER_BOOT = "import json, sys; sys.path[:0] = json.loads(sys.argv[3]); " \
               "from rlad_ds.rewards import _worker_main; _worker_main(int(sys.argv[1]), sys.argv[2])"


class IsolatedWorker:
    """One worker process running `target(*args)` calls ("module:function") one at a time.

    Started as a fresh interpreter (subprocess + socketpair) rather than multiprocessing "spawn", which
    re-runs the caller's main script and so breaks plain scripts without an `if __name__` guard.
    """

    def __init__(self, target: str):
        self.target = target
        self.process = None
        self.conn = None

    def start(self) -> None:
        """Start the process and wait until `target` is imported; raises WorkerError if it cannot be."""
        parent, child = socket.socketpair()
        path = json.dumps([p for p in sys.path if p])
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT, str(child.fileno()), self.target, path],
                                        pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        self.conn = Connection(parent.detach())
        _LIVE.add(self)
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            self.kill()
            raise WorkerError(f"worker for {self.target} did not start within {STARTUP_TIMEOUT_S:.0f}s")
        status, message = self._receive()
        if status != "ready":
            self.kill()
            raise WorkerError(f"worker cannot load {self.target}: {message}")

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


_LIVE: "weakref.WeakSet[IsolatedWorker]" = weakref.WeakSet()


@atexit.register
def _kill_live_workers() -> None:
    for worker in list(_LIVE):
        worker.kill()


@dataclass
class RewardResult:
    scores: list[float]
    errors: int = 0
    timeouts: int = 0
    messages: list[str] = field(default_factory=list)  # the first MAX_MESSAGES errors / timeouts


def score_one(task: str, completion: str, example: dict) -> float:
    """What a worker runs: `score`, checked to be a finite number in [0, 1]."""
    value = score(task, completion, example)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"task {task!r} returned score {value}, outside [0, 1]")
    return value


class RewardRunner:
    """Scores batches in `workers` persistent processes; each call has a hard `timeout_s`."""

    def __init__(self, task: str, timeout_s: float = 10.0, workers: int = 2):
        from rlad_ds.tasks import get_task

        get_task(task)  # fail here, with the task's own error, rather than in every worker
        if timeout_s <= 0 or workers < 1:
            raise ValueError(f"need timeout_s > 0 and workers >= 1, got {timeout_s}, {workers}")
        self.task, self.timeout_s = task, timeout_s
        self.workers = [IsolatedWorker("rlad_ds.rewards:score_one") for _ in range(workers)]

    def run(self, completions: Sequence[str], examples: Sequence[dict]) -> RewardResult:
        """Score completion i against examples[i]; errors and timeouts score 0 and are counted."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        result = RewardResult(scores=[0.0] * len(completions))
        todo = list(range(len(completions)))[::-1]
        busy = {}  # worker -> (index, deadline)
        while todo or busy:
            for worker in self.workers:
                if todo and worker not in busy:
                    index = todo.pop()
                    worker.send((self.task, completions[index], examples[index]))
                    busy[worker] = (index, time.monotonic() + self.timeout_s)
            first_deadline = min(deadline for _, deadline in busy.values())
            ready = wait([worker.conn for worker in busy], timeout=max(0.0, first_deadline - time.monotonic()))
            for worker in list(busy):
                index, deadline = busy[worker]
                if worker.conn in ready or worker.conn.poll():
                    self._collect(worker, index, result)
                elif time.monotonic() >= deadline:
                    worker.kill()  # restarted by the next send
                    self._count(result, "timeouts", f"#{index}: no score within {self.timeout_s}s")
                else:
                    continue
                del busy[worker]
        return result

    def _collect(self, worker: IsolatedWorker, index: int, result: RewardResult) -> None:
        try:
            result.scores[index] = float(worker.receive())
        except WorkerError as error:
            self._count(result, "errors", f"#{index}: {error}")

    @staticmethod
    def _count(result: RewardResult, kind: str, message: str) -> None:
        setattr(result, kind, getattr(result, kind) + 1)
        if len(result.messages) < MAX_MESSAGES:
            result.messages.append(message)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def score_batch(task: str, completions: Sequence[str], examples: Sequence[dict], timeout_s: float = 10.0,
                workers: int = 2) -> RewardResult:
    """One-off `RewardRunner(task, timeout_s, workers).run(...)`; keep a runner instead for repeated batches."""
    with RewardRunner(task, timeout_s, workers) as runner:
        return runner.run(completions, examples)
