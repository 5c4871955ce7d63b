"""P1 worker, run by the deepspeed launcher on N ranks: gathered rollout vs ZeRO-3 per-layer generation.

Both engines are rlad_ds's own (`build_rollout("gathered" | "per_layer", ...)`) around one ZeRO-3 student
engine; per-layer is DeepSpeed's fallback (`engine.module.generate` with ZeRO-3's hooks on, synced ranks).
Greedy decoding, so both must produce identical tokens; every rank has its own prompts. Each repeat is timed
between barriers; tokens/s = generated tokens of all ranks / wall time of the slowest rank.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def time_rollout(rollout, request, sampling, warmup, repeats: int) -> tuple[dict, object]:
    """Best of `repeats` timed generate calls (between barriers, after a short warm-up); tokens of all ranks."""
    import torch
    import torch.distributed as dist

    rollout.generate(request, warmup)
    seconds, tokens = [], []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        out = rollout.generate(request, sampling)
        dist.barrier()
        seconds.append(time.perf_counter() - start)
        count = torch.tensor([float(out.response_lengths.sum())])
        dist.all_reduce(count)
        tokens.append(float(count))
    best = min(range(repeats), key=lambda i: seconds[i])
    return {"seconds": seconds, "tokens": tokens[best], "tokens_per_s": tokens[best] / seconds[best]}, out.input_ids


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per rank")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--persistence_threshold", type=int, default=0, help="0: every parameter is partitioned")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    from rlad_ds.ds_config import CONFIG_DIR, fill_train_config
    from rlad_ds.models import load_causal_lm, load_tokenizer
    from rlad_ds.rollout import build_rollout

    from rlad_ds.launch import init_process_group  # removes this process's /dev/shm buffer at exit
    init_process_group(1800)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = fill_train_config(CONFIG_DIR / "zero3.json", world_size=world, micro_batch_size=1,
                               gradient_accumulation_steps=1, lr=1e-5, gradient_clipping=1.0, device="cpu",
                               persistence_threshold=args.persistence_threshold)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=config)
    partitioned = all(getattr(p, "ds_numel", 0) > p.numel() for p in engine.module.parameters()) if world > 1 else True

    # Random prompts of ordinary tokens, different on every rank; greedy, so both engines must agree token for token.
    prompt_ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (args.prompts, args.prompt_len),
                               generator=torch.Generator().manual_seed(1000 + rank))
    request = RolloutRequest(prompt_ids=prompt_ids, prompt_attention_mask=torch.ones_like(prompt_ids))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, n_samples_per_prompt=args.samples)
    warmup = SamplingConfig(max_new_tokens=4, temperature=0.0, n_samples_per_prompt=args.samples)
    results, outputs = {}, {}
    for kind in ("gathered", "per_layer"):
        results[kind], outputs[kind] = time_rollout(build_rollout(kind, engine, tokenizer), request, sampling, warmup,
                                                    args.repeats)
    same = torch.tensor([float(torch.equal(outputs["gathered"], outputs["per_layer"]))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        result = {"world_size": world, "partitioned": partitioned, "identical_tokens": bool(same.item() == 1.0),
                  "threads": torch.get_num_threads(), **results,
                  "speedup": results["gathered"]["tokens_per_s"] / results["per_layer"]["tokens_per_s"]}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
