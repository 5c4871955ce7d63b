"""What a task is: a prompt source, a prompt template and a verifier; and what counts as a correct answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """A verifiable task, registered by name in `rlad_ds.tasks`.

    - `generate(split, n, seed)` makes `n` raw examples (dicts) for "train" or "test" deterministically
      from `seed`; None for tasks that only read user datasets.
    - `prompt(example)` is the user-message text the model sees (the chat template is applied elsewhere).
    - `score(completion, example)` is accuracy in [0, 1]: 1.0 only for a fully correct answer.
    - `subset(example)` names the evaluation subset an example belongs to (e.g. "PPL4" for K&K).
    - `reference(example)` is a completion that must score 1.0 (the gold answer in the answer format): data
      loading scores it to find records whose gold the verifier cannot read. None: no such check.
    """

    name: str
    prompt: Callable[[dict], str]
    score: Callable[[str, dict], float]
    generate: Callable[[str, int, int], list[dict]] | None = None
    subset: Callable[[dict], str] = lambda example: "all"
    reference: Callable[[dict], str] | None = None


def correct(scores):
    """Which scores are correct answers (a float, or a tensor elementwise): only a fully correct answer scores 1.0
    (`Task.score`'s contract), so a partial score is never counted as correct."""
    return scores >= 1.0
