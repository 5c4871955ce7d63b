"""Knights and Knaves (K&K): logic puzzles with 2..8 people and exactly one solution.

Records use the published K&K JSONL fields: `quiz` (the puzzle text), `names` (list of str), `solution`
(list of bool, True = knight), `solution_text` and `knight_knave` (the role words). The same fields load from
Logic-RL's K&K parquet (which adds verl's columns) and from reasoning-gym's K&K entries (`question`, with
`names`, `solution` and the role words `knight_knave_terms` under `metadata`), all with no `--columns`.
Puzzles whose role words are not knight/knave (reasoning-gym rotates in sage/fool, hero/villain...) are
asked and graded in their own words. Generated records add `statements`, the puzzle as nested lists
(`["telling-truth", i]` = "person i is a knight", `["lying", i]`, `["not", s]`, `["and", s, ...]`,
`["or", s, ...]`, `["->", a, b]`, `["<=>", a, b]`), so anyone can re-check the puzzle.

Generation: statements are sampled with reasoning-gym's `KKProblemSampler` (the mem-kk-logic sampler the
published data came from; seeded numpy RNG, so deterministic for a reasoning-gym version) and kept only
if a brute-force search over all 2^n assignments finds exactly one solution. The text, names and answer
format are ours, always with "knight" / "knave" (reasoning-gym also rotates in "saint/sinner" etc.).
A puzzle belongs to "test" iff a hash of its statements is even, else "train": the splits are disjoint
whatever the seed, and the same logical puzzle never appears in both under different names.

Grading: the model answers inside `<answer> ... </answer>` with one statement per person,
`(1) NAME is a knight` / `(2) NAME is a knave`. `score` is accuracy as in the paper: 1.0 only if every
person is named with the right role, else 0.0 (missing block, missing person, a person called both, a
hedge such as "knight/knave" or "a knight or a knave"). `person_accuracy` is the per-person fraction
(no partial credit in `score`).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Iterator
from functools import lru_cache

from rlad_ds.tasks.base import Task

SIZES = tuple(range(2, 9))
NAMES = (
    "Alice",
    "Ben",
    "Clara",
    "David",
    "Elena",
    "Felix",
    "Grace",
    "Henry",
    "Iris",
    "Jack",
    "Kate",
    "Leo",
    "Maya",
    "Noah",
    "Olivia",
    "Peter",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Uma",
    "Victor",
    "Wendy",
    "Xavier",
    "Yara",
    "Zoe",
)
# Small sizes have few distinct puzzles (about 200 per split for 2 people): after this many samples in a row
# without a new one, the size counts as exhausted and puzzles may repeat (with new names).
STALL_ATTEMPTS = 20_000
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_PRIMITIVE = ("telling-truth", "lying")


# ---------------------------------------------------------------- puzzle logic


def holds(statement, assignment) -> bool:
    """Truth of a statement (nested lists/tuples) when person i is a knight iff assignment[i]."""
    op = statement[0]
    if op == "telling-truth":
        return bool(assignment[statement[1]])
    if op == "lying":
        return not assignment[statement[1]]
    if op == "not":
        return not holds(statement[1], assignment)
    if op == "and":
        return all(holds(s, assignment) for s in statement[1:])
    if op == "or":
        return any(holds(s, assignment) for s in statement[1:])
    if op == "->":
        return (not holds(statement[1], assignment)) or holds(statement[2], assignment)
    if op == "<=>":
        return holds(statement[1], assignment) == holds(statement[2], assignment)
    raise ValueError(f"unknown K&K operator {op!r}")


def solutions(statements) -> list[tuple[bool, ...]]:
    """Every assignment where each knight's statement is true and each knave's is false."""
    return [
        assignment
        for assignment in itertools.product((True, False), repeat=len(statements))
        if all(holds(s, assignment) == assignment[i] for i, s in enumerate(statements))
    ]


def split_of(statements) -> str:
    digest = hashlib.sha256(repr(_as_tuples(statements)).encode()).digest()
    return "test" if digest[0] % 2 == 0 else "train"


def _as_tuples(statement):
    return tuple(_as_tuples(s) for s in statement) if isinstance(statement, (list, tuple)) else statement


def _as_lists(statement):
    return [_as_lists(s) for s in statement] if isinstance(statement, (list, tuple)) else statement


# ---------------------------------------------------------------- text


def describe(statement, names) -> str:
    """English for a statement, parenthesising compound parts."""
    op = statement[0]
    if op in _PRIMITIVE:
        return f"{names[statement[1]]} is a {'knight' if op == 'telling-truth' else 'knave'}"
    if op == "not":
        inner = statement[1]
        if inner[0] in _PRIMITIVE:  # "not a knight" reads better as "a knave"
            return describe(["lying" if inner[0] == "telling-truth" else "telling-truth", inner[1]], names)
        return f"it is not the case that {_part(inner, names)}"
    if op in ("and", "or"):
        return f" {op} ".join(_part(s, names) for s in statement[1:])
    if op == "->":
        return f"if {_part(statement[1], names)} then {_part(statement[2], names)}"
    if op == "<=>":
        return f"{_part(statement[1], names)} if and only if {_part(statement[2], names)}"
    raise ValueError(f"unknown K&K operator {op!r}")


def _part(statement, names) -> str:
    text = describe(statement, names)
    return text if statement[0] in _PRIMITIVE else f"({text})"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def quiz_text(statements, names) -> str:
    said = " ".join(f'{name} says, "{describe(s, names)}."' for name, s in zip(names, statements))
    return (
        "A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
        f"and knaves always lie. You meet {len(names)} inhabitants: {_listing(list(names))}. {said} "
        "So who is a knight and who is a knave?"
    )


def solution_text(names, solution) -> str:
    return _listing([f"{name} is a {'knight' if knight else 'knave'}" for name, knight in zip(names, solution)]) + "."


# ---------------------------------------------------------------- generation


def _sampler(seed: int, n_people: int):
    import numpy as np
    from reasoning_gym.logic.knights_knaves import KKProblemSampler

    # depth 2 / width 2 are the settings of the published K&K data for every size.
    entropy = int(np.random.SeedSequence([seed, n_people]).generate_state(1)[0])
    return KKProblemSampler(rand_seed=entropy, n_people=n_people, depth_constraint=2, width_constraint=2)


def puzzles(split: str, n_people: int, seed: int, stall_attempts: int = STALL_ATTEMPTS) -> Iterator[dict]:
    """Endless puzzles of one size and split, each with exactly one solution; deterministic in the args.

    Puzzles are distinct (as logic, whatever the names) until the sampler stalls, then they may repeat.
    """
    sampler = _sampler(seed, n_people)
    rng = random.Random(f"kk:{split}:{n_people}:{seed}")
    seen, misses = set(), 0
    while True:
        statements = sampler.sample()
        exhausted = misses >= stall_attempts  # sticky: misses stop counting once reached
        wanted = (exhausted or statements not in seen) and split_of(statements) == split
        found = solutions(statements) if wanted else []
        if len(found) != 1:
            misses += not exhausted
            continue
        seen.add(statements)
        misses = misses if exhausted else 0
        names = rng.sample(NAMES, n_people)
        yield {
            "quiz": quiz_text(statements, names),
            "names": names,
            "solution": list(found[0]),
            "solution_text": solution_text(names, found[0]),
            "statements": _as_lists(statements),
        }


def generate(split: str, n: int, seed: int = 0, sizes=SIZES) -> list[dict]:
    """`n` puzzles of `split`, sizes taken in turn from `sizes` (2..8 people by default)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    streams = {size: puzzles(split, size, seed) for size in sizes}
    return [next(streams[sizes[i % len(sizes)]]) for i in range(n)]


