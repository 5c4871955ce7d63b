"""transformers' `generate` as a rollout, behind DeepSpeed's `RolloutEngine` API, on a ZeRO-3 engine's model (the
student's training engine, the frozen teacher, `launchers/eval.py`'s model) or on a plain module (the demo's SFT).

- `GatheredRollout`: gathers the whole ZeRO-3 model once per rollout session, takes ZeRO's hooks off so decoding
  runs without collectives, generates with a KV cache (each rank stops at its own EOS), then releases the gathered
  weights and puts the hooks back, also when generation raises. Refused above `--gather_budget_gb`.
- `PerLayerRollout`: generates with ZeRO-3's per-layer gathers in place; ranks stay in lock-step
  (`synced_gpus=True`) so a rank that finished early keeps joining the collectives instead of leaving the others
  waiting forever.
- `ModuleRollout`: a model that is already whole (no DeepSpeed), e.g. during the demo's SFT.

Each class declares what `rlad_ds.rollout.registry` asks of a rollout: why it cannot serve a model
(`unavailable_reason`), whether its generate calls are collectives every rank must make alike
(`collective_calls`), whether it can sample from a frozen engine (`serves_frozen`) or load a model dir itself
(`loads_model_dir`: no), its DeepSpeed-config patch (`ds_config`) and how it is built for a run (`from_run`).
`session()` keeps a model ready across several generate calls (one gather for all of them).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.runtime.rollout import RolloutEngine, RolloutRequest, SamplingConfig

from rlad_ds.errors import ConfigError
from rlad_ds.models import kv_cache_bytes_per_token, param_bytes
from rlad_ds.rollout.output import RolloutOutput, concat_rollouts, finish_rollout

logger = logging.getLogger(__name__)


def generation_config(sampling: SamplingConfig, tokenizer):
    """A GenerationConfig that sets every sampling knob, so nothing leaks in from the model's own defaults."""
    from transformers import GenerationConfig

    do_sample = sampling.temperature > 0.0
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=do_sample,
        temperature=sampling.temperature if do_sample else None,
        top_p=sampling.top_p if do_sample else None,
        top_k=max(sampling.top_k, 0) if do_sample else None,
        repetition_penalty=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


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


# The parts of ZeRO-3's parameter coordinator that hold its recorded fetch order (DeepSpeed < 0.20).
_TRACE = (
    "_PartitionedParameterCoordinator__trace_mode",
    "_PartitionedParameterCoordinator__submodule_order",
    "_PartitionedParameterCoordinator__param_order",
)


@contextmanager
def gathered_for_generation(engine):
    """The whole ZeRO-3 model gathered, its hooks off while it decodes (no collectives: each rank stops at its own
    EOS), then the hooks back, also when generation raises.

    As DeepSpeed's `unwrap_model_for_generation`, except that the coordinator's recorded fetch order survives.
    DeepSpeed re-registers the hooks under new module ids, which discards the trace; and its start-of-forward hook,
    left on, lets every decoding forward reset the coordinator's step (with a cross-rank check while no trace is
    complete: a collective that ranks stopping at different lengths do not all reach). Without a kept trace ZeRO-3
    releases even its persistent parameters after each use and never prefetches: the training passes after a
    rollout ran about 2x slower. So the trace the last training pass recorded is completed before the hooks come
    off (what the next forward's hook would do), that hook is off too while decoding, and the module hooks come
    back under the ids they had.
    """
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    offload = _parameter_offload(engine)
    coordinator, root, first_id = offload.get_param_coordinator(), offload.module, offload.module.ds_id
    if coordinator.is_record_trace():  # every rank is here: the rollout session starts on all ranks alike
        coordinator.reset_step()
    kept = {name: getattr(coordinator, name) for name in _TRACE} if coordinator.is_complete_trace() else {}
    start_of_forward = root._forward_pre_hooks[offload.fwd_pre_hook.id]
    # Exited after the block below: the engine's hooks go back in front of the module hooks re-registered there.
    with GatheredParameters(list(engine.module.parameters())), _engine_forward_work_off(engine):
        for hook in offload.forward_hooks + offload.backward_hooks + [offload.fwd_pre_hook]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield engine
        finally:
            offload._register_deepspeed_module(root, count=[first_id])
            offload.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward, prepend=True)
            for name, value in kept.items():
                setattr(coordinator, name, value)


