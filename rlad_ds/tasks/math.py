"""Math problems graded with math-verify, reading answers the way math-verify itself does.

Records (no `--columns` needed for any of these published shapes):
- GSM8K: `question`, `answer` ending in `#### 72`;
- MATH / NuminaMath-CoT: `problem`, `solution` with the answer in `\\boxed{...}` (several boxes = a set);
- MATH-500, AIME, DeepScaleR, NuminaMath-1.5, OpenR1-Math: `problem`, `answer` (text or number; capitalised
  keys such as AIME's `Problem` / `Answer` too);
- verl's parquet (`prompt` = chat messages, `reward_model.ground_truth`), and generic `prompt` + `answer`.
The short `answer` wins over `solution`. A record's `subset` (else `level`) names its evaluation subset.
A gold of "proof" / "notfound" (NuminaMath-1.5's markers for rows with no checkable answer) is refused.

Reading the completion: math-verify's own extraction with its test suite's settings (boxed answers first,
several boxes as a set, then LaTeX, then plain expressions near "final answer" anchors, then the last
one), over the whole completion, or over the last `<answer> ... </answer>` block when there is no box.
Currency (`\\$18.90`), percent, units, thousands separators and `\\!` spacing are math-verify's
normalisation. `python -m benchmarks.math_agreement` measures agreement with math-verify's test suite.

Timeout: sympy can hang on inputs like `9^9^9^9^9`. math-verify's own timeout uses SIGALRM, which only
works in a process's main thread and cannot interrupt C code. So a comparison runs in an isolated worker
process (`rlad_ds.isolation.IsolatedWorker`, one per calling thread, started on first use and kept) that is
killed at the deadline; a timeout scores 0. Inside a `RewardRunner` worker, whose parent already enforces
a deadline, the comparison runs in place, with math-verify's signal timeout as a second guard.
"""

from __future__ import annotations

import logging
import math
import re
import threading

from rlad_ds.isolation import IsolatedWorker, in_worker
from rlad_ds.tasks.base import Task

TIMEOUT_S = 5.0
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NO_ANSWER_MARKERS = ("proof", "notfound")
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[")  # an unescaped $, \( or \[
_local = threading.local()


def boxed_contents(text: str) -> list[str]:
    """The contents of every closed `\\boxed{...}` / `\\fbox{...}` in `text` (braces balanced), in order."""
    found = []
    for match in _BOXED.finditer(text):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[match.end() : i])
                break
    return found


def _field(example: dict, key: str):
    """`example[key]`, or its capitalised form (AIME releases use `Problem` / `Answer`)."""
    value = example.get(key)
    return example.get(key.capitalize()) if value is None else value


def gold_answer(example: dict) -> str:
    """The reference answer of a record (see the module doc); raises ValueError if there is none."""
    if example.get("question_type") == "proof":  # NuminaMath-1.5: a proof has no answer to check
        raise ValueError("the record is a proof (question_type 'proof'); it has no checkable answer")
    answer = _field(example, "answer")
    if answer is None and isinstance(example.get("reward_model"), dict):
        answer = example["reward_model"].get("ground_truth")  # verl's parquet
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        gsm8k = _GSM8K_ANSWER.search(answer)
        gold = gsm8k.group(1).replace(",", "").strip() if gsm8k else answer.strip()
        if gold.lower() in NO_ANSWER_MARKERS:
            raise ValueError(f"the gold answer is {gold!r}, a marker for a problem with no checkable answer")
        return gold
    solution = _field(example, "solution")
    if isinstance(solution, str):
        boxes = [box.strip() for box in boxed_contents(solution) if box.strip()]
        if not boxes:
            raise ValueError("math record's 'solution' has no \\boxed{...} answer")
        # Boxed again, so that the answer is read as a box is (several boxes: a set), as in the source.
        return ", ".join(f"\\boxed{{{box}}}" for box in boxes)
    raise ValueError("math record needs 'answer' (text or number) or 'solution' with \\boxed{...}")


def question(example: dict) -> str:
    for key in ("prompt", "question", "problem"):
        value = _field(example, key)
        if isinstance(value, list) and value and isinstance(value[-1], dict):  # chat messages (verl)
            value = value[-1].get("content")
        if isinstance(value, str) and value.strip():
            return value
    raise ValueError("math record needs 'prompt', 'question' or 'problem' text")


def answer_region(completion: str) -> str:
    """Where the final answer is read: the whole completion if it boxes one, else its last non-empty
    `<answer>` block, else the whole completion."""
    if _BOXED.search(completion):
        return completion
    blocks = [block for block in _ANSWER_BLOCK.findall(completion) if block.strip()]
    return blocks[-1] if blocks else completion


def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # Math-Verify's own test settings: boxed answers first, then LaTeX, then plain expressions.
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def verify_strings(gold: str, answer: str, signal_timeout_s: int | None = None) -> bool:
    """math-verify's verdict on the answer read from `answer` (a completion, or plain or LaTeX text) against
    `gold`, in this process."""
    from math_verify import parse, verify

    # Our deadline replaces math-verify's; its "timeout disabled" and "timeout" warnings are noise here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    timeout = {"parsing_timeout": signal_timeout_s}
    # A bare gold ("\\left( 3, \\frac{\\pi}{2} \\right)", "1,000") is one answer: read it whole, as if boxed,
    # rather than let the expression reader pick a number out of it.
    bare = not _BOXED.search(gold) and not _MATH_DELIMITER.search(gold)
    gold_parsed = (bare and parse(f"\\boxed{{{gold}}}", _configs(), **timeout)) or parse(gold, _configs(), **timeout)
    answer_parsed = parse(answer, _configs(), **timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=signal_timeout_s))


def is_equivalent(gold: str, answer: str, timeout_s: float = TIMEOUT_S) -> bool:
    """`verify_strings` with a hard deadline; False on timeout."""
    if in_worker():
        main = threading.current_thread() is threading.main_thread()
        return verify_strings(gold, answer, max(1, math.ceil(timeout_s)) if main else None)
    if getattr(_local, "worker", None) is None:
        _local.worker = IsolatedWorker("rlad_ds.tasks.math:verify_strings")
    try:
        return bool(_local.worker.call((gold, answer, None), timeout_s))
    except TimeoutError:
        return False


def score(completion: str, example: dict, timeout_s: float = TIMEOUT_S) -> float:
    """1.0 iff the completion's final answer equals the gold answer by math-verify, else 0.0."""
    gold = gold_answer(example)  # first, so a bad record raises even for an empty completion
    return 1.0 if is_equivalent(gold, answer_region(completion), timeout_s) else 0.0


def reference(example: dict) -> str:
    """A completion that must score 1: the gold answer, boxed."""
    gold = gold_answer(example)
    return gold if _BOXED.match(gold) else f"\\boxed{{{gold}}}"


def prompt(example: dict) -> str:
    gold_answer(example)  # a record without a readable gold fails when it loads, not when it is scored
    return f"{question(example)}\n\n{INSTRUCTION}"


def subset(example: dict) -> str:
    return str(next((_field(example, key) for key in ("subset", "level") if _field(example, key) is not None), "all"))


def _import_math_verify() -> None:
    import math_verify  # noqa: F401  (and sympy with it: seconds, once per worker)


TASK = Task(
    name="math",
    prompt=prompt,
    score=score,
    generate=None,
    subset=subset,
    reference=reference,
    warm_up=_import_math_verify,
)
