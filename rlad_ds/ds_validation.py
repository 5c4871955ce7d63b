"""The student's DeepSpeed JSON checked before any model, so that a mistake in it is one line naming the key instead
of a traceback from inside `deepspeed.initialize` after the models have loaded.

Two passes: `check_student_file` reads the file and checks its shape and the values the trainer relies on (ZeRO
stage 3, an optimizer section, an NVMe offload's path) without importing DeepSpeed; `check_with_deepspeed` fills the
config as the run will (`rlad_ds.ds_config.student_ds_config`) and lets DeepSpeed speak for the rest: its own config
model (`deepspeed.runtime.config.DeepSpeedConfig`, pydantic) and the op builders of this machine's accelerator,
which decide whether the optimizer can be built here (DeepSpeed's CPU accelerator has no Lamb, for one).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

from rlad_ds.ds_config import load_ds_config, require_zero_stage, student_ds_config
from rlad_ds.errors import ConfigError, error_line

EXAMPLE_OPTIMIZER = '"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}'
OFFLOADS = ("offload_param", "offload_optimizer")


def check_student_file(path: str | Path) -> dict:
    """The student's DeepSpeed JSON (`--deepspeed`), its shape checked; ConfigError naming the key otherwise."""
    config = load_ds_config(path)
    where = f"DeepSpeed config {path}"
    for section in ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16"):
        if section in config and config[section] is not None and not isinstance(config[section], dict):
            raise ConfigError(f"{where}: {section} must be a JSON object, got {config[section]!r}; see ds_configs/")
    require_zero_stage(config, 3, "student")
    for key in OFFLOADS:
        offload = config["zero_optimization"].get(key)
        if offload is not None and not isinstance(offload, dict):
            raise ConfigError(f'{where}: zero_optimization.{key} must be an object such as {{"device": "cpu"}}')
        if offload and offload.get("device") == "nvme" and not offload.get("nvme_path"):
            raise ConfigError(
                f'{where}: zero_optimization.{key} offloads to nvme without "nvme_path"; add "nvme_path": a '
                f'directory on an NVMe drive, or use "device": "cpu"'
            )
    optimizer = config.get("optimizer")
    if optimizer is None:
        raise ConfigError(f"{where} has no optimizer section, and the trainer builds none; add {EXAMPLE_OPTIMIZER}")
    if not isinstance(optimizer.get("type"), str) or not isinstance(optimizer.get("params", {}), dict):
        raise ConfigError(f'{where}: optimizer needs a "type" name and a "params" object, e.g. {EXAMPLE_OPTIMIZER}')
    return config


def check_with_deepspeed(cfg, world_size: int) -> None:
    """The filled student config through DeepSpeed's own checks (see the module doc); one ConfigError line."""
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    config = student_ds_config(cfg, world_size, device)
    check_optimizer(config, cfg.deepspeed)
    _deepspeed_config_model(config, cfg.deepspeed)


def _offloaded(config: dict) -> bool:
    offload = config["zero_optimization"].get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")  # DeepSpeed's zero_use_cpu_optimizer


def _op_builder(name: str, params: dict, offloaded: bool) -> str | None:
    """The op builder DeepSpeed's `_configure_basic_optimizer` needs for optimizer `name` (lower case); None: plain
    torch code."""
    if name in ("adam", "adamw"):
        return None if params.get("torch_adam") else "CPUAdamBuilder" if offloaded else "FusedAdamBuilder"
    return {
        "adagrad": "CPUAdagradBuilder" if offloaded else None,
        "lion": "CPULionBuilder" if offloaded else "FusedLionBuilder",
        "lamb": "FusedLambBuilder",
    }.get(name)


def _buildable(name: str, params: dict, offloaded: bool) -> bool:
    from deepspeed.accelerator import get_accelerator

    if name.startswith("mu") and name != "muon":  # MuAdam, MuAdamW, MuSGD come from the mup package
        return importlib.util.find_spec("mup") is not None
    builder = _op_builder(name, params, offloaded)
    if builder is None:
        return True
    found = get_accelerator().get_op_builder(builder)
    return found is not None and found.__name__ != "NotImplementedBuilder"


def check_optimizer(config: dict, path) -> None:
    """Refuse an optimizer type DeepSpeed cannot build on this machine's accelerator, naming the ones it can."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    name, params = config["optimizer"]["type"], config["optimizer"].get("params") or {}
    offloaded, accelerator = _offloaded(config), get_accelerator().device_name()
    if name.lower() in DEEPSPEED_OPTIMIZERS:
        if _buildable(name.lower(), params, offloaded):
            return
        here = [n for n in DEEPSPEED_OPTIMIZERS if _buildable(n, params, offloaded)]
        raise ConfigError(
            f"DeepSpeed config {path}: DeepSpeed cannot build optimizer {name!r} on the {accelerator} accelerator"
            f"{' with' if offloaded else ' without'} zero_optimization.offload_optimizer; it builds "
            f"{', '.join(here)} here, or any torch.optim class: change optimizer.type"
        )
    torch_class = getattr(torch.optim, name, None)
    if not isinstance(torch_class, type):
        raise ConfigError(
            f"DeepSpeed config {path}: optimizer type {name!r} is neither one of DeepSpeed's "
            f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a class of torch.optim (names are case-sensitive there)"
        )
    if torch_class not in ZERO_SUPPORTED_OPTIMIZERS and config.get("zero_allow_untested_optimizer") is not True:
        raise ConfigError(
            f"DeepSpeed config {path}: ZeRO is untested with torch.optim.{name}; DeepSpeed runs it only with "
            f'"zero_allow_untested_optimizer": true in the file, or choose AdamW'
        )


def _deepspeed_config_model(config: dict, path) -> None:
    """DeepSpeed's own parse of the filled config (pydantic models for ZeRO, offload, precision...)."""
    import logging

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    config = copy.deepcopy(config)
    # Outside a process group DeepSpeedConfig counts one rank; the batch size was checked for the real count.
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    level = logger.level
    logger.setLevel(logging.ERROR)  # its config dump is for a run, not for a check
    try:
        DeepSpeedConfig(config)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        key = ".".join(map(str, first["loc"]))
        section = "zero_optimization." if error.title == "DeepSpeedZeroConfig" else ""
        raise ConfigError(
            f"DeepSpeed config {path}: {section}{key}: {first['msg']} (DeepSpeed's {error.title}); fix the file"
        ) from None
    except Exception as error:  # its asserts and ValueErrors about combinations of values
        raise ConfigError(
            f"DeepSpeed config {path}: DeepSpeed refuses it ({error_line(error)}); fix the file"
        ) from None
    finally:
        logger.setLevel(level)
