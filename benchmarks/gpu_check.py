"""GPU check (needs CUDA; not run on the CPU CI): training tokens/s and MFU of a Qwen3-0.6B-shaped student at 8K
tokens, flash-attn vs sdpa, bf16 ZeRO-3 (one process); then rollout tokens/s: the gathered engine and, with
vLLM installed, the colocated vLLM rollout (`--rollout vllm`) and its weight sync from the ZeRO-3 partitions.

    python -m benchmarks.gpu_check [--seq_len 8192] [--steps 5] [--peak_tflops 989] [--json gpu_check.json]

The student has random weights from its config (hidden 1024, 28 layers, 16 heads of 128, 8 kv heads,
intermediate 3072, vocab 151936, tied embeddings). One training step = the trainer's micro-batch path:
`token_logprobs` (chunked lm-head) -> loss -> `engine.backward` -> `engine.step`, one row of `seq_len` tokens.

MFU = achieved model FLOP/s / peak bf16 FLOP/s, with the PaLM (appendix B) count per trained token:
6 * N + 12 * layers * (heads * head_dim) * seq_len, where N is every parameter used in a matmul (the
lm-head counted, the embedding lookup not). Attention is counted without halving for the causal mask.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
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


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The device's peak bf16 TFLOP/s: `override` if given, else from PEAK_BF16_TFLOPS, else None."""
    if override is not None:
        return float(override)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key.lower() in device_name.lower()), None)


def matmul_params(total_params: int, vocab: int, hidden: int, tied: bool) -> int:
    """Parameters that enter a matmul per token: all but the embedding lookup, plus the lm-head if it is tied
    (a tied lm-head is counted once in `total_params`, as the embedding)."""
    return total_params if tied else total_params - vocab * hidden


def train_flops_per_token(n_matmul: int, layers: int, attn_dim: int, seq_len: int) -> float:
    """PaLM's training FLOPs per token: 6N for the weights (forward + backward) + 12 L d T for attention."""
    return 6.0 * n_matmul + 12.0 * layers * attn_dim * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12)


def format_table(rows: list[dict]) -> str:
    """Rows {"name", "value", "unit", "detail"?} as a markdown table; a None value prints as 'skipped'."""
    lines = ["| check | value | unit | detail |", "|---|---|---|---|"]
    for row in rows:
        value = row["value"]
        text = "skipped" if value is None else (f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}")
        lines.append(f"| {row['name']} | {text} | {row['unit']} | {row.get('detail', '')} |")
    return "\n".join(lines)


# ---- the GPU runs ----------------------------------------------------------------------------------------------


def build_engine(model_dir: Path, attn: str, gradient_checkpointing: bool):
    import deepspeed

    from rlad_ds.ds_config import CONFIG_DIR, fill_train_config
    from rlad_ds.models import load_causal_lm

    config = fill_train_config(
        CONFIG_DIR / "zero3.json",
        world_size=1,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        lr=1e-6,
        gradient_clipping=1.0,
        device="cuda",
    )
    model = load_causal_lm(model_dir, config, attn_implementation=attn, gradient_checkpointing=gradient_checkpointing)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    return engine


