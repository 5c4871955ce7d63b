"""The one place that builds DeepSpeed JSON.

Config files under `ds_configs/` leave the values the trainer knows as "auto"; the functions here fill
them from plain keyword arguments (`fill_train_config`, `inference_config`) or from the `rlad_ds.config`
tree (`student_ds_config`, `frozen_ds_config`), resolve the precision (`--precision auto`: bf16 on
accelerators, fp32 on CPU; bf16 also runs on DeepSpeed's CPU accelerator) and check what the models rely on
(ZeRO stage 3). Every function returns a new dict and leaves its input untouched.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rlad_ds.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
AUTO = "auto"


def load_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON file; a missing file, bad JSON or a non-object raise one-line ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"DeepSpeed config {path} does not exist; pass an existing JSON file (templates are in {CONFIG_DIR})"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg}); fix the file"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, not {type(config).__name__}")
    return config


def _as_dict(config: str | Path | dict) -> dict:
    return copy.deepcopy(config) if isinstance(config, dict) else load_ds_config(config)


def _fill(section: dict, key: str, value, where: str) -> None:
    """Set an "auto" (or absent) field; a fixed value that disagrees with the trainer's is an error."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config sets {where}{key}={current!r} but the trainer needs {value!r}; "
            f'set it to "auto" or to {value!r}'
        )


def zero_stage(config: dict, role: str = "student") -> int:
    """`zero_optimization.stage`, 0 when absent; a ConfigError for anything but a whole number ("three", 3.9)."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if isinstance(stage, bool) or not isinstance(stage, int):
        where = "zero_optimization" if stage is None else "zero_optimization.stage"
        raise ConfigError(
            f"the {role} DeepSpeed config has {where} = {zero if stage is None else stage!r}; "
            'write "zero_optimization": {"stage": 3, ...}'
        )
    return stage


def require_zero_stage(config: dict, stage: int = 3, role: str = "student") -> None:
    """Refuse a config whose ZeRO stage is not `stage` (every model here is partitioned with ZeRO-3)."""
    found = zero_stage(config, role)
    if found != stage:
        raise ConfigError(
            f"the {role} DeepSpeed config uses ZeRO stage {found}; set zero_optimization.stage to {stage}"
        )


def resolve_precision(precision: str, device: str) -> str:
    """ "bf16" or "fp32" (`rlad_ds.config.schema.PRECISIONS`): `auto` is bf16 on accelerators and fp32 on CPU."""
    if precision == "auto":
        return "fp32" if device == "cpu" else "bf16"
    return precision


def _fill_precision(config: dict, precision: str, device: str) -> None:
    bf16 = config.setdefault("bf16", {})
    _fill(bf16, "enabled", resolve_precision(precision, device) == "bf16", "bf16.")
    if config.get("fp16", {}).get("enabled", False) is True:
        raise ConfigError(
            "DeepSpeed config enables fp16; this trainer uses bf16 or fp32 (--precision): remove the fp16 section"
        )


def _fp32_grad_accumulation(config: dict) -> None:
    """bf16 weights: gradients accumulate over a step's micro-batches (dozens, with a token budget and long
    responses) in fp32, not bf16, whose 8-bit mantissa drops the small ones (OpenRLHF exposes the same knob). A
    config's own `data_types.grad_accum_dtype` is left as it is."""
    if config.get("bf16", {}).get("enabled") is True:
        config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")


def _torch_adamw(config: dict, device: str) -> None:
    """Adam / AdamW run as torch's own (`torch_adam`; fused kernels on CUDA): DeepSpeed's FusedAdam is JIT-compiled
    by the first `deepspeed.initialize` on every node (nvcc and ninja on GPUs, a minute or more; it fails on
    runtime-only images), and a run killed mid-build leaves a lock that hangs every later start-up. A config that
    sets `torch_adam` itself, or offloads the optimizer (DeepSpeed's prebuilt-or-JIT CPUAdam, far faster than
    torch's on the CPU), is left as it is."""
    optimizer = config.get("optimizer")
    offloaded = isinstance(config.get("zero_optimization", {}).get("offload_optimizer"), dict)
    if not isinstance(optimizer, dict) or str(optimizer.get("type", "")).lower() not in ("adam", "adamw") or offloaded:
        return
    params = optimizer.setdefault("params", {})
    if params.setdefault("torch_adam", True) is True and device == "cuda":
        params.setdefault("fused", True)  # torch's fused AdamW: one kernel per parameter group


def jit_built_ops(config: dict) -> list[tuple[str, str]]:
    """The optimizer op DeepSpeed JIT-compiles for a filled student config, as (op builder class, why), or none:
    CPU Adam / Adagrad / Lion when the optimizer is offloaded (`zero3_offload.json`), FusedAdam for Adam / AdamW
    that is not `torch_adam`."""
    optimizer = config.get("optimizer")
    kind = str(optimizer.get("type", "")).lower() if isinstance(optimizer, dict) else ""
    offload = config.get("zero_optimization", {}).get("offload_optimizer")
    if isinstance(offload, dict) and offload.get("device", "none") != "none":
        builders = {"adam": "CPUAdamBuilder", "adamw": "CPUAdamBuilder", "adagrad": "CPUAdagradBuilder"}
        builders["lion"] = "CPULionBuilder"
        why = f"the {optimizer['type']} step of the optimizer your DeepSpeed config offloads to the CPU"
        return [(builders[kind], why)] if kind in builders else []
    if kind in ("adam", "adamw") and not optimizer.get("params", {}).get("torch_adam", False):
        return [("FusedAdamBuilder", f"the {optimizer['type']} step of your DeepSpeed config's optimizer")]
    return []


