"""From command-line flags and a YAML / JSON `--config` file to a validated `Config` (`rlad_ds.config.schema`).

Values come in layers, later ones winning: the field defaults, a profile (the built-in demo's recipe, owned by
`rlad_ds.demo`, when no `--student` is given), the file (one section per group: `model:`, `rollout:`, `loss:`,
`train:`, `data:`, `eval:`), the flags. Each value is converted to its field's type here, alike for flags and files
(`lr: 1e-6` that YAML reads as text, `false` / `no` / `off` as booleans, finite floats only); a renamed flag's old
spelling stops the run in one line naming the new one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Callable
from pathlib import Path

from rlad_ds.config.schema import SECTIONS, Config, Switch
from rlad_ds.errors import ConfigError

# Read alike in flags and files, case-insensitively (YAML 1.1 reads `false` as a bool, `"false"` as text).
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
# Old spellings of renamed fields: {section: {old name: new name}}.
RENAMED = {"rollout": {"engine": "rollout"}}


def _renamed(old: str, section: str) -> ConfigError:
    return ConfigError(
        f"--{old} was renamed --{RENAMED[section][old]} (in a --config file: {section}: "
        f"{RENAMED[section][old]}: ...); use the new name"
    )


def _base_type(kind):
    args = [t for t in typing.get_args(kind) if t is not type(None)]
    return args[0] if typing.get_origin(kind) is not tuple and args else kind


def _convert(kind, value, where: str):
    """`value` (from a flag's text, a YAML or a JSON file) as the field's type; a mismatch names the field."""
    optional = type(None) in typing.get_args(kind)
    if value is None or optional and isinstance(value, str) and value.lower() in ("none", "off", "null"):
        if optional:
            return None
        raise ConfigError(f"{where} cannot be none")
    base = _base_type(kind)
    if typing.get_origin(base) is tuple:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
        if items is None:
            raise ConfigError(f"{where} must be a comma-separated list of integers, got {value!r}")
        return tuple(_convert(int, item.strip() if isinstance(item, str) else item, where) for item in items)
    if base in (bool, Switch):
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None  # a bool is an int
        if base is Switch and word in ("auto", "on", "off"):
            return word
        if word not in BOOL_WORDS:
            raise ConfigError(
                f"{where} must be {'true or false' if base is bool else 'auto, on or off'}, got "
                f"{value!r} (true/false, yes/no, on/off and 1/0 are read alike)"
            )
        return BOOL_WORDS[word] if base is bool else "on" if BOOL_WORDS[word] else "off"
    if base in (int, float) and not isinstance(value, bool):
        try:
            number = base(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if base is float and isinstance(number, int):
            number = float(number)
        if base is float and isinstance(number, float) and not math.isfinite(number):
            # Here, once for every float field: inf / nan pass every comparison a field's own check makes.
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if isinstance(number, base):
            return number
    if base is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be {base.__name__}, got {value!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through ConfigError, not usage + exit inside argparse
        raise ConfigError(f"{message} (see --help)")


def build_parser(scope: str = "train", description: str | None = None) -> argparse.ArgumentParser:
    """The flags of every field in `scope` ("train": all; "eval": those launchers/eval.py reads)."""
    parser = _Parser(
        description=description
        or "RLAD: distil a teacher into a student during GRPO with the TRRD objective, on DeepSpeed."
    )
    if scope == "train":
        parser.add_argument(
            "--deepspeed",
            "--deepspeed_config",
            dest="deepspeed",
            default=None,
            help="DeepSpeed JSON for the student (ZeRO-3); default ds_configs/zero3.json",
        )
    parser.add_argument("--config", default=None, help="YAML or JSON file with sections: " + ", ".join(SECTIONS))
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    for section, names in RENAMED.items():  # the old spelling is read only to name the new one
        for old in names:
            parser.add_argument(f"--{old}", dest=f"renamed:{section}:{old}", default=None, help=argparse.SUPPRESS)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in (
            f
            for f in dataclasses.fields(cls)  # "train" reads all but eval.py's own, "eval" its scope
            if scope == "train" and f.metadata["scope"] != "eval" or f.metadata["scope"] in (scope, "both")
        ):
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            text = f"{f.metadata['help']} (default: {shown})"
            if hints[f.name] is bool:  # --flag, --flag WORD (read by _convert), --no-flag
                group.add_argument(f"--{f.name}", nargs="?", const=True, default=None, metavar="BOOL", help=text)
                group.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
            else:
                group.add_argument(
                    f"--{f.name}",
                    default=None,
                    metavar=_base_type(hints[f.name]).__name__.upper()
                    if typing.get_origin(_base_type(hints[f.name])) is not tuple
                    else "LIST",
                    help=text,
                )
    return parser


def _read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML or JSON file to --config")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):  # `run.YAML` is YAML too
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
        else:
            data = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise ConfigError(
            f"config file {path} is not valid {p.suffix.lstrip('.') or 'JSON'}: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    unknown = set(data) - set(SECTIONS) - {"deepspeed"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown section(s) {sorted(unknown)}; use {', '.join(SECTIONS)}")
    for name, section in data.items():
        if name in SECTIONS and not isinstance(section, dict):
            raise ConfigError(f"config file {path}: section {name} must be a mapping of field: value")
        bad = set(section) - {f.name for f in dataclasses.fields(SECTIONS[name])} if name in SECTIONS else set()
        for old in sorted(bad & set(RENAMED.get(name, ()))):
            raise _renamed(old, name)
        if bad:
            raise ConfigError(f"config file {path}: unknown field(s) {sorted(bad)} in section {name}")
    return data


def read_layers(args: argparse.Namespace) -> dict:
    """What the user set, as {section: {field: value}} (plus "deepspeed"): the --config file, then flags."""
    for section, names in RENAMED.items():
        for old in names:
            if getattr(args, f"renamed:{section}:{old}", None) is not None:
                raise _renamed(old, section)
    layers = _read_file(args.config) if args.config else {}
    for section, cls in SECTIONS.items():
        given = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None
        }
        if given:
            layers[section] = {**(layers.get(section) or {}), **given}
    if getattr(args, "deepspeed", None):
        layers["deepspeed"] = args.deepspeed
    return layers


def config_from_layers(*layers: dict | None) -> Config:
    """A validated Config from value layers ({section: {field: value}}), later layers winning."""
    merged: dict = {}
    for layer in filter(None, layers):
        for section, values in layer.items():
            merged[section] = {**merged.get(section, {}), **values} if section in SECTIONS else values
    groups = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {name: _convert(hints[name], value, f"--{name}") for name, value in merged.get(section, {}).items()}
        groups[section] = cls(**values)
    return Config(**groups, deepspeed=_deepspeed_path(merged.get("deepspeed", Config.deepspeed)))


def _deepspeed_path(value) -> str:
    """The `deepspeed:` of a file or `--deepspeed`: a path, never null or a number (read as one by YAML)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"deepspeed must be the path of a DeepSpeed JSON file, got {value!r}; leave it out for {Config.deepspeed}"
        )
    return value


def parse_config(
    argv: list[str], profile: dict | Callable[[dict], dict] | None = None
) -> tuple[Config, argparse.Namespace]:
    """The training Config from `argv`; `profile` (the demo's layers, or a function of the user's layers that gives
    them) sits under file and flags without --student."""
    args = build_parser("train").parse_args(argv)
    layers = read_layers(args)
    demo = (layers.get("model") or {}).get("student") in (None, "none")
    if demo and callable(profile):
        profile = profile(layers)
    return config_from_layers(profile if demo else None, layers), args
