"""Rollout engines (the student's, the teacher's for sft, the evaluated model's), behind DeepSpeed's `RolloutEngine` API.

- `GatheredRollout` (default): gathers the whole ZeRO-3 student once per rollout, takes ZeRO's hooks off so
  decoding runs without collectives, generates with a KV cache (each rank stops at its own EOS), then
  releases the gathered weights and puts the hooks back, also when generation raises.
- `PerLayerRollout`: when a full gather would not fit, generates with ZeRO-3's per-layer gathers in
  place; ranks stay in lock-step (`synced_gpus=True`) so a rank that finished early keeps joining the
  collectives instead of leaving the others waiting forever.
- `HybridRollout`: DeepSpeed's `HybridEngineRollout`, where DeepSpeed has an inference policy for the
  architecture and kernels for the device (e.g. Llama on CUDA). The decision is made *before*
  `deepspeed.initialize` (see `resolve_rollout_kind`), since the engine must be built with
  `"hybrid_engine": {"enabled": true}`.

Every engine returns a `RolloutOutput`: DeepSpeed's `RolloutBatch` plus response masks and EOS/truncation flags.
`session()` keeps a model ready across several generate calls (one gather for all of them), and
`collective_calls` says whether every rank must make the same generate calls (per-layer and hybrid-engine
generation run collectives inside each call; a gathered session runs none).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from deepspeed.runtime.rollout import HybridEngineRollout, RolloutBatch, RolloutEngine, RolloutRequest, SamplingConfig

from rlad_ds.errors import ConfigError
from rlad_ds.models import param_bytes

logger = logging.getLogger(__name__)


@dataclass
class RolloutOutput(RolloutBatch):
    """A RolloutBatch whose rows also say which tokens were generated and how each response ended."""

    response_mask: torch.Tensor  # [B', T] bool: generated tokens, up to and including the first EOS
    eos: torch.Tensor  # [B'] bool: the response ended with EOS
    truncated: torch.Tensor  # [B'] bool: the response hit max_new_tokens without EOS
    prompt_index: torch.Tensor  # [B'] long: the request row each sample answers

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def finish_rollout(prompt_mask: torch.Tensor, output_ids: torch.Tensor, n_samples: int, eos_token_ids,
                   pad_token_id: int) -> RolloutOutput:
    """Turn generate's [B', T_p + T_r] output into a RolloutOutput: keep the first EOS, pad after it."""
    prompt_len = prompt_mask.shape[1]
    response = output_ids[:, prompt_len:]
    eos_ids = torch.as_tensor(eos_token_ids, device=output_ids.device).flatten()
    is_eos = torch.isin(response, eos_ids)
    eos = is_eos.any(-1)
    first_eos = torch.where(eos, is_eos.long().argmax(-1), response.shape[1])
    positions = torch.arange(response.shape[1], device=output_ids.device)
    kept = positions[None] <= first_eos[:, None]
    output_ids = output_ids.clone()
    output_ids[:, prompt_len:].masked_fill_(~kept, pad_token_id)

    prompt_mask = prompt_mask.repeat_interleave(n_samples, dim=0).to(output_ids.device)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), kept], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), kept.long()], dim=1)
    rows = output_ids.shape[0]
    return RolloutOutput(input_ids=output_ids, attention_mask=attention_mask,
                         response_start_idx=torch.full((rows, ), prompt_len, dtype=torch.long,
                                                       device=output_ids.device),
                         response_mask=response_mask, eos=eos, truncated=~eos,
                         prompt_index=torch.arange(rows, device=output_ids.device) // n_samples)


def concat_rollouts(outputs: list[RolloutOutput], pad_token_id: int) -> RolloutOutput:
    """The rows of several outputs in one, prompts left-padded to the widest and responses right-padded to the
    longest (each output's rows share one prompt width, its `response_start_idx`)."""
    if len(outputs) == 1:
        return outputs[0]
    starts = [int(o.response_start_idx[0]) for o in outputs]
    prompt_width = max(starts)
    width = prompt_width + max(o.input_ids.shape[1] - s for o, s in zip(outputs, starts))

    def stacked(name: str, value) -> torch.Tensor:
        parts = []
        for o, s in zip(outputs, starts):
            tensor = getattr(o, name)
            left = prompt_width - s
            parts.append(torch.nn.functional.pad(tensor, (left, width - left - tensor.shape[1]), value=value))
        return torch.cat(parts)

    offsets = [0]
    for o in outputs[:-1]:
        offsets.append(offsets[-1] + int(o.prompt_index.max()) + 1)
    rows = sum(o.input_ids.shape[0] for o in outputs)
    return RolloutOutput(input_ids=stacked("input_ids", pad_token_id), attention_mask=stacked("attention_mask", 0),
                         response_start_idx=torch.full((rows, ), prompt_width, dtype=torch.long,
                                                       device=outputs[0].input_ids.device),
                         response_mask=stacked("response_mask", False),
                         eos=torch.cat([o.eos for o in outputs]), truncated=torch.cat([o.truncated for o in outputs]),
                         prompt_index=torch.cat([o.prompt_index + k for o, k in zip(outputs, offsets)]))


def generation_config(sampling: SamplingConfig, tokenizer):
    """A GenerationConfig that sets every sampling knob, so nothing leaks in from the model's own defaults."""
    from transformers import GenerationConfig

    do_sample = sampling.temperature > 0.0
    return GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=do_sample,
                            temperature=sampling.temperature if do_sample else None,
                            top_p=sampling.top_p if do_sample else None,
                            top_k=max(sampling.top_k, 0) if do_sample else None, repetition_penalty=1.0,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            use_cache=True)


