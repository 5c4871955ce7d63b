"""The one generation and evaluation path: prompts -> rollout engine -> texts -> verifier -> Mean@k / Pass@k.

Training rollouts, training-time evaluation (`Trainer.evaluate`), `launchers/eval.py` and the demo's SFT all
call these functions over a rollout of `rlad_ds.rollout`, with the sampling knobs of one config tree, so the
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
from collections.abc import Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

from rlad_ds.distributed import world
from rlad_ds.evaluation import merge_shards, results_from_scores, sample_seed, shard_indices
from rlad_ds.rng import forked_rng
from rlad_ds.rollout.output import RolloutOutput, concat_rollouts


def training_sampling(rollout_cfg) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=rollout_cfg.max_new_tokens,
        temperature=rollout_cfg.temperature,
        top_p=rollout_cfg.top_p,
        top_k=rollout_cfg.top_k,
        n_samples_per_prompt=rollout_cfg.group_size,
    )


def eval_sampling(cfg) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.eval.eval_temperature,
        top_p=cfg.eval.eval_top_p,
        top_k=cfg.eval.eval_top_k,
        n_samples_per_prompt=cfg.eval.eval_samples,
    )


def generate(
    rollout,
    tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    device,
    *,
    batch_size: int = 0,
    seeds: Sequence[int] | None = None,
) -> RolloutOutput | None:
    """Rollouts of `prompts` (n_samples_per_prompt rows each, prompt-major); None for no prompts.

    `seeds[i]`, if given, seeds torch before the generate call whose first prompt is i. Every rank enters
    the rollout session even with no prompts: making the model whole is itself a collective.
    """
    size = batch_size or max(len(prompts), 1)
    outputs = []
    with rollout.session():
        for start in range(0, len(prompts), size):
            enc = _left_padded(tokenizer, list(prompts[start : start + size]))
            if seeds is not None:
                torch.manual_seed(seeds[start])
            request = RolloutRequest(
                prompt_ids=enc["input_ids"].to(device), prompt_attention_mask=enc["attention_mask"].to(device)
            )
            outputs.append(rollout.generate(request, sampling))
    return concat_rollouts(outputs, tokenizer.pad_token_id) if outputs else None


def _left_padded(tokenizer, texts: list[str]):
    """Prompts left-padded, as generation appends after them; the tokenizer's own padding side is left as it was."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def decode_responses(tokenizer, output: RolloutOutput) -> list[str]:
    """Every row's response text (its tokens up to and including the first EOS), from one copy to the host."""
    ids, masks = output.input_ids.tolist(), output.response_mask.tolist()
    rows = [[token for token, keep in zip(row, mask) if keep] for row, mask in zip(ids, masks)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def evaluate_examples(
    rollout, tokenizer, task, records: Sequence[dict], cfg, rewards, device, *, keep_completions: bool = False
) -> dict:
    """Mean@k / Pass@k of the rollout's model on `records` (dicts with "prompt_text"), every rank.

    Returns `rlad_ds.evaluation.results_from_scores`'s dict plus "generated_tokens", "generate_seconds"
    (slowest rank) and, with `keep_completions`, each problem's completions.
    """
    rank, world_size = world()
    part = _evaluate_shard(rollout, tokenizer, records, cfg, rewards, device, rank, world_size, keep_completions)
    gathered = [part]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, part)
    merged = merge_shards([g["items"] for g in gathered], len(records))
    errors, timeouts = sum(g["errors"] for g in gathered), sum(g["timeouts"] for g in gathered)
    results = results_from_scores(
        task, list(records), [m[0] for m in merged], cfg.eval.eval_samples, cfg.eval.eval_k, errors, timeouts
    )
    if keep_completions:
        for problem, (_, completions) in zip(results["problems"], merged):
            problem["completions"] = completions
    results.update(
        generated_tokens=sum(g["tokens"] for g in gathered),
        generate_seconds=max(g["seconds"] for g in gathered),
        score_messages=[m for g in gathered for m in g["messages"]][:3],
    )
    return results


def _evaluate_shard(
    rollout, tokenizer, records, cfg, rewards, device, rank: int, world_size: int, keep_completions: bool
) -> dict:
    """This rank's problems (strided), sampled and scored: {"items": [(index, (scores, completions))], counts}."""
    n = cfg.eval.eval_samples
    own, per_rank = shard_indices(len(records), rank, world_size)
    # Throw-away problems keep the generate calls of every rank in step where the rollout needs it.
    indices = own + [own[0] if own else 0] * (per_rank - len(own) if rollout.collective_calls else 0)
    prompts = [records[i]["prompt_text"] for i in indices] if records else []
    seeds = [sample_seed(cfg.train.seed, i) for i in indices]
    start = time.perf_counter()
    with forked_rng():
        output = generate(
            rollout,
            tokenizer,
            prompts,
            eval_sampling(cfg),
            device,
            batch_size=cfg.rollout.rollout_batch_size,
            seeds=seeds,
        )
    seconds = time.perf_counter() - start
    texts = decode_responses(tokenizer, output)[: len(own) * n] if output is not None else []
    tokens = int(output.response_mask[: len(own) * n].sum()) if output is not None else 0
    scored = rewards.run(texts, [records[i] for i in own for _ in range(n)])
    items = [
        (i, (scored.scores[j * n : (j + 1) * n], texts[j * n : (j + 1) * n] if keep_completions else None))
        for j, i in enumerate(own)
    ]
    return {
        "items": items,
        "errors": scored.errors,
        "timeouts": scored.timeouts,
        "tokens": tokens,
        "seconds": seconds,
        "messages": scored.messages[:3],
    }
