"""Tiny HF model dirs for the tests: a randomly initialised Qwen3 or Llama with the character tokenizer."""

from __future__ import annotations

from pathlib import Path


def save_tiny_model(path: str | Path, arch: str = "qwen3", tokenizer=None, seed: int = 0, **size) -> Path:
    """Write an HF model dir (safetensors weights + tokenizer) with a randomly initialised tiny model."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlad_ds.tiny import char_tokenizer, tiny_config

    tokenizer = tokenizer if tokenizer is not None else char_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **size))
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
