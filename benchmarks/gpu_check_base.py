"""What every section of the GPU check (`benchmarks.gpu_check`) shares: the context a section records into, the
sizes of a full and a smoke run, the FLOP count behind MFU, peak memory, random model dirs and run configs.

Imports nothing heavy at module level: the runner that starts the sections imports this module too.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name(): the vendors'
# datasheets (H200 SXM has the H100 SXM's arithmetic).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# Qwen3-0.6B's shape (the student) and Qwen3-1.7B's (the offloaded teacher); random weights.
QWEN3_06B = dict(
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN3_17B = {**QWEN3_06B, "hidden_size": 2048, "intermediate_size": 6144}
# Smoke shapes: head_dim 32, a vocabulary just over the character tokenizer's 103 tokens.
TINY_STUDENT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=128,
    vocab_size=128,
    tie_word_embeddings=True,
)
TINY_TEACHER = {**TINY_STUDENT, "hidden_size": 96, "num_attention_heads": 3, "intermediate_size": 192}


@dataclass(frozen=True)
class Sizes:
    student: dict
    teacher: dict
    attention_lengths: tuple[int, ...]  # one packed micro-batch of mixed lengths
    train_tokens: int  # one row per RLAD train step
    warmup_steps: int
    train_steps: int  # timed
    rollout_prompts: int
    rollout_samples: int
    rollout_prompt_len: int
    rollout_tokens: int  # new tokens per sample, sampled at temperature 1
    greedy_tokens: int  # new tokens of the greedy comparison
    teacher_tokens: int
    repeats: int  # timed repeats of a measurement (median reported)
    auto_hidden: int  # hidden size of the tiny Llama / Qwen3 whose `auto` choice is recorded


GPU = Sizes(QWEN3_06B, QWEN3_17B, (8192, 3072, 200), 8192, 2, 5, 16, 8, 64, 1024, 256, 8192, 5, 256)
SMOKE = Sizes(TINY_STUDENT, TINY_TEACHER, (96, 40, 7), 64, 1, 2, 2, 2, 8, 8, 8, 64, 1, 64)


class SectionSkipped(Exception):
    """Raised by a section that cannot run here at all; its row says `skipped: <message>`."""


# ---- FLOPs ------------------------------------------------------------------------------------------------------


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The device's peak dense bf16 TFLOP/s: `override` if given, else from PEAK_BF16_TFLOPS, else None."""
    if override is not None:
        return float(override)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key.lower() in device_name.lower()), None)


def matmul_params(total_params: int, vocab: int, hidden: int, tied: bool) -> int:
    """Parameters that enter a matmul per token: all but the embedding lookup, plus the lm-head if it is tied
    (a tied lm-head is counted once in `total_params`, as the embedding)."""
    return total_params if tied else total_params - vocab * hidden


def attention_flops_per_token(layers: int, attn_dim: int, lengths) -> float:
    """Causal attention's training FLOPs per token over sequences of `lengths` (packed or not).

    Per layer and (query, key) pair, QK^T and AV cost 2 * attn_dim FLOPs each (a multiply and an add per element;
    attn_dim = query heads x head_dim, also with grouped-query attention). A causal sequence of T tokens has T^2/2
    pairs (half the square: the diagonal's T/2 is left out), and backward costs twice forward. So a sequence costs
    3 * 4 * attn_dim * T^2/2 = 6 * attn_dim * T^2 per layer, i.e. 6 * layers * T * attn_dim per token when alone."""
    return 6.0 * layers * attn_dim * sum(t * t for t in lengths) / sum(lengths)


def train_flops_per_token(n_matmul: int, layers: int, attn_dim: int, lengths) -> float:
    """Model FLOPs of one trained token: 6 per matmul parameter (2 forward, 4 backward) plus causal attention."""
    return 6.0 * n_matmul + attention_flops_per_token(layers, attn_dim, lengths)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12)