@contextmanager
def _engine_forward_work_off(engine):
    """The engine's own forward hooks off and every submodule's parameters in a plain dict, then both back, the
    hooks first on the root as `deepspeed.initialize` left them.

    The hooks walk all submodules twice per forward to switch ZeRO's discovery of parameters used outside their
    module on and off, and `ZeROOrderedDict` runs Python on every parameter read. With the model whole neither has
    anything to find; on the demo's student they made a gathered rollout 1.14x a plain module's `generate`.
    """
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict

    root = engine.module
    pre, post = engine.module_forward_pre_hook, engine.module_forward_post_hook  # None under DeepCompile
    prologue = root._forward_pre_hooks[pre.id] if pre is not None else None
    epilogue = root._forward_hooks[post.id] if post is not None else None
    zero_dicts = {m: m._parameters for m in root.modules() if isinstance(m._parameters, ZeROOrderedDict)}
    for hook in (pre, post):
        if hook is not None:
            hook.remove()
    for module, params in zero_dicts.items():
        module._parameters = dict(params)
    try:
        yield
    finally:
        for module, params in zero_dicts.items():
            module._parameters = params
        if prologue is not None:
            engine.module_forward_pre_hook = root.register_forward_pre_hook(prologue, prepend=True, with_kwargs=True)
        if epilogue is not None:
            engine.module_forward_post_hook = root.register_forward_hook(epilogue, prepend=True)


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
    """transformers' generate on a model: expand prompts n times, decode, finish. Subclasses choose how the model
    is made whole."""

    collective_calls = False
    serves_frozen = True
    loads_model_dir = False
    ds_config: dict = {}

    def __init__(self, engine, tokenizer, kv_cache_budget_gb: float | None = None):
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token")
        self.engine = engine
        self.tokenizer = tokenizer
        self.kv_cache_budget_gb = kv_cache_budget_gb  # None: a share of the memory free when generation starts
        self._module = None

    @staticmethod
    def unavailable_reason(model, device: str, rollout_cfg) -> str | None:
        return None

    @classmethod
    def from_run(cls, engine, tokenizer, model_path, rollout_cfg, seed: int, context=None):
        return cls(engine, tokenizer, rollout_cfg.kv_cache_budget_gb)

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
        """n samples of every prompt, in as many generate calls as the KV-cache budget needs (whole prompts each)."""
        n, config = sampling.n_samples_per_prompt, generation_config(sampling, self.tokenizer)
        with self.session():
            row_tokens = request.prompt_ids.shape[1] + sampling.max_new_tokens
            step = max(1, self._rows_per_call(row_tokens) // n)
            outputs = []
            for start in range(0, request.prompt_ids.shape[0], step):
                prompt_mask = request.prompt_attention_mask[start : start + step]
                output_ids = self._module.generate(
                    request.prompt_ids[start : start + step].repeat_interleave(n, dim=0),
                    attention_mask=prompt_mask.repeat_interleave(n, dim=0),
                    generation_config=config,
                    synced_gpus=self.collective_calls,
                )
                eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
                outputs.append(finish_rollout(prompt_mask, output_ids, n, eos, pad))
        return concat_rollouts(outputs, self.tokenizer.pad_token_id)

    def _rows_per_call(self, row_tokens: int) -> int:
        """Rows of `row_tokens` tokens whose KV cache fits the budget in one generate call. Ranks whose calls are
        collectives agree on the smallest, so that they make as many calls."""
        from deepspeed.accelerator import get_accelerator

        per_row = kv_cache_bytes_per_token(self._module.config, self._module.dtype.itemsize) * row_tokens
        if self.kv_cache_budget_gb is not None:
            budget = self.kv_cache_budget_gb * 2**30
        else:  # the KV cache and generate's own buffers share what is free beside the (gathered) weights
            accelerator = get_accelerator()
            budget = accelerator.available_memory() / 4
            if accelerator.device_name() != "cpu":
                cached = accelerator.memory_reserved() - accelerator.memory_allocated()
                budget = (accelerator.available_memory() + cached) / 2
        rows = max(1, int(budget // per_row))
        if self.collective_calls and dist.is_available() and dist.is_initialized():
            agreed = torch.tensor([rows], device=get_accelerator().current_device_name())
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            rows = int(agreed.item())
        return rows

    def sync_weights(self, step: int) -> None:
        """No-op: the rollout reads the training engine's own (partitioned) weights."""
        return None


class GatheredRollout(_HFGenerateRollout):
    """Gather the full model once per rollout session; decode with no collectives; each rank stops at its own EOS."""

    name = "gathered"

    @staticmethod
    def unavailable_reason(model, device: str, rollout_cfg) -> str | None:
        needed, budget = param_bytes(model), rollout_cfg.gather_budget_gb * 2**30
        if needed > budget:
            return (
                f"gathering the whole model needs {needed / 2**30:.2f} GiB, over --gather_budget_gb "
                f"{rollout_cfg.gather_budget_gb:g}"
            )
        return None

    @contextmanager
    def _generating_model(self):
        with gathered_for_generation(self.engine) as engine:
            yield engine.module


class PerLayerRollout(_HFGenerateRollout):
    """ZeRO-3 generation with per-layer gathers; ranks decode in lock-step until every rank is done."""

    name = "per_layer"
    collective_calls = True

    @contextmanager
    def _generating_model(self):
        yield self.engine.module


class ModuleRollout(_HFGenerateRollout):
    """A model that is whole already (no DeepSpeed): generate on it as it is."""

    name = "module"

    def __init__(self, module, tokenizer, kv_cache_budget_gb: float | None = None):
        super().__init__(None, tokenizer, kv_cache_budget_gb)
        self.module = module

    @contextmanager
    def _generating_model(self):
        yield self.module
