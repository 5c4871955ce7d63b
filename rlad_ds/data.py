"""Prompt data: records from a source (`rlad_ds.data_sources`) or the task's own generator, mapped to the task's
columns, checked, and rendered as prompts.

`load_examples` returns `Examples`: a list of `Example(text, record)`, where `record` is the raw row (after
column mapping) that the task's verifier reads, and `text` is the prompt the model sees: the task's
user message put through the student tokenizer's chat template (optionally after a system prompt), or
through a raw template string containing `{prompt}`, or left bare.

`load_train_examples` reads a `rlad_ds.config.schema.DataConfig`, `load_eval_examples` a whole `Config` (its
`eval` section); both return the trainer's form (records with a "prompt_text" key).

A row is usable when every mapped column exists (`--columns` takes dotted paths into nested records,
`names=metadata.names`), `task.prompt(record)` does not raise (tasks raise ValueError/KeyError naming the
bad field), and the verifier accepts it: given a `check` (the loaders pass `RewardRunner.check_records`),
every row's gold answer is scored against itself in the time-limited reward workers, so a gold the verifier
cannot read, a verifier that raises on a row, or one that hangs on it is reported here as `file.jsonl:17:
...`, not found later as a prompt that never earns a reward. Given the model's context (`max_prompt_tokens`:
max_position_embeddings minus max_new_tokens), a prompt longer than it is a bad row too, generated ones
included; so is a prompt the tokenizer cannot write (`unwritable`: characters it has no tokens for are lost). A bad
row is an error naming its place, or with `skip_bad_rows=True` is skipped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rlad_ds.data_sources import Unparsable, read_rows, saved_splits
from rlad_ds.errors import ConfigError
from rlad_ds.rewards import RewardRunner
from rlad_ds.tasks import get_task
from rlad_ds.tasks.base import Progress, Task

MAX_KEPT_MESSAGES = 20
CHECK_CHUNK = 4096  # prompts tokenized at once by `prompt_problems`


@dataclass(frozen=True)
class Example:
    text: str  # the rendered prompt
    record: dict  # the raw row, after column mapping


class Examples(list):
    """A list of `Example` (of records, from `load_train_examples`), plus how many bad rows were skipped and
    the first messages about them."""

    def __init__(self, items: Iterable[Example] = (), skipped: int = 0, messages: list[str] | None = None):
        super().__init__(items)
        self.skipped = skipped
        self.messages = messages or []


def parse_columns(columns: str | dict | None) -> dict[str, str]:
    """`"prompt=question,answer=answer"` (or a dict) -> {task column: source column}."""
    if columns is None:
        return {}
    if isinstance(columns, dict):
        return dict(columns)
    mapping = {}
    for pair in filter(None, (p.strip() for p in columns.split(","))):
        target, sep, source = (part.strip() for part in pair.partition("="))
        if not sep or not target or not source:
            raise ConfigError(f"bad column mapping {pair!r}; write task_column=dataset_column, e.g. prompt=question")
        mapping[target] = source
    return mapping


def column(record: dict, path: str):
    """`record[path]`, where a dotted path walks into nested records (`metadata.names`); KeyError if absent.
    A key that itself contains dots is found before its parts are tried."""
    if path in record:
        return record[path]
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"missing column {path!r} (row has: {', '.join(map(str, record)) or 'nothing'})")
        value = value[part]
    return value


def apply_columns(record: dict, mapping: dict[str, str]) -> dict:
    """A copy of `record` with each mapped task column set from its source column (a dotted path)."""
    return {**record, **{target: column(record, source) for target, source in mapping.items()}}


class Renderer:
    """Turns a task's user message into the prompt text: chat template, raw `{prompt}` template, or bare."""

    def __init__(self, tokenizer=None, template: str | None = None, system_prompt: str | None = None):
        if tokenizer is not None and template is not None:
            raise ConfigError("give either a tokenizer (chat template) or a raw template, not both")
        if template is not None and "{prompt}" not in template:
            raise ConfigError(f"raw template {template!r} has no {{prompt}} placeholder; add one")
        if system_prompt is not None and tokenizer is None:
            raise ConfigError(
                "a system prompt needs the tokenizer's chat template; pass the tokenizer "
                "or put the system text in the raw template"
            )
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template; pass a raw template with {prompt} instead")
        self.tokenizer, self.template, self.system_prompt = tokenizer, template, system_prompt

    def __call__(self, user_text: str) -> str:
        if self.tokenizer is not None:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": user_text})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.template is not None:
            return self.template.replace("{prompt}", user_text)  # not str.format: prompts hold LaTeX braces
        return user_text


