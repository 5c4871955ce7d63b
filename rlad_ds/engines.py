"""The one place that builds engines from the config: the student (ZeRO-3 training engine and its rollout),
the frozen teacher and reference scorers, and the model that `launchers/eval.py` evaluates.

What gets built follows the method object (`rlad_ds.methods`): a teacher only for methods that read or
sample from one, a reference only with `--beta_ref > 0`, old-policy scoring of the student always
available. Every scorer takes log-probs at the rollout temperature. The trainer, the demo, the study and
the benchmarks receive an `Engines` and never build one themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rlad_ds import launch
from rlad_ds.ds_config import frozen_ds_config, student_ds_config
from rlad_ds.errors import ConfigError
from rlad_ds.models import choose_attention, load_causal_lm
from rlad_ds.rollout import build_rollout, resolve_rollout_kind
from rlad_ds.teacher import Scorer, load_frozen
from rlad_ds.vllm_rollout import VLLMRollout, vllm_unavailable_reason

logger = logging.getLogger(__name__)


@dataclass
class Engines:
    student: object  # the DeepSpeed training engine (ZeRO-3)
    rollout: object  # the student's RolloutEngine
    student_scorer: Scorer  # the student with no grad: old-policy log-probs
    teacher: Scorer | None = None
    teacher_rollout: object = None  # the teacher's RolloutEngine (sft generates with it; the demo evaluates it)
    reference: Scorer | None = None
    packed: bool = False  # micro-batches run padding-free

    @property
    def device(self):
        return self.student.device


def _device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _gather_budget(cfg) -> int:
    return int(cfg.rollout.gather_budget_gb * 2**30)


def _attention(cfg, device: str) -> str:
    override = cfg.model.attn_implementation
    return choose_attention(device, None if override == "auto" else override)


def _rollout_kind(cfg, model, device: str) -> str:
    """--engine resolved before deepspeed.initialize (the hybrid engine changes how the student is built),
    the choice and the reasons for it logged; --engine vllm that cannot run is refused in one line."""
    kind = cfg.rollout.engine
    if kind in ("auto", "vllm"):
        reason = vllm_unavailable_reason(model.config, device)
        if reason is None:
            logger.info("rollout engine: vllm (%s)", "--engine vllm" if kind == "vllm" else
                        "auto: vLLM is installed and supports the model")
            return "vllm"
        if kind == "vllm":
            raise ConfigError(f"--engine vllm cannot run here: {reason}; pass --engine auto or gathered")
        logger.info("rollout: vLLM not used (%s)", reason)
    kind = resolve_rollout_kind(kind, model, device)
    logger.info("rollout engine: %s", kind)
    return kind


def build_engines(cfg, method, student_path: Path, teacher_path: Path | None, tokenizer) -> Engines:
    """Every engine `method` needs, partitioned over the ranks of the (initialised) process group."""
    import deepspeed

    device, world = _device(), launch.world()[1]
    attn = _attention(cfg, device)
    student_ds = student_ds_config(cfg, world, device)
    model = load_causal_lm(student_path, student_ds, attn_implementation=attn,
                           gradient_checkpointing=cfg.model.gradient_checkpointing,
                           trust_remote_code=cfg.model.trust_remote_code)
    kind = _rollout_kind(cfg, model, device)
    if kind == "hybrid_engine":
        student_ds["hybrid_engine"] = {"enabled": True}
    params = [p for p in model.parameters() if p.requires_grad]
    student, *_ = deepspeed.initialize(model=model, model_parameters=params, config=student_ds)
    budget = _gather_budget(cfg)
    # Padding-free packing needs attention that honours per-sequence position ids: flash-attention's varlen
    # kernels on GPU (transformers' sdpa/eager masks also do, which is how CPU tests cover it).
    packed = cfg.model.pack_sequences == "on" or (cfg.model.pack_sequences == "auto" and attn == "flash_attention_2")
    scoring = dict(temperature=cfg.rollout.temperature, chunk_size=cfg.model.logprob_chunk_size or None,
                   max_tokens_per_microbatch=cfg.train.micro_batch_tokens, packed=packed)
    rollout = (VLLMRollout(student, tokenizer, student_path, cfg.rollout, seed=cfg.train.seed) if kind == "vllm"
               else build_rollout(kind, student, tokenizer, budget))
    engines = Engines(student, rollout, Scorer(student, tokenizer, **scoring), packed=packed)

    def frozen(path: Path, offload: bool) -> object:
        return load_frozen(path, frozen_ds_config(cfg, offload, world, device), student_tokenizer=tokenizer,
                           attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code)

    if method.needs_teacher:
        teacher = frozen(teacher_path, {"on": True, "off": False}.get(cfg.model.teacher_offload, device != "cpu"))
        engines.teacher = Scorer(teacher, tokenizer, **scoring)
        engines.teacher_rollout = build_rollout("gathered", teacher, tokenizer, budget)
    if cfg.loss.beta_ref > 0:
        engines.reference = Scorer(frozen(student_path, cfg.model.reference_offload), tokenizer, **scoring)
    return engines


def build_eval_engine(cfg, model_path: Path, tokenizer):
    """`launchers/eval.py`'s model: a frozen ZeRO-3 inference engine and its rollout, from the same builders."""
    import deepspeed

    device = _device()
    ds_config = frozen_ds_config(cfg, cfg.eval.eval_offload, launch.world()[1], device)
    model = load_causal_lm(model_path, ds_config, attn_implementation=_attention(cfg, device), trainable=False,
                           trust_remote_code=cfg.model.trust_remote_code)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    # A frozen engine has no hybrid engine, and vLLM serves training rollouts only: the others take the gathered path.
    kind = "per_layer" if cfg.rollout.engine == "per_layer" else "gathered"
    return engine, build_rollout(kind, engine, tokenizer, _gather_budget(cfg))
