"""The rollout kinds, as `rlad_ds.methods` is for methods: one ordered registry, and the one place that chooses.

Each kind names its class; the class declares why it cannot serve a model on a device (`unavailable_reason`), the
patch it needs in the student's DeepSpeed config (`ds_config`, applied before `deepspeed.initialize`), how it is
built for a run (`from_run`), whether its generate calls are collectives every rank must make alike
(`collective_calls`) and whether it can sample from a frozen engine (`serves_frozen`: the teacher, the model of
`launchers/eval.py`). `--rollout auto` walks the kinds marked `in_auto` in this order, once, and logs why each one
before the chosen one was passed over; an explicit kind that cannot serve is refused in one line.

Imports nothing heavy: the config tree reads `ROLLOUT_CHOICES` before DeepSpeed is imported.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from rlad_ds.errors import ConfigError

logger = logging.getLogger("rlad_ds")


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
        return "it samples from a training engine only"
    return cls.unavailable_reason(model, device, rollout_cfg)


def choose_rollout(
    requested: str, model, device: str, rollout_cfg, *, role: str = "student", frozen: bool = False
) -> type:
    """The rollout class for `model` (an HF module, partitioned or not) on `device`: `requested`, refused in one
    line if it cannot serve, or with "auto" the first kind of the registry that can."""
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
        why = _why_not(cls, model, device, rollout_cfg, frozen)
        if why is None:
            logger.info("%s rollout: %s (auto)", role, kind.name)
            return cls
        logger.info("%s rollout: %s not used (%s)", role, kind.name, why)
    raise ConfigError(f"no rollout kind can serve the {role} here; see the log lines above")
