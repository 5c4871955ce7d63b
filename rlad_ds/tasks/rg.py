"""reasoning-gym as a task source: `--task rg:<dataset>` trains on any of its procedural datasets.

- Prompts: the dataset's own generator, configured by `--task_args` (its config fields: sizes, difficulty;
  `seed` and `size` are ours to set), seeded by `--seed`. A problem belongs to "test" iff a hash of its
  question is even, else to "train", so the splits never share a question whatever the seed or sizes.
- Records are reasoning-gym's entries as exported (`question`, `answer`, `metadata`), made JSON-plain, so a
  file of them (`--dataset export.jsonl --task rg:<dataset>`) trains exactly like the generated ones.
- Verifier: the dataset's own `score_answer` (some give partial credit, e.g. K&K's 0.3 + 0.7 x the share of
  people right), on the model's final `<answer> ... </answer>` block as reasoning-gym extracts it; no block
  scores 0.
- Evaluation subsets: the per-problem difficulty knobs reasoning-gym records in `metadata["difficulty"]`
  (e.g. `n_people=3`), where they are single values rather than configured ranges.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from functools import cache

from rlad_ds.errors import ConfigError
from rlad_ds.tasks.base import Task

INSTRUCTION = "Think it through, then give your final answer inside <answer> </answer>."
# Problems scanned per problem wanted before a split counts as exhausted (small datasets repeat).
SCAN_FACTOR = 20


def plain(value):
    """JSON-plain copy of a reasoning-gym value (numpy scalars and strings, tuples, sets)."""
    return json.loads(json.dumps(value, default=_to_json))


def _to_json(value):
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


def split_of(question: str) -> str:
    return "test" if hashlib.sha256(question.encode()).digest()[0] % 2 == 0 else "train"


def _registry() -> dict:
    import reasoning_gym  # noqa: F401  (registers the datasets)
    from reasoning_gym.factory import DATASETS

    return DATASETS


@cache
def _dataset(name: str, args_json: str, seed: int, size: int):
    from reasoning_gym import create_dataset

    try:
        return create_dataset(name, seed=seed, size=size, **json.loads(args_json))
    except (TypeError, ValueError, AssertionError) as error:  # unknown field / a value its config refuses
        fields = ", ".join(f for f in _registry()[name][1].__dataclass_fields__ if f not in ("seed", "size"))
        raise ConfigError(f"--task_args for rg:{name}: {error}; its config fields are: {fields}") from None


def make_task(name: str, args: dict) -> Task:
    """The `rg:<name>` task with reasoning-gym config `args`; ConfigError for an unknown dataset or field."""
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see reasoning_gym.factory.DATASETS"
        raise ConfigError(f"reasoning-gym has no dataset {name!r}; {hint}")
    if {"seed", "size"} & set(args):
        raise ConfigError("--task_args: seed and size are set by --seed and --train_size / --eval_size")
    args_json = json.dumps(args, sort_keys=True)
    scorer = _dataset(name, args_json, 0, 1)  # also checks the config now, before any data is made

    def generate(split: str, n: int, seed: int = 0) -> list[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        scan = SCAN_FACTOR * n + 100
        source = _dataset(name, args_json, seed, scan)
        chosen = []
        for index in range(scan):  # each index is drawn from its own seed, so stopping early is exact
            record = plain(source[index])
            if split_of(record["question"]) == split:
                chosen.append(record)
                if len(chosen) == n:
                    break
        if len(chosen) < n:
            raise ConfigError(
                f"rg:{name} gave only {len(chosen)} {split} problems in {scan} draws; "
                "ask for fewer or widen its config with --task_args"
            )
        return chosen

    def score(completion: str, example: dict) -> float:
        from reasoning_gym.utils import extract_answer

        prompt(example)
        answer = extract_answer(completion)
        return 0.0 if answer is None else float(scorer.score_answer(answer, entry=example))

    # A few datasets (boxnet, rush_hour...) check answers by simulation and record none: no gold to check.
    has_answers = scorer[0].get("answer") is not None
    return Task(
        name=f"rg:{name}",
        prompt=prompt,
        score=score,
        generate=generate,
        subset=subset,
        reference=reference if has_answers else None,
    )


def reference(example: dict) -> str:
    if example.get("answer") is None:
        raise ValueError("reasoning-gym record has no 'answer'")
    return f"<answer>{example['answer']}</answer>"


def prompt(example: dict) -> str:
    if not isinstance(example.get("question"), str) or not example["question"].strip():
        raise ValueError("reasoning-gym record needs 'question' (and usually 'answer' and 'metadata')")
    return f"{example['question']}\n\n{INSTRUCTION}"


def subset(example: dict) -> str:
    metadata = example.get("metadata") or {}
    difficulty = metadata.get("difficulty")
    if not isinstance(difficulty, dict):
        return "all" if difficulty is None else f"difficulty={difficulty}"
    knobs = []
    for key, configured in difficulty.items():
        value = metadata.get(key, configured)  # the problem's own value where recorded, else the config's
        if not isinstance(value, (list, tuple, dict)):
            knobs.append(f"{key}={value}")
    return ",".join(knobs) or "all"
