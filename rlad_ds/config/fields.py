"""What every field of the config tree is made of: its help and scope (`field_help`), the one-line check of its
value (`check`), and the auto / on / off type (`Switch`)."""

from __future__ import annotations

from dataclasses import field

from rlad_ds.errors import ConfigError


class Switch(str):
    """auto / on / off; a boolean (`false`, `--teacher_offload no`) reads as on / off, never as another choice."""


def field_help(text: str, scope: str = "train", **kwargs):
    return field(metadata={"help": text, "scope": scope}, **kwargs)


def check(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)
