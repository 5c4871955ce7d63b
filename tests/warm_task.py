"""A task that knows whether its process ran its warm-up: it scores 1.0 only there (tests/test_rewards.py)."""

import os
from pathlib import Path

from rlad_ds.tasks.base import Task


def _mark() -> Path:
    return Path(os.environ["RLAD_TEST_WARM_MARK"])


def _warm_up() -> None:
    _mark().write_text(str(os.getpid()))


def _score(completion: str, example: dict) -> float:
    return 1.0 if _mark().is_file() and _mark().read_text() == str(os.getpid()) else 0.0


def task() -> Task:
    return Task(name="warm", prompt=lambda example: example["prompt"], score=_score, warm_up=_warm_up)
