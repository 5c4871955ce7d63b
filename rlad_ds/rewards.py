"""Scoring completions: `score` for one, `RewardRunner` for a batch with a hard per-call timeout.

Each call runs in a persistent worker process (`rlad_ds.isolation`), the only thing that can stop a hung
verifier for sure. A worker that misses its deadline is killed and replaced; its call scores 0 and is
counted as a timeout. A verifier exception scores 0 and is counted as an error. Neither stops the run.

Workers resolve the task by name, so a `RewardRunner` takes what `rlad_ds.tasks.get_task` accepts in a
fresh process: a built-in name, `rg:<dataset>` (with its `task_args`) or `module:function`.

`RewardRunner.check_records` is data loading's use of the same workers: it scores each record's reference
completion (its own gold answer, `Task.reference`), so a gold the verifier cannot read, a verifier that
raises on a record, or one that hangs on it, is found when the data loads, each under the same timeout.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from rlad_ds.isolation import IsolatedWorker, WorkerError
from rlad_ds.tasks import get_task

MAX_MESSAGES = 20  # error messages kept per batch, for the log
# Calls sent to a worker ahead of its results: it starts the next as soon as it sends one back, so a batch costs
# about one pipe round trip per worker instead of one per call. A few suffice; each waits in the socket's buffer.
# The price: the calls queued behind a hung one wait out its timeout before they are sent again.
PIPELINE_DEPTH = 4


def score(task: str, completion: str, example: dict, task_args: str | None = None) -> float:
    """Accuracy in [0, 1] of `completion` on the raw record `example` for a registered task (in-process)."""
    return float(get_task(task, task_args).score(completion, example))


@dataclass
class RewardResult:
    scores: list[float]
    errors: int = 0
    timeouts: int = 0
    failed: dict[int, str] = field(default_factory=dict)  # index -> why, for every error / timeout

    @property
    def messages(self) -> list[str]:
        """The first MAX_MESSAGES errors / timeouts, as `#index: why`, for the log."""
        return [f"#{index}: {why}" for index, why in itertools.islice(self.failed.items(), MAX_MESSAGES)]


def score_one(task: str, task_args: str | None, completion: str | None, example: dict | None) -> float:
    """What a worker runs: `score`, checked to be a finite number in [0, 1]. A `completion` of None means
    the task's reference completion for `example` (or "" for a task without one). An `example` of None only makes
    the task and warms it up (`Task.warm_up`): a worker's first call, outside any reward deadline."""
    if example is None:
        warm_up = get_task(task, task_args).warm_up
        if warm_up is not None:
            warm_up()
        return 0.0
    if completion is None:
        reference = get_task(task, task_args).reference
        completion = reference(example) if reference is not None else ""
    value = score(task, completion, example, task_args)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"task {task!r} returned score {value}, outside [0, 1]")
    return value


class RewardRunner:
    """Scores batches in `workers` persistent processes; each call has a hard `timeout_s`."""

    def __init__(self, task: str, timeout_s: float = 10.0, workers: int = 2, task_args: str | None = None):
        get_task(task, task_args)  # fail here, with the task's own error, rather than in every worker
        if timeout_s <= 0 or workers < 1:
            raise ValueError(f"need timeout_s > 0 and workers >= 1, got {timeout_s}, {workers}")
        self.task, self.task_args, self.timeout_s = task, task_args, timeout_s
        self.pipeline_depth = PIPELINE_DEPTH  # calls each worker holds at once
        warm_up = (task, task_args, None, None)  # the task made and its verifier imported as each worker starts
        self.workers = [IsolatedWorker("rlad_ds.rewards:score_one", warm_up) for _ in range(workers)]

    @classmethod
    def from_config(cls, data_cfg) -> RewardRunner:
        """The runner a `rlad_ds.config.schema.DataConfig` asks for."""
        return cls(data_cfg.task, data_cfg.reward_timeout_s, data_cfg.reward_workers, data_cfg.task_args)

    def run(self, completions: Sequence[str | None], examples: Sequence[dict]) -> RewardResult:
        """Score completion i against examples[i] (None: the task's reference completion for it); errors and
        timeouts score 0 and are counted."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        result = RewardResult(scores=[0.0] * len(completions))
        todo = deque(range(len(completions)))
        queued = {worker: deque() for worker in self.workers}  # sent, in the order the worker runs them
        started = {}  # worker -> when its first queued call could start (its deadline is that + timeout_s)
        while todo or any(queued.values()):
            for worker in self.workers:
                while todo and len(queued[worker]) < self.pipeline_depth:
                    index = todo.popleft()
                    worker.send((self.task, self.task_args, completions[index], examples[index]))
                    if not queued[worker]:
                        started[worker] = time.monotonic()
                    queued[worker].append(index)
            busy = [worker for worker in self.workers if queued[worker]]
            first_deadline = min(started[worker] for worker in busy) + self.timeout_s
            wait([worker.conn for worker in busy], timeout=max(0.0, first_deadline - time.monotonic()))
            for worker in busy:
                while queued[worker] and worker.conn is not None and worker.conn.poll():
                    self._collect(worker, queued[worker].popleft(), result)
                    started[worker] = time.monotonic()
                if queued[worker] and worker.conn is not None and time.monotonic() >= started[worker] + self.timeout_s:
                    worker.kill()  # restarted by the next send
                    self._count(result, "timeouts", queued[worker].popleft(), f"no score within {self.timeout_s}s")
                if worker.conn is None:  # killed: the calls queued behind the one to blame are sent again
                    todo.extendleft(reversed(queued[worker]))
                    queued[worker].clear()
        return result

    def check_records(self, examples: Sequence[dict]) -> dict[int, str]:
        """{index: why} for every record whose reference completion does not score 1.0 (or, for a task
        without a reference, whose empty completion makes the verifier raise), each call under the timeout."""
        result = self.run([None] * len(examples), examples)
        problems = dict(result.failed)
        if get_task(self.task, self.task_args).reference is not None:
            for index, value in enumerate(result.scores):
                if index not in problems and value < 1.0:
                    problems[index] = (
                        f"its gold answer does not verify against itself (score {value:g}); check the answer field"
                    )
        return problems

    def _collect(self, worker: IsolatedWorker, index: int, result: RewardResult) -> None:
        try:
            result.scores[index] = float(worker.receive())
        except WorkerError as error:
            self._count(result, "errors", index, str(error))

    @staticmethod
    def _count(result: RewardResult, kind: str, index: int, message: str) -> None:
        setattr(result, kind, getattr(result, kind) + 1)
        result.failed[index] = message

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