# ---------------------------------------------------------------- grading


def _get(example: dict, key: str):
    """A field at the top level, else under `metadata` (reasoning-gym's entries)."""
    value = example.get(key)
    metadata = example.get("metadata")
    return metadata.get(key) if value is None and isinstance(metadata, dict) else value


def roles(example: dict) -> tuple[str, str]:
    """The (knight, knave) words of a record: `knight_knave` (K&K, Logic-RL) or `knight_knave_terms`
    (reasoning-gym), else knight/knave."""
    terms = _get(example, "knight_knave") or _get(example, "knight_knave_terms") or {}
    knight, knave = terms.get("knight", "knight"), terms.get("knave", "knave")
    if not (
        isinstance(knight, str)
        and isinstance(knave, str)
        and knight.strip()
        and knave.strip()
        and knight.lower() != knave.lower()
    ):
        raise ValueError(f"K&K record's role words must be two different words, got {knight!r} / {knave!r}")
    return knight.strip().lower(), knave.strip().lower()


def gold(example: dict) -> tuple[list[str], list[bool]]:
    """(names, solution) of a record; raises ValueError naming the bad field."""
    names = _get(example, "names")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(x, str) for x in names):
        raise ValueError("K&K record needs 'names', a non-empty list of strings")
    solution = _get(example, "solution")
    if solution is None and isinstance(example.get("solution_text"), str):
        solution = verdicts(example["solution_text"], names, roles(example))
        if None in solution:
            raise ValueError(f"cannot read every person's role from 'solution_text': {example['solution_text']!r}")
    if not isinstance(solution, (list, tuple)) or not all(isinstance(x, bool) for x in solution):
        raise ValueError("K&K record needs 'solution', a list of booleans (True = knight)")
    if len(solution) != len(names):
        raise ValueError(f"K&K record has {len(solution)} solution entries for {len(names)} names")
    return list(names), list(solution)