@contextmanager
def eval_mode(module):
    """Eval during generation (gradient checkpointing turns the KV cache off in train mode), then restore."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _parameter_offload(engine):
    optimizer = engine.optimizer
    return optimizer.parameter_offload if hasattr(optimizer, "parameter_offload") else optimizer


@contextmanager
def gathered_for_generation(engine):
    """DeepSpeed's `unwrap_model_for_generation`, but ZeRO-3's hooks come back on exceptions too.

    DeepSpeed re-registers the hooks only after a normal exit; an exception inside would leave the
    student training with its parameters never gathered again.
    """
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    offload = _parameter_offload(engine)
    try:
        with unwrap_model_for_generation(engine) as unwrapped:
            yield unwrapped
    except BaseException:
        if not offload.forward_hooks:  # the hooks were taken off and not put back
            offload._register_deepspeed_module(offload.module)
        raise


@contextmanager
def plain_linear():
    """torch's own F.linear while the block runs. ZeRO-3 replaces it process-wide with an autograd Function that
    saves memory in training (`memory_efficient_linear`); decoding under no_grad pays its overhead per call for
    nothing."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    replaced = original is not None and torch.nn.functional.linear is zero3_linear_wrap
    if replaced:
        torch.nn.functional.linear = original
    try:
        yield
    finally:
        if replaced:
            torch.nn.functional.linear = zero3_linear_wrap


class _HFGenerateRollout(RolloutEngine):
    """transformers' generate on a ZeRO-3 engine's model (student, teacher or evaluated model): expand prompts n times,
    decode, finish. Subclasses choose how the model is made whole."""

    collective_calls = False
    synced_gpus = False

    def __init__(self, engine, tokenizer):
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token")
        self.engine = engine
        self.tokenizer = tokenizer
        self._module = None

    @abstractmethod
    def _generating_model(self):
        """A context manager yielding the HF module to call generate on."""

    @contextmanager
    def session(self):
        """The model ready for generation (gathered, eval mode) until the block ends, for any number of calls."""
        if self._module is not None:  # already inside a session
            yield
            return
        with self._generating_model() as module, eval_mode(module), plain_linear():
            self._module = module
            try:
                yield
            finally:
                self._module = None

    @torch.no_grad()
    def generate(self, request: RolloutRequest, sampling: SamplingConfig) -> RolloutOutput:
        n = sampling.n_samples_per_prompt
        prompt_ids = request.prompt_ids.repeat_interleave(n, dim=0)
        prompt_mask = request.prompt_attention_mask.repeat_interleave(n, dim=0)
        config = generation_config(sampling, self.tokenizer)
        with self.session():
            output_ids = self._module.generate(prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                               synced_gpus=self.synced_gpus)
        return finish_rollout(request.prompt_attention_mask, output_ids, n, self.tokenizer.eos_token_id,
                              self.tokenizer.pad_token_id)

    def sync_weights(self, step: int) -> None:
        """No-op: the rollout reads the training engine's own (partitioned) weights."""
        return None


