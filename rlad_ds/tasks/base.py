"""What a task is: a prompt source, a prompt template and a verifier; and what counts as a correct answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("rlad_ds")
# A long loop (`Progress`) logs how far it is after FIRST_PROGRESS_S, then every PROGRESS_EVERY_S.
FIRST_PROGRESS_S, PROGRESS_EVERY_S = 2.0, 10.0


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
    - `size(split)` is how many distinct problems `generate` can make for a split, so that a larger count is refused
      before anything loads; None: no known limit.
    - `warm_up()` imports what `score` needs (a verifier's heavy libraries), so that a reward worker pays for it
      when it starts, not inside its first call's deadline; None: nothing to import.
    """

    name: str
    prompt: Callable[[dict], str]
    score: Callable[[str, dict], float]
    generate: Callable[[str, int, int], list[dict]] | None = None
    subset: Callable[[dict], str] = lambda example: "all"
    reference: Callable[[dict], str] | None = None
    size: Callable[[str], int] | None = None
    warm_up: Callable[[], None] | None = None


class Progress:
    """`progress(done)` inside a loop over `total` items logs `what: done / total (share), about N s left`, first after
    FIRST_PROGRESS_S and then every PROGRESS_EVERY_S: generating, rendering or checking many (or slow) problems shows
    that it moves. The log is the "rlad_ds" logger's, which the entry points show at INFO on rank 0 only."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.start = time.monotonic()
        self.next = self.start + FIRST_PROGRESS_S

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now < self.next or not 0 < done < self.total:
            return
        self.next = now + PROGRESS_EVERY_S
        left = (now - self.start) / done * (self.total - done)
        share = 100 * done / self.total
        logger.info("%s: %d / %d (%.0f%%), about %.0f s left", self.what, done, self.total, share, left)


def correct(scores):
    """Which scores are correct answers (a float, or a tensor elementwise): only a fully correct answer scores 1.0
    (`Task.score`'s contract), so a partial score is never counted as correct."""
    return scores >= 1.0
