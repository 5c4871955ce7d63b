"""Math word problems graded with math-verify.

Records: GSM8K (`question`, `answer` ending in `#### N`), MATH (`problem`, `solution` with `\\boxed{...}`,
optionally `answer`), or generic (`prompt`, `answer`). A record's `subset` field, if any, names its
evaluation subset (e.g. map `subset=level` when loading MATH), else "all".

The completion's final answer is the last `\\boxed{...}`, else the last `<answer> ... </answer>` block,
else the last number. It is compared with the gold answer by math-verify (so 1/2, 0.5, \\frac{1}{2} and
\\dfrac{1}{2} agree).

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
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_local = threading.local()


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def extract_answer(completion: str) -> str | None:
    """The completion's final answer: last \\boxed{}, else last <answer> block, else last number."""
    boxed = last_boxed(completion)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    blocks = [b.strip() for b in _ANSWER_BLOCK.findall(completion) if b.strip()]
    if blocks:
        return blocks[-1]
    numbers = _NUMBER.findall(completion)
    return numbers[-1].rstrip(",") if numbers else None


def gold_answer(example: dict) -> str:
    """The reference answer of a GSM8K, MATH or generic record; raises ValueError if there is none."""
    answer = example.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        gsm8k = _GSM8K_ANSWER.search(answer)
        return gsm8k.group(1).replace(",", "").strip() if gsm8k else answer.strip()
    solution = example.get("solution")
    if isinstance(solution, str):
        boxed = last_boxed(solution)
        if boxed is not None and boxed.strip():
            return boxed.strip()
        raise ValueError("math record's 'solution' has no \\boxed{...} answer")
    raise ValueError("math record needs 'answer' (text or number) or 'solution' with \\boxed{...}")


def question(example: dict) -> str:
    for key in ("prompt", "question", "problem"):
        if isinstance(example.get(key), str) and example[key].strip():
            return example[key]
    raise ValueError("math record needs 'prompt', 'question' or 'problem' text")


def _as_latex(text: str) -> str:
    # math-verify looks for LaTeX inside $...$ or \boxed{}; plain text ("1/2", "0.5") is read as an expression.
    return text if "$" in text else f"${text}$"


def verify_strings(gold: str, answer: str, signal_timeout_s: int | None = None) -> bool:
    """math-verify's verdict on `answer` against `gold` (both plain or LaTeX text), in this process."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Our deadline replaces math-verify's; its "timeout disabled" and "timeout" warnings are noise here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(_as_latex(gold), configs, parsing_timeout=signal_timeout_s)
    answer_parsed = parse(_as_latex(answer), configs, parsing_timeout=signal_timeout_s)
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
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    return 1.0 if is_equivalent(gold, answer, timeout_s) else 0.0


def prompt(example: dict) -> str:
    return f"{question(example)}\n\n{INSTRUCTION}"


def subset(example: dict) -> str:
    return str(example.get("subset", "all"))


TASK = Task(name="math", prompt=prompt, score=score, generate=None, subset=subset)
