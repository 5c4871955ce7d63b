"""A user task whose verifier misbehaves on purpose, for the reward-fault tests (`--task flaky_task:task`).

Prompts are "digits N:"; the verifier's behaviour depends on N % 4 only, so a run over prompts 0..3 sees
each fault on a known number of samples: 0 raises, 1 sleeps past any test's reward timeout, 2 returns NaN
(rejected as outside [0, 1]), 3 scores like `toy_task` (the fraction of digits). It behaves on its reference
completion, which dataset validation scores for every row; `hang_on_validation` is one that does not.
"""

import time

from rlad_ds.tasks.base import Task

SLEEP_S = 60.0
REFERENCE = "<the reference completion>"


def _score(completion: str, example: dict) -> float:
    n = int(example["prompt"].split()[1].rstrip(":"))
    if completion == REFERENCE:
        return 1.0
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
    return Task(name="flaky", prompt=_prompt, score=_score, reference=lambda example: REFERENCE)


def hang_on_validation() -> Task:
    """Validation's check of row N sleeps, raises or returns NaN as above (the reference is faulty too)."""
    return Task(name="flaky", prompt=_prompt, score=_score, reference=lambda example: "1")
