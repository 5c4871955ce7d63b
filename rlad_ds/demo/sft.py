"""Supervised fine-tuning of the demo's models on generated worked solutions (plain PyTorch, one process, no
DeepSpeed), and their accuracy through the one generation path (`rlad_ds.generation`)."""

from __future__ import annotations

import math
from pathlib import Path

from rlad_ds.demo.recipe import MAX_NEW_TOKENS, SFTSpec, render_prompt
from rlad_ds.tasks import arith


def sft_batch(tokenizer, examples: list[dict], solution=arith.solution):
    """Right-padded (input_ids, attention_mask, labels) with the loss on `solution(example)` and EOS only."""
    import torch

    rows, prompt_lengths = [], []
    for example in examples:
        prompt_ids = tokenizer.encode(render_prompt(tokenizer, arith.prompt(example)), add_special_tokens=False)
        target_ids = tokenizer.encode(solution(example), add_special_tokens=False)
        rows.append(prompt_ids + target_ids + [tokenizer.eos_token_id])
        prompt_lengths.append(len(prompt_ids))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, n_prompt) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, n_prompt : len(row)] = input_ids[i, n_prompt : len(row)]
    return input_ids, attention_mask, labels


def train_sft(
    model,
    tokenizer,
    spec: SFTSpec,
    seed: int,
    progress: bool = True,
    desc: str = "sft",
    stop=None,
    check_every: int = 25,
    solution=arith.solution,
) -> list[float]:
    """SFT `model` in place on fresh train-split examples; returns the per-step losses.

    `stop(model)`, if given, is called every `check_every` steps (model in eval mode); True ends training.
    `solution(example)` renders the targets (the study trains a deliberately wrong teacher with it).
    """
    import torch
    from tqdm.auto import tqdm

    examples = arith.generate("train", spec.steps * spec.batch_size, seed)
    optimizer, scheduler = _optimizer(model, spec)
    model.train()
    losses = []
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = examples[step * spec.batch_size : (step + 1) * spec.batch_size]
        input_ids, attention_mask, labels = sft_batch(tokenizer, batch, solution)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == spec.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if stop is not None and (step + 1) % check_every == 0 and step + 1 < spec.steps:
            model.eval()
            done = stop(model)
            model.train()
            if done:
                break
    bar.close()
    model.eval()
    return losses


def _optimizer(model, spec: SFTSpec):
    """AdamW (no weight decay on norms and biases) with a linear warm-up, then a cosine decay to `min_lr_ratio`."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step):
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def accuracy(
    model,
    tokenizer,
    examples: list[dict],
    greedy: bool = True,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> float:
    """Mean `arith` score of `model` (a model or an HF dir) on `examples`, through `rlad_ds.generation.generate`.

    Greedy decoding, or sampling at `temperature` (no top-k / top-p) seeded by `seed` without touching the
    global RNG. `tokenizer` may be None when `model` is a dir.
    """
    import torch
    from deepspeed.runtime.rollout import SamplingConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlad_ds.generation import decode_responses, generate
    from rlad_ds.rng import forked_rng
    from rlad_ds.rollout.hf import ModuleRollout

    if isinstance(model, (str, Path)):
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model)
    if not examples:
        return 0.0
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=1.0,
        top_k=0,
        n_samples_per_prompt=1,
    )
    prompts = [render_prompt(tokenizer, arith.prompt(example)) for example in examples]
    with torch.no_grad(), forked_rng():
        torch.manual_seed(seed)
        output = generate(
            ModuleRollout(model, tokenizer), tokenizer, prompts, sampling, model.device, batch_size=batch_size
        )
    completions = decode_responses(tokenizer, output)
    return sum(arith.score(c, e) for c, e in zip(completions, examples)) / len(examples)