def _fill_zero(config: dict, device: str, persistence_threshold: int | None) -> None:
    zero = config.setdefault("zero_optimization", {})
    if persistence_threshold is not None:
        # Overrides the file: tests set 0 so that tiny models really partition.
        zero["stage3_param_persistence_threshold"] = int(persistence_threshold)
    if device == "cpu":
        # Pinned host memory needs an accelerator; on CPU it is meaningless.
        for key in ("offload_param", "offload_optimizer"):
            if isinstance(zero.get(key), dict):
                zero[key]["pin_memory"] = False


def dtype_of(config: dict):
    """The torch dtype a filled config trains and stores parameters in."""
    import torch

    return torch.bfloat16 if config.get("bf16", {}).get("enabled") is True else torch.float32


def fill_train_config(
    config: str | Path | dict,
    *,
    world_size: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    lr: float,
    gradient_clipping: float,
    device: str,
    weight_decay: float = 0.0,
    precision: str = "auto",
    persistence_threshold: int | None = None,
    require_stage3: bool = True,
) -> dict:
    """The student's training config with every "auto" filled (batch sizes, lr, weight decay, clipping,
    precision)."""
    config = _as_dict(config)
    if require_stage3:
        require_zero_stage(config, 3, "student")
    _fill(config, "train_micro_batch_size_per_gpu", int(micro_batch_size), "")
    _fill(config, "gradient_accumulation_steps", int(gradient_accumulation_steps), "")
    _fill(config, "train_batch_size", int(micro_batch_size * gradient_accumulation_steps * world_size), "")
    _fill(config, "gradient_clipping", float(gradient_clipping), "")
    optimizer_params = config.get("optimizer", {}).get("params")
    if isinstance(optimizer_params, dict):
        _fill(optimizer_params, "lr", float(lr), "optimizer.params.")
        _fill(optimizer_params, "weight_decay", float(weight_decay), "optimizer.params.")
    scheduler_params = config.get("scheduler", {}).get("params")
    if isinstance(scheduler_params, dict):
        for key in ("warmup_max_lr", "cos_min_lr"):
            if scheduler_params.get(key) == AUTO:
                scheduler_params[key] = float(lr) if key == "warmup_max_lr" else 0.0
    _fill_precision(config, precision, device)
    _fp32_grad_accumulation(config)
    _fill_zero(config, device, persistence_threshold)
    _torch_adamw(config, device)
    return config


def inference_config(
    config: str | Path | dict | None = None,
    *,
    offload: bool = True,
    world_size: int,
    micro_batch_size: int,
    device: str,
    precision: str = "auto",
    persistence_threshold: int | None = None,
) -> dict:
    """A frozen model's inference config (teacher, reference, evaluated model): ZeRO-3, no optimizer,
    parameters offloaded to CPU if `offload`.

    `config` defaults to ds_configs/teacher_offload.json or teacher.json; `offload` then also adds or
    removes `offload_param` so one file serves both.
    """
    if config is None:
        config = CONFIG_DIR / ("teacher_offload.json" if offload else "teacher.json")
    config = _as_dict(config)
    require_zero_stage(config, 3, "teacher")
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(
            "the teacher DeepSpeed config has an optimizer or scheduler; the teacher is frozen: remove them"
        )
    zero = config["zero_optimization"]
    if offload:
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    else:
        zero.pop("offload_param", None)
    _fill(config, "train_micro_batch_size_per_gpu", int(micro_batch_size), "")
    _fill(config, "gradient_accumulation_steps", 1, "")
    _fill(config, "train_batch_size", int(micro_batch_size * world_size), "")
    _fill_precision(config, precision, device)
    _fill_zero(config, device, persistence_threshold)
    return config


def _sequence_parallel(config: dict, size: int) -> dict:
    """DeepSpeed's own `sequence_parallel_size`: ZeRO-3's construction (`zero.Init`, which sees no mpu) reads the
    data-parallel size from it, so the batch sizes above are per data-parallel rank (`--sequence_parallel_size` sets
    it; a file may leave it "auto")."""
    if size > 1 or config.get("sequence_parallel_size", AUTO) not in (AUTO, 1):
        _fill(config, "sequence_parallel_size", int(size), "")
        # ZeRO-3 averages gradients over every rank on this path (its all-reduce path divides by world / N instead);
        # the sequence gather's backward is scaled for it (`rlad_ds.sequence_parallel`), so it must be this one.
        _fill(config.setdefault("zero_optimization", {}), "reduce_scatter", True, "zero_optimization.")
    else:
        config.pop("sequence_parallel_size", None)
    return config


def student_ds_config(cfg, world_size: int, device: str) -> dict:
    """The student engine's DeepSpeed config from the `rlad_ds.config.schema.Config` tree.

    Each rank's micro-batch count varies with response lengths (a token budget); DeepSpeed only needs a
    nominal micro-batch size, and the trainer marks the accumulation boundary itself. With sequence parallelism the
    batch sizes count data-parallel ranks (world / `--sequence_parallel_size`).
    """
    size = cfg.train.sequence_parallel_size
    config = fill_train_config(
        cfg.deepspeed,
        world_size=world_size // size,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        gradient_clipping=cfg.train.grad_clip,
        device=device,
        precision=cfg.model.precision,
        persistence_threshold=cfg.model.param_persistence_threshold,
    )
    return _sequence_parallel(config, size)


def frozen_ds_config(cfg, offload: bool, world_size: int, device: str) -> dict:
    """A frozen model's DeepSpeed config (teacher, reference, evaluated model) from the Config tree."""
    size = cfg.train.sequence_parallel_size
    config = inference_config(
        offload=offload,
        world_size=world_size // size,
        micro_batch_size=1,
        device=device,
        precision=cfg.model.precision,
        persistence_threshold=cfg.model.param_persistence_threshold,
    )
    return _sequence_parallel(config, size)