def load_examples(
    task: Task,
    source: str | Path | None = None,
    *,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    columns: str | dict | None = None,
    tokenizer=None,
    template: str | None = None,
    system_prompt: str | None = None,
    skip_bad_rows: bool = False,
    check: Callable[[Sequence[dict]], dict[int, str]] | None = None,
    check_prompts: Callable[[Sequence[str]], dict[int, str]] | None = None,
) -> Examples:
    """Examples for `task` from `source` (see the module doc); `n` caps file rows or sets the generated count.
    `check(records)` returns {index: why} for records the verifier rejects (see the module doc), and
    `check_prompts(texts)` the same for rendered prompts, generated ones included."""
    render = Renderer(tokenizer, template, system_prompt)
    mapping = parse_columns(columns)
    if n is not None and n < 1:
        raise ConfigError(f"need n >= 1 examples, got {n}")
    if source is None:
        examples = _generated(task, split, n, seed, render)
        places, check = [f"generated {split} problem {i + 1}" for i in range(len(examples))], None
    else:
        examples, places = Examples(), []
        for place, row in read_rows(source, split):
            try:
                record = _checked(task, row, mapping)
            except (ValueError, KeyError, TypeError) as error:
                _bad_row(examples, f"{place}: {_message(error)}", skip_bad_rows)
                continue
            examples.append(Example(render(task.prompt(record)), record))
            places.append(place)
            if n is not None and len(examples) == n:
                break
    # Prompts first: the gold check runs in the reward workers, and need not for rows dropped anyway.
    for checker, part in ((check_prompts, "text"), (check, "record")):
        if checker is not None and examples:
            _drop(examples, places, checker([getattr(example, part) for example in examples]), skip_bad_rows)
    if not examples:
        detail = f" ({examples.skipped} bad rows skipped; first: {examples.messages[0]})" if examples.skipped else ""
        raise ConfigError(f"{source or f'generated {split} problems'}: no usable rows{detail}")
    return examples


def _drop(examples: Examples, places: list[str], problems: dict[int, str], skip: bool) -> None:
    """Report the examples at the indices of `problems` ({index: why}), or with `skip` drop and count them."""
    for index in sorted(problems):
        _bad_row(examples, f"{places[index]}: {problems[index]}", skip)
    kept = [index for index in range(len(examples)) if index not in problems]
    examples[:], places[:] = [examples[index] for index in kept], [places[index] for index in kept]


def prompt_problems(tokenizer, max_prompt_tokens: int | None, texts: Sequence[str]) -> dict[int, str]:
    """{index: why} for the prompts `tokenizer` cannot write (`unwritable`) or that are longer than `max_prompt_tokens`
    (None: any length), in chunks that log their progress. Counted as generation tokenizes them (no special tokens
    added); a longer prompt would run the response past the positions the model was built for."""
    problems, progress = {}, Progress("prompts tokenized and checked", len(texts))
    for start in range(0, len(texts), CHECK_CHUNK):
        chunk = texts[start : start + CHECK_CHUNK]
        ids = tokenizer(list(chunk), add_special_tokens=False)["input_ids"]
        for index, why in unwritable(tokenizer, chunk, ids).items():
            problems[start + index] = (
                f"the tokenizer cannot write this prompt: {why}; use a model whose tokenizer covers the data"
            )
        for index, row in enumerate(ids):
            if max_prompt_tokens is not None and len(row) > max_prompt_tokens and start + index not in problems:
                problems[start + index] = (
                    f"the prompt is {len(row)} tokens, more than the {max_prompt_tokens} that --max_new_tokens "
                    f"leaves of the model's context (max_position_embeddings); shorten it or lower --max_new_tokens"
                )
        progress(start + len(chunk))
    return problems


def unwritable(tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]] | None = None) -> dict[int, str]:
    """{index: how it reads the text back} for the texts that `tokenizer` cannot write: encoded (`ids`, when already
    done) and decoded, they come back with characters lost or changed, so the model would never see them (the demo's
    17-token tokenizer reads "What is 3 + 4? Answer:" as "3+4"). Whitespace is not compared: sentencepiece tokenizers
    move spaces."""
    if ids is None:
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    back = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    problems = {}
    for index, (text, read) in enumerate(zip(texts, back)):
        if "".join(text.split()) != "".join(read.split()):
            lost = "".join(sorted(set(text) - set(read) - set(" \n")))
            start = max(0, len(os.path.commonprefix([text, read])) - 12)  # where they part, shown in both
            problems[index] = f"it reads {_clip(text[start:])} back as {_clip(read[start:])}" + (
                f" (it has no {_clip(lost)})" if lost else ""
            )
    return problems


def _clip(text: str, limit: int = 36) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def as_records(examples: Iterable[Example]) -> list[dict]:
    """The trainer's form: each raw record plus its rendered prompt under "prompt_text"."""
    return [{**example.record, "prompt_text": example.text} for example in examples]


