"""The rollout kinds, as `rlad_ds.methods` is for methods: one ordered registry, and the one place that chooses.

Each kind names its class; the class declares why it cannot serve a model on a device (`unavailable_reason`), the
patch it needs in the student's DeepSpeed config (`ds_config`, applied before `deepspeed.initialize`), how it is
built for a run (`from_run`, given the run's `RolloutContext`), whether its generate calls are collectives every rank
must make alike (`collective_calls`), whether it can sample from a frozen ZeRO-3 engine (`serves_frozen`: the
teacher, the model of `launchers/eval.py`) and whether it can load a model dir's weights itself, with no engine at all
(`loads_model_dir`: `launchers/eval.py`'s model, through `choose_model_dir_rollout` and `from_model_dir`).
`--rollout auto` walks the kinds marked `in_auto` in this order, once, and logs why each one before the chosen one was
passed over; an explicit kind that cannot serve is refused in one line.

Imports nothing heavy: the config tree reads `ROLLOUT_CHOICES` before DeepSpeed is imported.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from rlad_ds.errors import ConfigError

logger = logging.getLogger("rlad_ds")


@dataclass(frozen=True)
class RolloutContext:
    """What a run tells the rollout it builds beyond the rollout flags, known once its data are loaded (None: not
    known; a rollout that sizes itself then falls back on the model's context and its library's defaults)."""

    prompt_tokens: int | None = None  # the longest prompt any generate call will carry, in tokens
    rows_per_call: int | None = None  # the most rows (prompts x samples) one generate call submits on one rank
    group_rows: int | None = None  # rows sampled from one prompt (None: --group_size)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class RolloutKind:
    name: str
    target: str  # "module:Class"
    help: str
    in_auto: bool = True

    def load(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


KINDS = {
    kind.name: kind
    for kind in (
        RolloutKind(
            "vllm",
            "rlad_ds.rollout.vllm:VLLMRollout",
            "a colocated vLLM per rank, weights streamed from the ZeRO-3 partitions after each optimizer step",
        ),
        RolloutKind(
            "hybrid_engine",
            "rlad_ds.rollout.hybrid:HybridRollout",
            "DeepSpeed's hybrid engine (explicit only: CUDA, DeepSpeed's inference policy, no grouped-query attention)",
            in_auto=False,
        ),
        RolloutKind(
            "gathered",
            "rlad_ds.rollout.hf:GatheredRollout",
            "the ZeRO-3 model gathered once per rollout, transformers' generate with no collectives",
        ),
        RolloutKind(
            "per_layer",
            "rlad_ds.rollout.hf:PerLayerRollout",
            "transformers' generate under ZeRO-3's per-layer gathers, ranks in lock-step",
        ),
    )
}
ROLLOUT_CHOICES = ("auto", *KINDS)


def _why_not(cls, model, device: str, rollout_cfg, frozen: bool) -> str | None:
    if frozen and not cls.serves_frozen:
        return "it follows a training engine or loads a model dir itself, never a frozen engine's weights"
    return cls.unavailable_reason(model, device, rollout_cfg)


def choose_model_dir_rollout(requested: str, model_config, device: str, rollout_cfg, *, role: str) -> type | None:
    """For a model no engine holds yet (`launchers/eval.py`'s): the kind that loads the model dir itself
    (`loads_model_dir`), when `requested` names it or is "auto" and it can serve `model_config` on `device`; None
    when none is asked for or can, and the caller builds a ZeRO-3 engine and calls `choose_rollout(frozen=True)`. An
    explicit kind that cannot serve is refused in one line."""
    for kind in KINDS.values():
        if requested not in (kind.name, "auto") or (requested == "auto" and not kind.in_auto):
            continue
        cls = kind.load()
        if not cls.loads_model_dir:
            continue
        why = cls.model_dir_unavailable_reason(model_config, device, rollout_cfg)
        if why is None:
            logger.info(
                "%s rollout: %s (%s)", role, kind.name, "auto" if requested == "auto" else f"--rollout {requested}"
            )
            return cls
        if requested != "auto":
            raise ConfigError(f"--rollout {requested} cannot run here: {why}; pass --rollout auto")
        logger.info("%s rollout: %s not used (%s)", role, kind.name, why)
    return None


def choose_rollout(
    requested: str,
    model,
    device: str,
    rollout_cfg,
    *,
    role: str = "student",
    frozen: bool = False,
    model_dir_tried: bool = False,
) -> type:
    """The rollout class for `model` (an HF module, partitioned or not) on `device`: `requested`, refused in one
    line if it cannot serve, or with "auto" the first kind of the registry that can (less the kinds that load a model
    dir, when `choose_model_dir_rollout` has considered and logged them already)."""
    if requested != "auto":
        if requested not in KINDS:
            raise ConfigError(f"--rollout {requested!r} is unknown; use one of {', '.join(ROLLOUT_CHOICES)}")
        cls = KINDS[requested].load()
        why = _why_not(cls, model, device, rollout_cfg, frozen)
        if why is not None:
            raise ConfigError(f"--rollout {requested} cannot run here: {why}; pass --rollout auto")
        logger.info("%s rollout: %s (--rollout %s)", role, requested, requested)
        return cls
    for kind in (k for k in KINDS.values() if k.in_auto):
        cls = kind.load()
        if model_dir_tried and cls.loads_model_dir:
            continue
        why = _why_not(cls, model, device, rollout_cfg, frozen)
        if why is None:
            logger.info("%s rollout: %s (auto)", role, kind.name)
            return cls
        logger.info("%s rollout: %s not used (%s)", role, kind.name, why)
    raise ConfigError(f"no rollout kind can serve the {role} here; see the log lines above")
