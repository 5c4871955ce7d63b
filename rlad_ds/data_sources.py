"""Where prompt records come from: each row of a source with its place, for messages that name it
(`data.jsonl:17`, `data.csv row 17`).

Sources:
- `.jsonl` / `.json`: parsed here, line by line, so that a bad row is reported as `file.jsonl:17: ...`; lines
  end at line feeds only, as `datasets` reads them. A `.json` file holds a list of objects, an object whose only
  key holds that list (`{"data": [...]}`), or is JSON lines under another name. A row Python's JSON parser cannot
  read (nested too deeply, an integer of thousands of digits) is a bad row like any invalid line.
- `.parquet` / `.csv`: read through `datasets`; rows are reported as `file.csv row 17`.
- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`datasets.load_from_disk`).
- anything else that is not a path: a hub dataset name, passed to `datasets.load_dataset` (needs network; when
  the hub cannot be reached only the local datasets cache is tried, so that a mistyped path fails at once).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlad_ds.errors import ConfigError, error_line

JSON_SUFFIXES = (".jsonl", ".json")
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


def read_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, object]]:
    """(place, row) pairs of a source, e.g. ("data.jsonl:17", {...}); a line that is not JSON is `Unparsable`."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _dataset_rows(str(path), _load_from_disk(path, split))
    elif path.is_file():
        if path.stat().st_size == 0:
            raise ConfigError(f"{path}: the file is empty")
        if path.suffix.lower() in JSON_SUFFIXES:
            yield from _json_rows(path)
        elif path.suffix in DATASETS_SUFFIXES:
            yield from _dataset_rows(str(path), _load_file(path))
        else:
            raise ConfigError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
    elif _looks_local(str(source)):
        raise ConfigError(f"{source}: no such file or directory")
    else:
        yield from _dataset_rows(str(source), _load_hub(str(source), split))


def _looks_local(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or Path(source).suffix in (*JSON_SUFFIXES, *DATASETS_SUFFIXES)
        or source.count("/") > 1
    )


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark, as some editors write, is not a bad row
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text ({error.reason} at byte {error.start}); save the file as UTF-8 JSON"
        ) from None
    if path.suffix.lower() == ".json":
        rows = _whole_file_rows(path, text)
        if rows is not None:
            yield from rows
            return
    # Lines end at "\n" only (JSON lines, and `datasets` reading the same file): str.splitlines() would also
    # break a valid row at U+2028, U+0085 or a form feed inside a string.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield f"{path}:{number}", _parsed(line)


def _parsed(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return Unparsable(f"invalid JSON ({error.msg} at column {error.colno})")
    except (ValueError, RecursionError) as error:  # e.g. an integer of over 4300 digits, 100,000 nested lists
        return Unparsable(f"JSON that Python cannot read ({_why_unreadable(error)})")


def _why_unreadable(error: Exception) -> str:
    return "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]


def _whole_file_rows(path: Path, text: str) -> list[tuple[str, object]] | None:
    """The rows of a `.json` file that is one JSON value: a list of rows, or an object whose only field holds the list
    (`{"data": [...]}`, read as `datasets.load_dataset("json", field="data")` does); None for JSON lines."""
    start = text.lstrip()[:1]
    if start not in ("[", "{") or start == "{" and "\n" not in text.strip():  # one object on one line: a row
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if start == "{":  # `{...}\n{...}`: JSON lines under another name
            return None
        raise ConfigError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"{path}: JSON that Python cannot read ({_why_unreadable(error)})") from None
    if isinstance(value, list):
        return [(f"{path}[{i}]", row) for i, row in enumerate(value)]
    if len(value) != 1 or not isinstance(next(iter(value.values())), list):
        keys = ", ".join(map(repr, value)) or "none"
        raise ConfigError(
            f"{path} holds one JSON object (keys: {keys}), not rows; write a list of row objects, an object whose "
            f'only key holds that list ({{"data": [...]}}), or one object per line (JSON lines)'
        )
    [(field, rows)] = value.items()
    return [(f"{path}[{json.dumps(field)}][{i}]", row) for i, row in enumerate(rows)]


@dataclass(frozen=True)
class Unparsable:
    """A line that is not JSON; kept as a row so it is reported (or skipped) in order like any bad row."""

    message: str


def _dataset_rows(name: str, dataset) -> Iterator[tuple[str, object]]:
    return ((f"{name} row {i + 1}", row) for i, row in enumerate(dataset))


def _load_file(path: Path):
    import datasets

    try:
        return datasets.load_dataset(DATASETS_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # datasets wraps arrow / pandas errors in several types
        raise ConfigError(f"{path}: cannot read as {DATASETS_SUFFIXES[path.suffix]} ({error})") from None


def _load_from_disk(path: Path, split: str):
    import datasets

    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise ConfigError(
            f"{path}: not a saved dataset (no dataset_info.json or dataset_dict.json); "
            "point at a data file or a save_to_disk directory"
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"{path}: no split {split!r}; it has {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _load_hub(name: str, split: str):
    import datasets
    from huggingface_hub import constants

    saved, offline = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE), not _hub_reachable()
    try:
        if offline:  # for this call: a cached dataset still loads, anything else fails now, not after ~25 s of retries
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # ConnectionError, FileNotFoundError, ValueError...: datasets' reasons vary
        why = (
            "the Hugging Face hub cannot be reached from here and the local datasets cache does not have it"
            if offline
            else f"the hub cannot load it ({error_line(error)})"
        )
        raise ConfigError(
            f"{name}: no such local file or directory, and {why}; give a local data file or "
            f"save_to_disk dir (hub dataset names need network access)"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the hub's host accepts a connection; a proxy, when one is set, is trusted to reach it."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def saved_splits(path: Path) -> list[str]:
    index = path / "dataset_dict.json"
    return json.loads(index.read_text()).get("splits", []) if index.is_file() else []