@lru_cache(maxsize=4096)
def _claim_pattern(name: str, knight: str, knave: str) -> re.Pattern:
    # The lookahead rejects hedges: "knight/knave", "a knight or a knave".
    words = f"{re.escape(knight)}|{re.escape(knave)}"
    return re.compile(rf"(?<!\w){re.escape(name)}\s+is\s+(?:an?\s+)?({words})(?![\w/])(?!\s+or\b)", re.IGNORECASE)


def verdicts(text: str, names, role_words: tuple[str, str] = ("knight", "knave")) -> list[bool | None]:
    """Per person: True (knight), False (knave), or None when absent or claimed both ways."""
    out = []
    for name in names:
        claims = {match.lower() == role_words[0] for match in _claim_pattern(name, *role_words).findall(text)}
        out.append(claims.pop() if len(claims) == 1 else None)
    return out


def answer_block(completion: str) -> str | None:
    """The last `<answer> ... </answer>` block, or None."""
    blocks = _ANSWER_BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def person_accuracy(completion: str, example: dict) -> float:
    """Fraction of people given the right role (missing or contradictory people count as wrong)."""
    names, solution = gold(example)
    block = answer_block(completion)
    if block is None:
        return 0.0
    return sum(v == s for v, s in zip(verdicts(block, names, roles(example)), solution)) / len(names)


def score(completion: str, example: dict) -> float:
    """1.0 iff the answer block names every person with the right role, else 0.0."""
    return 1.0 if person_accuracy(completion, example) == 1.0 else 0.0


def prompt(example: dict) -> str:
    names, _ = gold(example)
    knight, knave = roles(example)
    quiz = example.get("quiz") or example.get("question")
    if not isinstance(quiz, str) or not quiz.strip():
        raise ValueError("K&K record needs 'quiz' (or reasoning-gym's 'question'), the puzzle text")
    lines = "\n".join(f"({i}) {name} is {_article(knight)}/{knave}" for i, name in enumerate(names, 1))
    return (
        f"{quiz}\n\nThink it through, then give your final answer inside <answer> </answer>, one line per "
        f"person, each saying either '{_article(knight)}' or '{_article(knave)}':\n<answer>\n{lines}\n</answer>"
    )


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def reference(example: dict) -> str:
    """The gold answer in the prompted format."""
    names, solution = gold(example)
    knight, knave = roles(example)
    lines = "\n".join(
        f"({i}) {name} is {_article(knight if is_knight else knave)}"
        for i, (name, is_knight) in enumerate(zip(names, solution), 1)
    )
    return f"<answer>\n{lines}\n</answer>"


def subset(example: dict) -> str:
    return f"PPL{len(_get(example, 'names'))}"


TASK = Task(name="kk", prompt=prompt, score=score, generate=generate, subset=subset, reference=reference)
