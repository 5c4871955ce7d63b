"""A user task whose verifier misbehaves on purpose, for the reward-fault tests (`--task flaky_task:task`).

Prompts are "digits N:"; the verifier's behaviour depends on N % 4 only, so a run over prompts 0..3 sees
each fault on a known number of samples: 0 raises, 1 sleeps past any test's reward timeout, 2 returns NaN
(rejected as outside [0, 1]), 3 scores like `toy_task` (the fraction of digits). It misbehaves only inside
the reward workers: dataset validation also calls `score` (in the trainer process), to check each row.
"""

import time

from rlad_ds.isolation import in_worker
from rlad_ds.tasks.base import Task

SLEEP_S = 60.0


def _score(completion: str, example: dict) -> float:
    n = int(example["prompt"].split()[1].rstrip(":"))
    if not in_worker():
        n = 3
    if n % 4 == 0:
        raise RuntimeError(f"verifier bug on prompt {n}")
    if n % 4 == 1:
        time.sleep(SLEEP_S)
    if n % 4 == 2:
        return float("nan")
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


def _prompt(example: dict) -> str:
    return example["prompt"]


def task() -> Task:
    return Task(name="flaky", prompt=_prompt, score=_score)