class GatheredRollout(_HFGenerateRollout):
    """Gather the full student once per rollout; decode with no collectives; each rank stops at its own EOS."""

    name = "gathered"

    @contextmanager
    def _generating_model(self):
        with gathered_for_generation(self.engine) as engine:
            yield engine.module


class PerLayerRollout(_HFGenerateRollout):
    """ZeRO-3 generation with per-layer gathers; ranks decode in lock-step until every rank is done."""

    name = "per_layer"
    collective_calls = True
    synced_gpus = True

    @contextmanager
    def _generating_model(self):
        yield self.engine.module


class HybridRollout(RolloutEngine):
    """DeepSpeed's HybridEngineRollout, with its output completed into a RolloutOutput."""

    name = "hybrid_engine"
    collective_calls = True

    def __init__(self, engine, tokenizer):
        self.tokenizer = tokenizer
        self.inner = HybridEngineRollout(engine=engine, tokenizer=tokenizer)

    @contextmanager
    def session(self):
        yield  # DeepSpeed's hybrid engine gathers and releases inside each generate call

    def generate(self, request: RolloutRequest, sampling: SamplingConfig) -> RolloutOutput:
        batch = self.inner.generate(request, sampling)
        return finish_rollout(request.prompt_attention_mask, batch.input_ids, sampling.n_samples_per_prompt,
                              self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)

    def sync_weights(self, step: int) -> None:
        self.inner.sync_weights(step)


def inference_policy_layer_classes() -> set:
    """Decoder-layer classes DeepSpeed's hybrid engine has an inference policy for (as it computes them)."""
    from deepspeed.module_inject.replace_policy import replace_policies

    classes = set()
    for policy in replace_policies:
        policy(None)  # instantiating sets _orig_layer_class to the transformers class, if importable
        layer_class = policy._orig_layer_class
        classes.update(layer_class if isinstance(layer_class, list) else [layer_class])
    classes.discard(None)
    return classes


def hybrid_engine_unavailable_reason(model, device: str) -> str | None:
    """Why DeepSpeed's hybrid engine cannot serve this model on this device, or None if it can."""
    if device != "cuda":
        return f"DeepSpeed has no hybrid-engine inference kernels for the {device} device"
    policy_classes = inference_policy_layer_classes()
    if not any(type(module) in policy_classes for module in model.modules()):
        return (f"DeepSpeed {__import__('deepspeed').__version__} has no inference policy for "
                f"{type(model).__name__}")
    return None


def resolve_rollout_kind(kind: str, model, device: str) -> str:
    """Before deepspeed.initialize: "hybrid_engine" if asked for (or "auto") and usable, else "gathered".

    When the hybrid engine cannot be used, one line says why. If this returns "hybrid_engine", build the
    student's config with `"hybrid_engine": {"enabled": true}`.
    """
    if kind not in ("auto", "hybrid_engine"):
        return kind
    reason = hybrid_engine_unavailable_reason(model, device)
    if reason is None:
        return "hybrid_engine"
    log = logger.warning if kind == "hybrid_engine" else logger.info
    log("rollout: hybrid engine not used (%s); using the gathered ZeRO-3 rollout", reason)
    return "gathered"


def build_rollout(kind: str, engine, tokenizer, gather_budget_bytes: int | None = None) -> RolloutEngine:
    """The rollout engine for an initialised student engine.

    `kind` is usually what `resolve_rollout_kind` returned. A gathered rollout whose full parameter bytes
    exceed `gather_budget_bytes` (None: no limit) falls back, with a logged line, to per-layer generation.
    """
    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

    if kind in ("auto", "hybrid_engine") and isinstance(engine, DeepSpeedHybridEngine):
        return HybridRollout(engine, tokenizer)
    if kind == "hybrid_engine":
        logger.warning("rollout: hybrid engine not used (the engine was built without hybrid_engine.enabled); "
                       "using the gathered ZeRO-3 rollout")
    if kind == "per_layer":
        return PerLayerRollout(engine, tokenizer)
    full_bytes = param_bytes(engine.module)
    if gather_budget_bytes is not None and full_bytes > gather_budget_bytes:
        logger.warning("rollout: gathering the model needs %.1f MiB, over the %.1f MiB budget; using per-layer "
                       "ZeRO-3 generation with synced ranks", full_bytes / 2**20, gather_budget_bytes / 2**20)
        return PerLayerRollout(engine, tokenizer)
    return GatheredRollout(engine, tokenizer)