def _options(data_cfg, tokenizer, rewards: RewardRunner | None, max_prompt_tokens: int | None) -> dict:
    def check(records):
        if rewards is not None:
            return rewards.check_records(records)
        with RewardRunner.from_config(data_cfg) as runner:
            return runner.check_records(records)

    # A raw template replaces the chat template, so the tokenizer is not used for rendering then.
    return {
        "columns": data_cfg.columns,
        "system_prompt": data_cfg.system_prompt,
        "template": data_cfg.prompt_template,
        "tokenizer": None if data_cfg.prompt_template is not None else tokenizer,
        "skip_bad_rows": data_cfg.skip_bad_rows,
        "check": check,
        "check_prompts": None if tokenizer is None else partial(prompt_problems, tokenizer, max_prompt_tokens),
    }


def load_train_examples(
    data_cfg, tokenizer, seed: int = 0, rewards: RewardRunner | None = None, max_prompt_tokens: int | None = None
) -> Examples:
    """Training prompts for `rlad_ds.config.schema.DataConfig`: every row of `dataset`, else `train_size` generated.
    Dataset rows are checked in `rewards` (the run's reward workers; None: workers started for the check);
    with `max_prompt_tokens` (`rlad_ds.models.prompt_budget`) a longer prompt is a bad row.

    The items are records (see `as_records`); `.skipped` / `.messages` say what `skip_bad_rows` dropped, so
    that the caller can report it.
    """
    task = get_task(data_cfg.task, data_cfg.task_args)
    n = data_cfg.train_size if data_cfg.dataset is None else None
    examples = load_examples(
        task,
        data_cfg.dataset,
        split="train",
        n=n,
        seed=seed,
        **_options(data_cfg, tokenizer, rewards, max_prompt_tokens),
    )
    return Examples(as_records(examples), skipped=examples.skipped, messages=examples.messages)


def load_eval_examples(
    cfg, tokenizer, rewards: RewardRunner | None = None, max_prompt_tokens: int | None = None
) -> Examples:
    """Held-out problems (records with "prompt_text") for the `eval` section of a `rlad_ds.config.schema.Config`.

    From `eval_dataset` (its `eval_split` when it is a saved dataset dict), else the task's generated "test"
    split (disjoint from its "train" split, seeded by `train.seed`), else the "test" split of a saved
    training `dataset` dict; [] when there is none (a single training file has no held-out part) or
    `eval_size` is 0. `eval_size` caps the rows read (none: every row); `max_prompt_tokens` as for training.
    """
    task, size = get_task(cfg.data.task, cfg.data.task_args), cfg.eval.eval_size
    options = _options(cfg.data, tokenizer, rewards, max_prompt_tokens)
    if size == 0:
        return Examples()
    source, split = cfg.eval.eval_dataset, cfg.eval.eval_split
    if source is None and task.generate is not None:
        if size is None:
            raise ConfigError(
                f"--eval_size none means every row of --eval_dataset; say how many {task.name!r} problems to generate"
            )
        source, split = None, "test"
    elif source is None:
        saved = cfg.data.dataset is not None and "test" in saved_splits(Path(cfg.data.dataset).expanduser())
        if not saved:
            return Examples()
        source, split = cfg.data.dataset, "test"
    examples = load_examples(task, source, split=split, n=size, seed=cfg.train.seed, **options)
    return Examples(as_records(examples), skipped=examples.skipped, messages=examples.messages)


def _generated(task: Task, split: str, n: int | None, seed: int, render: Renderer) -> Examples:
    if task.generate is None:
        raise ConfigError(f"task {task.name!r} has no built-in data; give a dataset file or name")
    if n is None:
        raise ConfigError(f"say how many {task.name!r} examples to generate (n)")
    records = task.generate(split, n, seed)
    examples, progress = Examples(), Progress("prompts rendered", n)  # timed from here: generation logs its own
    for record in records:
        examples.append(Example(render(task.prompt(record)), record))
        progress(len(examples))
    return examples


def _checked(task: Task, row, mapping: dict[str, str]) -> dict:
    if isinstance(row, Unparsable):
        raise ValueError(row.message)
    if not isinstance(row, dict):
        raise TypeError(f"expected a JSON object, got {type(row).__name__}")
    record = apply_columns(row, mapping)
    task.prompt(record)
    return record


def _message(error: Exception) -> str:
    # KeyError's str() is the repr of its argument; show the text instead.
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _bad_row(examples: Examples, message: str, skip: bool) -> None:
    if not skip:
        raise ConfigError(f"{message} (pass skip_bad_rows to skip and count bad rows)")
    examples.skipped += 1
    if len(examples.messages) < MAX_KEPT_MESSAGES:
        examples.messages.append(message)