# ---- the context of one section ---------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of this process's section: on CUDA the device's used memory polled through NVML (vLLM's own
    allocator included) and torch's peak allocation; on CPU the process's peak resident set."""

    def __init__(self, device: str):
        self.device, self.device_peak, self.baseline, self._handle = device, 0, None, None
        if device == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
                self.baseline = self._used()
                threading.Thread(target=self._poll, daemon=True).start()
            except Exception:  # no NVML: torch's own peak still comes back
                self._handle = None

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _poll(self) -> None:
        while True:
            self.device_peak = max(self.device_peak, self._used())
            time.sleep(0.25)

    def read(self) -> dict:
        gib = 2.0**30
        if self.device != "cuda":
            return {"host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
        peak = {}
        if self._handle is not None:
            peak["device_used_gib"] = round(max(self.device_peak, self._used()) / gib, 2)
            peak["device_used_at_start_gib"] = round(self.baseline / gib, 2)
        torch = __import__("sys").modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            peak["torch_allocated_gib"] = round(torch.cuda.max_memory_allocated() / gib, 2)
        return peak


class Check:
    """What a section runs with (settings from the runner) and records into. Every `record` / `skip` rewrites the
    section's result file, so that a section killed at its deadline still leaves what it measured."""

    def __init__(self, settings: dict, result_path: Path):
        self.smoke: bool = settings["smoke"]
        self.device: str = settings["device"]
        self.work = Path(settings["work"])
        self.sizes = Sizes(**{**settings["sizes"], "attention_lengths": tuple(settings["sizes"]["attention_lengths"])})
        self.peak_tflops: float | None = settings.get("peak_tflops")
        self.wheels: str | None = settings.get("wheels")
        self.seed: int = settings.get("seed", 0)
        self.out = Path(settings["out"]) if settings.get("out") else None  # where the rows go
        self.result_path = result_path
        self.results: dict = {}
        self.memory = PeakMemory(self.device)

    def record(self, **values) -> None:
        self.results.update(values)
        self.save()

    def skip(self, part: str, reason: str) -> None:
        """A part this machine cannot run, with the reason; the section goes on."""
        self.results.setdefault("skipped", {})[part] = reason
        self.save()

    def save(self) -> None:
        payload = {**self.results, "peak": self.memory.read()}
        temporary = self.result_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(payload, default=str) + "\n")
        os.replace(temporary, self.result_path)


def settings_for(smoke: bool, work: Path, peak: float | None, wheels: str | None, seed: int = 0) -> dict:
    sizes = asdict(SMOKE if smoke else GPU)
    return dict(
        smoke=smoke,
        device="cpu" if smoke else "cuda",
        work=str(work),
        sizes=sizes,
        peak_tflops=peak,
        wheels=wheels,
        seed=seed,
    )


# ---- helpers the sections share ---------------------------------------------------------------------------------


def median(values) -> float:
    return float(statistics.median(values))


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int = 1) -> tuple[list[float], float, object]:
    """(seconds of each timed call, seconds of the first call, the last result) of `fn()`, synchronised."""
    seconds, first, result = [], 0.0, None
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if i == 0:
            first = elapsed
        if i >= warmup:
            seconds.append(elapsed)
    return seconds, first, result


def model_config(shape: dict):
    from transformers import Qwen3Config

    return Qwen3Config(**shape, max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def random_model(check: Check, shape: dict, dtype_name: str = "bfloat16"):
    """A Qwen3-architecture causal LM of `shape` with random weights (seeded), built on the check's device."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(check.seed)
    with torch.device(check.device):
        return AutoModelForCausalLM.from_config(
            model_config(shape), dtype=getattr(torch, dtype_name), attn_implementation="sdpa"
        )


def model_dir(check: Check, name: str, shape: dict) -> Path:
    """A model dir (random bf16 weights, the character tokenizer) under the work dir, built once per run and
    renamed into place whole, so that a section killed while writing it leaves nothing half-written."""
    from rlad_ds.tiny import char_tokenizer

    path = check.work / name
    if (path / "config.json").is_file():
        return path
    partial = check.work / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model = random_model(check, shape)
    model.save_pretrained(partial)
    char_tokenizer().save_pretrained(partial)  # vLLM reads the tokenizer beside the weights
    os.replace(partial, path)
    return path


def run_config(check: Check, student: Path, teacher: Path | None = None, method: str = "grpo", **groups):
    """A validated `rlad_ds` Config for `student`: bf16 on every device, ds_configs/zero3.json (whose AdamW runs as
    torch's own: nothing JIT-compiles); `groups` maps a section of the tree (model, rollout, train) to the fields it
    overrides."""
    from rlad_ds.config.schema import Config, LossConfig, ModelConfig, RolloutConfig, TrainConfig
    from rlad_ds.ds_config import CONFIG_DIR

    model = dict(student=str(student), teacher=str(teacher) if teacher else None, precision="bf16")
    return Config(
        model=ModelConfig(**{**model, **groups.get("model", {})}),
        rollout=RolloutConfig(**{"rollout": "gathered", **groups.get("rollout", {})}),
        loss=LossConfig(method=method),
        train=TrainConfig(**{"report_to": "none", **groups.get("train", {})}),
        deepspeed=str(CONFIG_DIR / "zero3.json"),
    )


def init_distributed() -> None:
    """This process as rank 0 of 1 (DeepSpeed's engines need a process group)."""
    from rlad_ds.distributed import init_process_group, single_process_env

    single_process_env()
    init_process_group(600)


def token_ids(check: Check, rows: int, length: int, high: int):
    """[rows, length] random ids in [3, high) on the check's device (0-2 are pad / BOS / EOS)."""
    import torch

    generator = torch.Generator().manual_seed(check.seed + rows * 7919 + length)
    return torch.randint(3, high, (rows, length), generator=generator).to(check.device)
