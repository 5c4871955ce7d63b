"""P2 worker, one variant per fresh process: peak memory and time of per-token log-probs, forward + backward.

A bare lm-head: hidden states [1, T, H] and a weight [V, H], both requiring grad, targets [1, T].
- chunked: `rlad_ds.logprobs.chunked_token_logprobs` (custom autograd, one [chunk, V] block at a time)
- full:    `torch.log_softmax(h @ W.T, -1).gather(-1, targets)` (the whole [T, V] fp32 logits)
The loss is the sum of the log-probs; backward fills both gradients.

Memory: the process first runs the same variant on 16 tokens (lazy initialisation of kernels and thread
pools), then allocates the inputs and takes the baseline = resident set now (/proc/self/statm); the peak is
ru_maxrss after the first full-size forward + backward. Peak growth = peak - baseline: every byte that
variant holds at its high-water mark beyond its inputs (logits, saved tensors, gradients of h and W).
Run with MALLOC_MMAP_THRESHOLD_ fixed (see benchmarks.common.MEMORY_ENV) so freed blocks leave the RSS.
Time: the median of `repeats` further forward + backward passes (the first, measured one excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import current_rss_bytes, peak_rss_bytes


def step(variant: str, hidden, weight, targets, chunk_size: int) -> None:
    import torch

    from rlad_ds.logprobs import chunked_token_logprobs

    if variant == "chunked":
        logp, _ = chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk_size or None)  # 0: the default
    else:
        logp = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp.sum().backward()


def inputs(tokens: int, hidden_size: int, vocab: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, hidden_size, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) * hidden_size**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens), generator=generator)
    return hidden, weight, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=("chunked", "full"), required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk_size", type=int, default=0, help="0: the trainer's default (automatic)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    torch.set_grad_enabled(True)
    step(args.variant, *inputs(16, args.hidden, 64), chunk_size=args.chunk_size)
    hidden, weight, targets = inputs(args.tokens, args.hidden, args.vocab)
    baseline = current_rss_bytes()
    start = time.perf_counter()
    step(args.variant, hidden, weight, targets, args.chunk_size)
    first = time.perf_counter() - start
    peak_growth = peak_rss_bytes() - baseline
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        step(args.variant, hidden, weight, targets, args.chunk_size)
        times.append(time.perf_counter() - start)
    result = {
        "variant": args.variant,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        "baseline_bytes": baseline,
        "peak_growth_bytes": peak_growth,
        "first_seconds": first,
        "seconds": times,
        "median_seconds": statistics.median(times) if times else first,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
