"""P4 worker, one response length per fresh process: peak memory of one training forward + backward.

A ZeRO-3 student engine (rlad_ds's zero3.json, one process, sdpa attention) runs exactly the trainer's
micro-batch: `token_logprobs` (chunked lm-head, with entropy) then `trrd_loss` against fixed fake old /
teacher log-probs and advantages, then `engine.backward`. One row: a 64-token prompt + L response tokens.

Memory as in P2: a warm-up forward + backward on 64 response tokens first (so that ZeRO-3's gradient
partitions and buckets exist), then baseline = resident set now (/proc/self/statm); peak growth =
ru_maxrss after the length-L forward + backward - baseline. Parameters, gradients and optimizer state are
the same at every length and sit in the baseline; what grows is activations and saved tensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import current_rss_bytes, peak_rss_bytes
from rlad_ds.distributed import single_process_env

PROMPT = 64


def forward_backward(engine, response_tokens: int, vocab: int, chunk_size: int) -> None:
    import torch

    from rlad_ds.logprobs import token_logprobs
    from rlad_ds.losses import trrd_loss

    generator = torch.Generator().manual_seed(response_tokens)
    total = PROMPT + response_tokens
    input_ids = torch.randint(3, vocab, (1, total), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    mask = torch.zeros(1, total - 1, dtype=torch.bool)
    mask[:, PROMPT - 1 :] = True
    out = token_logprobs(engine, input_ids, attention_mask, chunk_size=chunk_size, with_entropy=True)
    old = out.logprobs.detach()
    teacher = old + 0.1 * torch.randn(old.shape, generator=generator)
    loss, _ = trrd_loss(out.logprobs, old, teacher, torch.ones(1), mask, alpha=0.5)
    engine.backward(loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, required=True, help="response tokens")
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    single_process_env()
    import deepspeed

    from rlad_ds.distributed import init_process_group  # removes this process's /dev/shm buffer at exit
    from rlad_ds.ds_config import CONFIG_DIR, fill_train_config
    from rlad_ds.models import load_causal_lm

    init_process_group(1800)
    config = fill_train_config(
        CONFIG_DIR / "zero3.json",
        world_size=1,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        lr=1e-5,
        gradient_clipping=1.0,
        device="cpu",
        persistence_threshold=0,
    )
    model = load_causal_lm(
        args.model, config, attn_implementation="sdpa", gradient_checkpointing=args.gradient_checkpointing
    )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    engine.train()
    vocab = model.config.vocab_size
    forward_backward(engine, 64, vocab, args.chunk_size)
    baseline = current_rss_bytes()
    start = time.perf_counter()
    forward_backward(engine, args.tokens, vocab, args.chunk_size)
    seconds = time.perf_counter() - start
    result = {
        "tokens": args.tokens,
        "prompt": PROMPT,
        "baseline_bytes": baseline,
        "peak_growth_bytes": peak_rss_bytes() - baseline,
        "seconds": seconds,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
