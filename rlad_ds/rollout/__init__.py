"""Rollouts: sampling responses from a model, behind DeepSpeed's `RolloutEngine` API.

`output` (what every rollout returns), `hf` (transformers' generate: gathered, per-layer, plain module), `hybrid`
(DeepSpeed's hybrid engine), `vllm` (a colocated vLLM engine synced from ZeRO-3), and `registry`, which lists the
kinds in `--rollout auto`'s order and is the one place that chooses among them.
"""
