"""DeepSpeed's hybrid engine as a rollout: its `HybridEngineRollout` (inference kernels swapped into the training
engine for generation), with its output completed into a `RolloutOutput`.

Explicit only (`--rollout hybrid_engine`), never chosen by `auto`: it needs DeepSpeed's inference policy for the
architecture and CUDA kernels (compiled with nvcc at start-up), and its HF-Llama container packs q, k and v as equal
blocks (no grouped-query attention: Llama-3, R1-Distill-Llama) and builds rotary embeddings from a scalar
`rope_theta` (no scaled variants). Models it cannot serve are refused in one line before the student is built; the
student must be built with its config patch (`ds_config`)."""

from __future__ import annotations

from contextlib import contextmanager

from deepspeed.runtime.rollout import HybridEngineRollout, RolloutEngine, RolloutRequest, SamplingConfig

from rlad_ds.rollout.output import RolloutOutput, finish_rollout


class HybridRollout(RolloutEngine):
    """DeepSpeed's HybridEngineRollout, with its output completed into a RolloutOutput."""

    name = "hybrid_engine"
    collective_calls = True
    serves_frozen = False  # it swaps kernels into a training engine
    loads_model_dir = False
    ds_config = {"hybrid_engine": {"enabled": True}}

    def __init__(self, engine, tokenizer):
        self.tokenizer = tokenizer
        self.inner = HybridEngineRollout(engine=engine, tokenizer=tokenizer)

    @staticmethod
    def unavailable_reason(model, device: str, rollout_cfg) -> str | None:
        """Why DeepSpeed's hybrid engine cannot serve this model on this device, or None if it can."""
        if device != "cuda":
            return f"DeepSpeed has no hybrid-engine inference kernels for the {device} device"
        policy_classes = inference_policy_layer_classes()
        if not any(type(module) in policy_classes for module in model.modules()):
            return f"DeepSpeed {__import__('deepspeed').__version__} has no inference policy for {type(model).__name__}"
        config = model.config
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        if kv_heads not in (None, heads):
            return (
                f"DeepSpeed's inference container has no grouped-query attention ({heads} query heads, "
                f"{kv_heads} key/value heads)"
            )
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if rope_type not in (None, "default"):
            return f"DeepSpeed's inference kernels build rotary embeddings from rope_theta alone, not {rope_type!r}"
        return None

    @classmethod
    def from_run(cls, engine, tokenizer, model_path, rollout_cfg, seed: int, context=None):
        return cls(engine, tokenizer)

    @contextmanager
    def session(self):
        """The engine in eval mode, which swaps its inference kernels in (DeepSpeed's `DeepSpeedHybridEngine.eval`),
        until the block ends; then back to training mode. Gathers happen inside each generate call."""
        engine = self.inner.engine
        was_training = engine.training
        engine.eval()
        try:
            yield
        finally:
            engine.train(was_training)

    def generate(self, request: RolloutRequest, sampling: SamplingConfig) -> RolloutOutput:
        batch = self.inner.generate(request, sampling)
        return finish_rollout(
            request.prompt_attention_mask,
            batch.input_ids,
            sampling.n_samples_per_prompt,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
        )

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
