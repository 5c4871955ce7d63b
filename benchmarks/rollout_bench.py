"""P1 worker, run by the deepspeed launcher on N ranks: vLLM vs gathered rollout vs ZeRO-3 per-layer generation.

Every rollout is rlad_ds's own around one ZeRO-3 student engine: `rlad_ds.rollout.hf`'s gathered and per-layer
(per-layer is DeepSpeed's fallback: `engine.module.generate` with ZeRO-3's hooks on, synced ranks) and, when vLLM
is installed and supports the model, `VLLMRollout` (a colocated vLLM engine per rank, weights synced from the
ZeRO-3 partitions). Greedy decoding; every rank has its own prompts. Each repeat is timed between barriers;
tokens/s = generated tokens of all ranks / wall time of the slowest rank. vLLM's weight sync is timed apart.
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


def time_vllm(engine, tokenizer, args, request, sampling, warmup, results: dict, outputs: dict) -> str | None:
    """Time the vLLM engine into `results` / `outputs` (with its weight-sync seconds); or say why it cannot run."""
    import torch.distributed as dist

    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.rollout.vllm import VLLMRollout
    from rlad_ds.rollout.vllm_engine import vllm_unavailable_reason

    reason = vllm_unavailable_reason(engine.module.config, "cpu")
    if reason is not None:
        return reason
    start = time.perf_counter()
    rollout = VLLMRollout(engine, tokenizer, args.model, RolloutConfig(vllm_kv_cache_gb=args.vllm_kv_cache_gb))
    startup = time.perf_counter() - start
    rollout.sync_weights()  # untimed: the first load of the student's weights also warms vLLM's loader up
    syncs = []
    for _ in range(args.repeats):  # a sync moves every weight whether or not it changed: time it on its own
        rollout.synced_step = None
        dist.barrier()
        rollout.sync_weights()
        syncs.append(rollout.sync_seconds)
    timing, outputs["vllm"] = time_rollout(rollout, request, sampling, warmup, args.repeats)
    results["vllm"] = {**timing, "startup_seconds": startup, "sync_seconds": min(syncs)}
    return None


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per rank")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--engines",
        default="gathered,per_layer",
        help="comma-separated: gathered (always, the reference), per_layer, vllm",
    )
    parser.add_argument("--vllm_kv_cache_gb", type=float, default=1.0)
    parser.add_argument("--persistence_threshold", type=int, default=0, help="0: every parameter is partitioned")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser.parse_args()


def student_engine(args, world: int):
    import deepspeed

    from rlad_ds.ds_config import CONFIG_DIR, fill_train_config
    from rlad_ds.models import load_causal_lm

    config = fill_train_config(
        CONFIG_DIR / "zero3.json",
        world_size=world,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        lr=1e-5,
        gradient_clipping=1.0,
        device="cpu",
        persistence_threshold=args.persistence_threshold,
    )
    model = load_causal_lm(args.model, config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=config)
    return engine


def time_rollouts(args, engine, tokenizer, rank: int) -> tuple[dict, dict, str | None]:
    """Every asked-for rollout on the same per-rank prompts: (timings, output ids, why vLLM was skipped or None)."""
    import torch
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    from rlad_ds.rollout.registry import KINDS

    # Random prompts of ordinary tokens, different on every rank; greedy, so the rollouts must agree token for token.
    shape, generator = (args.prompts, args.prompt_len), torch.Generator().manual_seed(1000 + rank)
    prompt_ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), shape, generator=generator)
    request = RolloutRequest(prompt_ids=prompt_ids, prompt_attention_mask=torch.ones_like(prompt_ids))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, n_samples_per_prompt=args.samples)
    warmup = SamplingConfig(max_new_tokens=4, temperature=0.0, n_samples_per_prompt=args.samples)
    kinds = args.engines.split(",")
    results, outputs = {}, {}
    for kind in (k for k in kinds if k != "vllm"):
        rollout = KINDS[kind].load()(engine, tokenizer)
        results[kind], outputs[kind] = time_rollout(rollout, request, sampling, warmup, args.repeats)
    skipped = None
    if "vllm" in kinds:
        skipped = time_vllm(engine, tokenizer, args, request, sampling, warmup, results, outputs)
    return results, outputs, skipped


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from rlad_ds.distributed import init_process_group  # removes this process's /dev/shm buffer at exit
    from rlad_ds.models import load_tokenizer

    init_process_group(1800)
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer, engine = load_tokenizer(args.model), student_engine(args, world)
    partitioned = all(getattr(p, "ds_numel", 0) > p.numel() for p in engine.module.parameters()) if world > 1 else True
    results, outputs, skipped = time_rollouts(args, engine, tokenizer, rank)
    same = {name: torch.tensor([float(torch.equal(outputs["gathered"], ids))]) for name, ids in outputs.items()}
    for flag in same.values():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        identical = {name: bool(flag == 1.0) for name, flag in same.items() if name != "gathered"}
        result = {
            "world_size": world,
            "partitioned": partitioned,
            "threads": torch.get_num_threads(),
            **results,
            "identical_to_gathered": identical,
            "rows_per_rank": args.prompts * args.samples,
            "max_new_tokens": args.max_new_tokens,
        }
        if skipped is not None:
            result["vllm_skipped"] = skipped
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
