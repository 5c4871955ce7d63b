"""The process's random state: forked for work that must not move the training's stream (evaluation, vLLM's
start-up), seeded from (seed, step, rank), and saved to / restored from a checkpoint (safetensors and JSON, no
pickle)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch


def forked_rng():
    """torch's CPU (and current CUDA device's) generator restored when the block ends."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def seed_rng(seed: int, step: int, rank: int) -> int:
    """Seed Python and torch from (seed, step, rank) alone: resuming on another world size, where no rank's
    saved RNG state is this rank's."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little")
    random.seed(value)
    torch.manual_seed(value)
    return value


def save_rng_state(directory: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))
    version, state, gauss = random.getstate()
    # Not atomic, and need not be: a checkpoint counts only once its manifest, written last, exists.
    (directory / f"rng_rank{rank}.json").write_text(json.dumps({"python": [version, list(state), gauss]}, indent=1))


def load_rng_state(directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"rng_rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = json.loads((directory / f"rng_rank{rank}.json").read_text())["python"]
    random.setstate((version, tuple(state), gauss))
