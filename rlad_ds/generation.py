"""The one generation and evaluation path: prompts -> rollout engine -> texts -> verifier -> Mean@k / Pass@k.

Training rollouts, training-time evaluation (`Trainer.evaluate`) and `launchers/eval.py` all call these
functions over a rollout engine of `rlad_ds.rollout`, with the sampling knobs of one config tree, so the
same model and prompts give the same greedy accuracy everywhere.

- `generate`: prompts in batches of `rollout_batch_size` (each batch left-padded on its own, so a prompt's
  padding never depends on its neighbours), inside one rollout session (the model gathered once).
- `evaluate_examples`: problems sharded over ranks (strided), each rank's shard padded with throw-away
  problems when its engine runs collectives inside generate calls; each generate call seeded from its first
  problem's index (so with `rollout_batch_size 1` sampled outputs do not depend on the number of ranks),
  inside a forked RNG so that evaluating never changes the training's random stream; scores gathered to
  every rank and reduced by the pure `rlad_ds.evaluation`.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

from rlad_ds import launch
from rlad_ds.evaluation import merge_shards, results_from_scores, sample_seed, shard_indices
from rlad_ds.rollout import RolloutOutput, concat_rollouts


def training_sampling(rollout_cfg) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=rollout_cfg.max_new_tokens, temperature=rollout_cfg.temperature,
                          top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
                          n_samples_per_prompt=rollout_cfg.group_size)


def eval_sampling(cfg) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.eval.eval_temperature,
                          top_p=cfg.eval.eval_top_p, top_k=cfg.eval.eval_top_k,
                          n_samples_per_prompt=cfg.eval.eval_samples)


def generate(rollout, tokenizer, prompts: Sequence[str], sampling: SamplingConfig, device, *, batch_size: int = 0,
             seeds: Sequence[int] | None = None) -> RolloutOutput | None:
    """Rollouts of `prompts` (n_samples_per_prompt rows each, prompt-major); None for no prompts.

    `seeds[i]`, if given, seeds torch before the generate call whose first prompt is i. Every rank enters
    the rollout session even with no prompts: making the model whole is itself a collective.
    """
    size = batch_size or max(len(prompts), 1)
    outputs = []
    tokenizer.padding_side = "left"
    with rollout.session():
        for start in range(0, len(prompts), size):
            enc = tokenizer(list(prompts[start:start + size]), return_tensors="pt", padding=True,
                            add_special_tokens=False)
            if seeds is not None:
                torch.manual_seed(seeds[start])
            request = RolloutRequest(prompt_ids=enc["input_ids"].to(device),
                                     prompt_attention_mask=enc["attention_mask"].to(device))
            outputs.append(rollout.generate(request, sampling))
    return concat_rollouts(outputs, tokenizer.pad_token_id) if outputs else None


def decode_responses(tokenizer, output: RolloutOutput) -> list[str]:
    return [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            for ids, mask in zip(output.input_ids, output.response_mask)]


def forked_rng():
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def evaluate_examples(rollout, tokenizer, task, records: Sequence[dict], cfg, rewards, device, *,
                      keep_completions: bool = False) -> dict:
    """Mean@k / Pass@k of the rollout engine's model on `records` (dicts with "prompt_text"), every rank.

    Returns `rlad_ds.evaluation.results_from_scores`'s dict plus "generated_tokens", "generate_seconds"
    (slowest rank) and, with `keep_completions`, each problem's completions.
    """
    rank, world = launch.world()
    n = cfg.eval.eval_samples
    own, per_rank = shard_indices(len(records), rank, world)
    # Throw-away problems keep the generate calls of every rank in step where the engine needs it.
    indices = own + [own[0] if own else 0] * (per_rank - len(own) if rollout.collective_calls else 0)
    prompts = [records[i]["prompt_text"] for i in indices] if records else []
    start = time.perf_counter()
    with forked_rng():
        output = generate(rollout, tokenizer, prompts, eval_sampling(cfg), device,
                          batch_size=cfg.rollout.rollout_batch_size,
                          seeds=[sample_seed(cfg.train.seed, i) for i in indices])
    seconds = time.perf_counter() - start
    texts = decode_responses(tokenizer, output)[:len(own) * n] if output is not None else []
    tokens = int(output.response_mask[:len(own) * n].sum()) if output is not None else 0
    scored = rewards.run(texts, [records[i] for i in own for _ in range(n)])
    groups = [(i, (scored.scores[j * n:(j + 1) * n], texts[j * n:(j + 1) * n] if keep_completions else None))
              for j, i in enumerate(own)]
    gathered = [None] * world
    part = {"items": groups, "errors": scored.errors, "timeouts": scored.timeouts, "tokens": tokens,
            "seconds": seconds, "messages": scored.messages[:3]}
    if world > 1:
        dist.all_gather_object(gathered, part)
    else:
        gathered = [part]
    merged = merge_shards([g["items"] for g in gathered], len(records))
    results = results_from_scores(task, list(records), [m[0] for m in merged], n, cfg.eval.eval_k,
                                  sum(g["errors"] for g in gathered), sum(g["timeouts"] for g in gathered))
    if keep_completions:
        for problem, (_, completions) in zip(results["problems"], merged):
            problem["completions"] = completions
    results.update(generated_tokens=sum(g["tokens"] for g in gathered),
                   generate_seconds=max(g["seconds"] for g in gathered),
                   score_messages=[m for g in gathered for m in g["messages"]][:3])
    return results
