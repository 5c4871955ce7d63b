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

import collections.abc
import difflib
import hashlib
import json
import types
import typing
from functools import cache

from rlad_ds.errors import ConfigError
from rlad_ds.isolation import STARTUP_TIMEOUT_S, IsolatedWorker, WorkerError, in_worker
from rlad_ds.tasks.base import Progress, Task

INSTRUCTION = "Think it through, then give your final answer inside <answer> </answer>."
# Problems scanned per problem wanted before a split counts as exhausted (small datasets repeat).
SCAN_FACTOR = 20
# The first problem is made in a worker under this deadline: some configs make one in hours (knights_knaves with
# n_people=50 searches 2^50 assignments), and a run must not wait for them silently.
PROBE_TIMEOUT_S = 10.0


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
    _check_types(name, registry[name][1], args)
    args_json = json.dumps(args, sort_keys=True)
    scorer = _dataset(name, args_json, 0, 1)  # also checks the config now, before any data is made
    has_answers = _probe(name, args_json)

    def generate(split: str, n: int, seed: int = 0) -> list[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        scan = SCAN_FACTOR * n + 100
        source = _dataset(name, args_json, seed, scan)
        chosen, progress = [], Progress(f"rg:{name} {split} problems generated", n)
        for index in range(scan):  # each index is drawn from its own seed, so stopping early is exact
            record = plain(source[index])
            if split_of(record["question"]) == split:
                chosen.append(record)
                progress(len(chosen))
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
    return Task(
        name=f"rg:{name}",
        prompt=prompt,
        score=score,
        generate=generate,
        subset=subset,
        reference=reference if has_answers else None,
    )


def _check_types(name: str, config_class, args: dict) -> None:
    """Each --task_args value against its field's type in the dataset's config (`n_people=2.5` for an int raised
    deep inside generation); fields of types JSON cannot write (enums, dates) are left to the config."""
    hints, defaults = typing.get_type_hints(config_class), config_class()
    for key, value in args.items():
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(
                f"--task_args {key}={json.dumps(value)}: rg:{name}'s {key} is {_type_name(hints[key])} (default "
                f"{json.dumps(getattr(defaults, key), default=str)}); give a value of that type"
            )


def _fits(value, kind) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if kind in (int, float, bool, str):
        if isinstance(value, bool) or kind is bool:  # JSON's true is not a number, nor 1 a boolean
            return isinstance(value, bool) and kind is bool
        return isinstance(value, kind) or kind is float and isinstance(value, int)
    if kind is type(None):
        return value is None
    if kind in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list):
            return False
        item = args[0] if args and (origin is list or len(args) == 2 and args[1] is Ellipsis) else None
        return item is None or all(_fits(element, item) for element in value)
    return True


def _type_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def probe(name: str, args_json: str, make: bool = True) -> bool | None:
    """Build the dataset (imports reasoning-gym, reads its files), and with `make` make its first problem and say
    whether it records an answer. `_probe` runs the two in a worker, only the second under PROBE_TIMEOUT_S."""
    dataset = _dataset(name, args_json, 0, 1)
    return dataset[0].get("answer") is not None if make else None


def _probe(name: str, args_json: str) -> bool:
    """`probe` in a worker process that is killed after PROBE_TIMEOUT_S (inline inside a reward worker, whose owner
    keeps the deadline); a ConfigError naming the --task_args when it cannot make one problem in time."""
    if in_worker():
        return probe(name, args_json)
    worker = IsolatedWorker("rlad_ds.tasks.rg:probe")
    shown = ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(args_json).items()) or "(none)"
    limit = STARTUP_TIMEOUT_S
    try:
        worker.call((name, args_json, False), limit)  # importing reasoning-gym takes seconds: not timed below
        limit = PROBE_TIMEOUT_S
        return worker.call((name, args_json, True), limit)
    except TimeoutError:
        raise ConfigError(
            f"rg:{name} made no problem in {limit:.0f} s with --task_args {shown}; ask for smaller "
            "problems (at that speed 10,000 of them would take over a day)"
        ) from None
    except WorkerError as error:
        raise ConfigError(f"rg:{name} cannot make a problem with --task_args {shown} ({error}); change them") from None
    finally:
        worker.kill()  # no idle interpreter for the length of the run


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
