"""The task registry: `get_task("kk" | "math" | "arith" | "rg:<dataset>" | "module:function", args)`.

Built-in tasks are imported only when asked for, so a missing optional dependency of one task never
breaks another. `rg:<dataset>` is any reasoning-gym dataset (`rlad_ds.tasks.rg`). A user task is any
importable `module:function` whose function returns a `Task`.

`args` (`--task_args`) configure a task: a JSON object or `key=value,key=value` (values read as JSON when
they parse, else as text). A reasoning-gym dataset takes them as its config; a user function as keyword
arguments; the built-in tasks take none.
"""

from __future__ import annotations

import functools
import importlib
import json

from rlad_ds.errors import ConfigError
from rlad_ds.tasks.base import Task

BUILTIN = {"arith": "rlad_ds.tasks.arith", "kk": "rlad_ds.tasks.kk", "math": "rlad_ds.tasks.math"}

__all__ = ["BUILTIN", "Task", "get_task", "known_tasks", "parse_task_args"]


def known_tasks() -> list[str]:
    return sorted(BUILTIN)


def parse_task_args(args: str | None) -> dict:
    """`'{"n_people": 3}'` or `"n_people=3,depth_constraint=2"` -> dict; None or "" -> {}."""
    if not args or not args.strip():
        return {}
    if args.lstrip().startswith("{"):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f'--task_args is not valid JSON ({error.msg}); write {{"key": value}} or key=value,key=value'
            ) from None
        if not isinstance(parsed, dict):
            raise ConfigError("--task_args must be a JSON object or key=value,key=value")
        return parsed
    parsed = {}
    for pair in filter(None, (p.strip() for p in args.split(","))):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise ConfigError(f"bad --task_args item {pair!r}; write key=value, e.g. n_people=3")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


@functools.cache
def get_task(name: str, args: str | None = None) -> Task:
    """The task called `name` configured by `args` (see the module doc); cached per (name, args)."""
    options = parse_task_args(args)
    if name.startswith("rg:"):
        from rlad_ds.tasks.rg import make_task

        return make_task(name[len("rg:") :], options)
    if ":" in name:
        return _user_task(name, options)
    if name not in BUILTIN:
        raise ConfigError(
            f"unknown task {name!r}; choose one of {', '.join(known_tasks())}, rg:<dataset> "
            "(reasoning-gym) or give module:function returning a Task"
        )
    if options:
        raise ConfigError(f"task {name!r} takes no --task_args (they configure rg:<dataset> and user tasks)")
    module = _import(BUILTIN[name], f"built-in task {name!r}")
    return module.TASK


def _import(module_name: str, what: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the module itself (or its package) missing is the user's typo; a missing import inside it is not.
        if error.name is not None and f"{module_name}.".startswith(f"{error.name}."):
            raise ConfigError(
                f"cannot import module {module_name!r} for {what}; check the spelling and that it is on PYTHONPATH"
            ) from None
        raise


def _user_task(spec: str, options: dict) -> Task:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name or ":" in function_name:
        raise ConfigError(f"bad task {spec!r}; write module:function, e.g. my_tasks:make_task")
    module = _import(module_name, f"task {spec!r}")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"module {module_name!r} has no function {function_name!r} for task {spec!r}")
    try:
        task = function(**options)
    except TypeError as error:
        raise ConfigError(f"task {spec!r} does not take these --task_args ({error})") from None
    if not isinstance(task, Task):
        raise ConfigError(f"{spec} returned {type(task).__name__}, not a rlad_ds.tasks.base.Task")
    return task
