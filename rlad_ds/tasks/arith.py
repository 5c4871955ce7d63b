"""Column-wise 3-digit addition: the embedded demo's small verifiable reasoning task.

An example is a pair of 3-digit numbers (100..999). The prompt is the bare sum, e.g. ``347+285=``; the
worked solution (the SFT target, see `solution`) adds one column at a time from the units up, each column
written as ``digit_a+digit_b+carry_in=`` followed by two digits (carry out, result digit), then the
final answer after ``>`` as four digits::

    347+285=  ->  7+5+0=12|4+8+1=13|3+2+1=06|>0632

Grading (`score`): only the final answer is graded, never the worked steps. The answer is what follows
the last ``>`` in the completion, which must be 1 to 4 digits (leading zeros allowed) and nothing else;
1.0 iff its value is the true sum, 0.0 otherwise, including malformed or truncated text. Anything after an
EOS string ``<|im_end|>`` is ignored, so completions decoded with or without special tokens score alike.

Splits: an unordered pair {a, b} belongs to "test" iff a hash of it falls in the lowest `TEST_PERCENT`
percent, else to "train"; so the splits are disjoint, fixed for every seed, and a test sum is never seen
in training with its operands swapped. `generate(split, n, seed)` draws `n` distinct ordered pairs of that
split, deterministically from `seed`.

`subset(example)` is the number of carries, "carries0".."carries3" (a carry into the thousands counts),
so an evaluation shows where a student fails.
"""

from __future__ import annotations

import hashlib
import random
import re

from rlad_ds.errors import ConfigError
from rlad_ds.tasks.base import Progress, Task

LOW, HIGH = 100, 999
TEST_PERCENT = 10
EOS_TEXT = "<|im_end|>"
ALPHABET = "0123456789+=|>"  # every character of every prompt and worked solution
_ANSWER = re.compile(r"\d{1,4}")


def split_of(a: int, b: int) -> str:
    """ "test" or "train" for the pair (a, b); symmetric in a and b."""
    lo, hi = min(a, b), max(a, b)
    digest = hashlib.sha256(f"arith:{lo}+{hi}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def carries(a: int, b: int) -> int:
    """How many of the three columns produce a carry."""
    count, carry = 0, 0
    for _ in range(3):
        carry = (a % 10 + b % 10 + carry) // 10
        count += carry
        a, b = a // 10, b // 10
    return count


def make_example(a: int, b: int) -> dict:
    if not (LOW <= a <= HIGH and LOW <= b <= HIGH):
        raise ValueError(f"operands must be in {LOW}..{HIGH}, got {a}, {b}")
    return {"a": a, "b": b, "answer": a + b, "carries": carries(a, b)}


# Ordered pairs (a, b) per split, fixed by `split_of` (counting them takes seconds; tests/test_demo.py does).
SPLIT_SIZES = {"train": 729_227, "test": 80_773}


def split_size(split: str) -> int:
    """How many ordered pairs (a, b) the split holds (train ~90%, test ~10% of 810,000)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return SPLIT_SIZES[split]


def generate(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct examples of `split` ("train" or "test"), deterministic in (split, n, seed)."""
    if n > split_size(split):
        raise ConfigError(f"the arith {split} split has {split_size(split):,} distinct problems, asked for {n:,}")
    rng = random.Random(f"arith:{split}:{seed}")
    seen, out, progress = set(), [], Progress(f"arith {split} problems generated", n)
    while len(out) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if (a, b) in seen or split_of(a, b) != split:
            continue
        seen.add((a, b))
        out.append(make_example(a, b))
        progress(len(out))
    return out


def prompt(example: dict) -> str:
    """The user text: the bare sum, e.g. ``347+285=``."""
    return f"{example['a']}+{example['b']}="


def solution(example: dict) -> str:
    """The worked, column-by-column solution (without EOS): the SFT target."""
    a, b, carry, steps = example["a"], example["b"], 0, []
    for _ in range(3):
        da, db = a % 10, b % 10
        total = da + db + carry
        steps.append(f"{da}+{db}+{carry}={total:02d}")
        carry, a, b = total // 10, a // 10, b // 10
    return "|".join(steps) + f"|>{example['a'] + example['b']:04d}"


def score(completion: str, example: dict) -> float:
    """1.0 iff the digits after the last ``>`` equal the true sum (steps are not graded), else 0.0."""
    text = completion.split(EOS_TEXT, 1)[0].replace("<|pad|>", "").strip()
    if ">" not in text:
        return 0.0
    answer = text.rsplit(">", 1)[1]
    if not _ANSWER.fullmatch(answer):
        return 0.0
    return 1.0 if int(answer) == example["a"] + example["b"] else 0.0


def subset(example: dict) -> str:
    return f"carries{example['carries']}"


TASK = Task(
    name="arith", prompt=prompt, score=score, generate=generate, subset=subset, reference=solution, size=split_size
)
