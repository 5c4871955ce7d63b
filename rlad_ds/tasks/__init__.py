"""The task registry: `get_task("kk" | "math" | "arith" | "module:function")`.

Built-in tasks are imported only when asked for, so a missing optional dependency of one task never
breaks another. A user task is any importable `module:function` whose function returns a `Task`.
"""

from __future__ import annotations

import functools
import importlib

from rlad_ds.errors import ConfigError
from rlad_ds.tasks.base import Task

BUILTIN = {"arith": "rlad_ds.tasks.arith", "kk": "rlad_ds.tasks.kk", "math": "rlad_ds.tasks.math"}

__all__ = ["BUILTIN", "Task", "get_task", "known_tasks"]


def known_tasks() -> list[str]:
    return sorted(BUILTIN)


@functools.lru_cache(maxsize=None)
def get_task(name: str) -> Task:
    """The task called `name`: a built-in, or `module:function` (the function is called once, cached)."""
    if ":" in name:
        return _user_task(name)
    if name not in BUILTIN:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(known_tasks())} "
                          "or give module:function returning a Task")
    module = _import(BUILTIN[name], f"built-in task {name!r}")
    return module.TASK


def _import(module_name: str, what: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the module itself (or its package) missing is the user's typo; a missing import inside it is not.
        if error.name is not None and f"{module_name}.".startswith(f"{error.name}."):
            raise ConfigError(f"cannot import module {module_name!r} for {what}; "
                              "check the spelling and that it is on PYTHONPATH") from None
        raise


def _user_task(spec: str) -> Task:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name or ":" in function_name:
        raise ConfigError(f"bad task {spec!r}; write module:function, e.g. my_tasks:make_task")
    module = _import(module_name, f"task {spec!r}")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"module {module_name!r} has no function {function_name!r} for task {spec!r}")
    task = function()
    if not isinstance(task, Task):
        raise ConfigError(f"{spec} returned {type(task).__name__}, not a rlad_ds.tasks.base.Task")
    return task