def train_rate(engine, seq_len: int, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(tokens/s, peak GiB) of full training steps on one row of `seq_len` random tokens."""
    import torch

    from rlad_ds.logprobs import token_logprobs

    ids = torch.randint(3, QWEN3_06B["vocab_size"], (1, seq_len), device=engine.device)
    mask = torch.ones_like(ids)
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = -token_logprobs(engine, ids, mask).logprobs.mean()
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    return seq_len * steps / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**30


def rollout_rate(rollout, engine, prompts: int, prompt_len: int, new_tokens: int) -> float:
    """Generated tokens/s of a rollout engine on the student (greedy, a real tokenizer's pad / EOS ids)."""
    import torch
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    ids = torch.randint(3, 100, (prompts, prompt_len), device=engine.device)
    request = RolloutRequest(prompt_ids=ids, prompt_attention_mask=torch.ones_like(ids))
    rollout.generate(request, SamplingConfig(max_new_tokens=8, temperature=0.0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = rollout.generate(request, SamplingConfig(max_new_tokens=new_tokens, temperature=0.0))
    torch.cuda.synchronize()
    return float(out.response_lengths.sum()) / (time.perf_counter() - start)


def rollout_rows(engine, model_dir: Path, args) -> list[dict]:
    """Rollout tokens/s of the gathered engine and the vLLM engine (if it can run), and vLLM's weight sync time."""
    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.rollout.hf import GatheredRollout
    from rlad_ds.rollout.vllm import VLLMRollout, vllm_unavailable_reason
    from rlad_ds.tiny import char_tokenizer

    shape = f"{args.rollout_prompts} prompts x {args.rollout_tokens} new tokens"
    gathered = rollout_rate(
        GatheredRollout(engine, char_tokenizer()), engine, args.rollout_prompts, 64, args.rollout_tokens
    )
    rows = [{"name": "gathered rollout tokens/s (sdpa, greedy)", "value": gathered, "unit": "tok/s", "detail": shape}]
    reason = vllm_unavailable_reason(engine.module.config, "cuda")
    names = ("vLLM rollout tokens/s (greedy)", "vLLM / gathered rollout tokens/s", "vLLM weight sync from ZeRO-3")
    if reason is not None:
        return rows + [
            {"name": name, "value": None, "unit": unit, "detail": reason}
            for name, unit in zip(names, ("tok/s", "x", "s"))
        ]
    vllm = VLLMRollout(engine, char_tokenizer(), model_dir, RolloutConfig(vllm_gpu_memory_utilization=0.3))
    rate = rollout_rate(vllm, engine, args.rollout_prompts, 64, args.rollout_tokens)
    vllm.synced_step = None
    vllm.sync_weights()
    rows += [
        {"name": names[0], "value": rate, "unit": "tok/s", "detail": shape},
        {"name": names[1], "value": rate / gathered, "unit": "x", "detail": "goal >= 4"},
        {"name": names[2], "value": vllm.sync_seconds, "unit": "s", "detail": "every weight, layer by layer"},
    ]
    vllm.shutdown()
    return rows


def measure(model_dir: Path, attn: str, args, flops: float, peak: float | None, device: str) -> list[dict]:
    """Training tokens/s and MFU with one attention backend (and, for sdpa, the gathered rollout's tokens/s)."""
    import torch

    from rlad_ds.models import flash_attention_unavailable_reason

    name = f"train tokens/s, {attn}, {args.seq_len} tokens, bf16 ZeRO-3"
    if attn == "flash_attention_2" and flash_attention_unavailable_reason() is not None:
        return [
            {"name": name, "value": None, "unit": "tok/s", "detail": "flash-attn not installed"},
            {"name": f"MFU, {attn}", "value": None, "unit": "fraction"},
        ]
    engine = build_engine(model_dir, attn, args.gradient_checkpointing)
    rate, peak_gib = train_rate(engine, args.seq_len, args.steps)
    rows = [
        {"name": name, "value": rate, "unit": "tok/s", "detail": f"peak {peak_gib:.1f} GiB allocated"},
        {
            "name": f"MFU, {attn}",
            "value": mfu(rate, flops, peak),
            "unit": "fraction",
            "detail": f"{flops / 1e9:.2f} GFLOP/token, peak {peak} TFLOP/s ({device})",
        },
    ]
    if attn == "sdpa":
        rows += rollout_rows(engine, model_dir, args)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--peak_tflops", type=float, help="peak bf16 TFLOP/s (default: looked up by device name)")
    parser.add_argument("--rollout_prompts", type=int, default=32)
    parser.add_argument("--rollout_tokens", type=int, default=512)
    parser.add_argument("--json", default="gpu_check.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible; this check needs a GPU (run python -m benchmarks.run on CPU)",
            file=sys.stderr,
        )
        return 2
    import deepspeed
    from transformers import AutoModelForCausalLM, Qwen3Config

    from rlad_ds.distributed import single_process_env
    from rlad_ds.tiny import char_tokenizer

    single_process_env()
    from rlad_ds.distributed import init_process_group  # removes this process's /dev/shm buffer at exit

    init_process_group(1800)
    device = torch.cuda.get_device_name()
    peak = peak_tflops(device, args.peak_tflops)
    config = Qwen3Config(
        **QWEN3_06B, max_position_embeddings=max(args.seq_len, 40960), pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    flops = train_flops_per_token(
        matmul_params(total, config.vocab_size, config.hidden_size, True),
        config.num_hidden_layers,
        config.num_attention_heads * config.head_dim,
        args.seq_len,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        char_tokenizer().save_pretrained(tmp)  # vLLM reads the tokenizer beside the weights
        del model
        for attn in ("flash_attention_2", "sdpa"):
            rows += measure(Path(tmp), attn, args, flops, peak, device)
    print(format_table(rows))
    Path(args.json).write_text(
        json.dumps(
            {"device": device, "torch": torch.__version__, "deepspeed": deepspeed.__version__, "rows": rows}, indent=1
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
