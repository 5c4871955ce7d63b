"""A dense-reward task for end-to-end tests: a random tiny model already earns varied rewards on it.

Used as `--task toy_task:task` (tests put this folder on PYTHONPATH), which also exercises loading a
user task module by name.
"""

from rlad_ds.tasks.base import Task


def _generate(split: str, n: int, seed: int) -> list[dict]:
    offset = 0 if split == "train" else 10_000
    return [{"prompt": f"digits {offset + seed * 7919 + i}:"} for i in range(n)]


def _score(completion: str, example: dict) -> float:
    """The fraction of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


def task() -> Task:
    return Task(name="toy", prompt=lambda example: example["prompt"], score=_score, generate=_generate)


def _any_digit(completion: str, example: dict) -> float:
    """1 if the completion holds a digit: a 0/1 reward whose groups are often all equal (for --dynamic_sampling)."""
    return float(any(c.isdigit() for c in completion))


def binary_task() -> Task:
    return Task(name="toy_binary", prompt=lambda example: example["prompt"], score=_any_digit, generate=_generate)
