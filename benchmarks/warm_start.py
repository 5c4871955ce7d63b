"""A tiny student warm-started on a task's reference answers, so that RL on it has rewards to work with.

A randomly initialised model never writes an `<answer>` block, so every reward is 0 and a run shows nothing.
This fine-tunes a tiny character-level Qwen3 (`rlad_ds.tiny`) on the task's own generated train-split
prompts, with each prompt rendered by the model's chat template exactly as training renders it, followed
by the task's reference completion (`Task.reference`). It then writes an HF model dir and prints the
sampled (temperature 1) mean score on held-out prompts.

    python -m benchmarks.warm_start --task rg:knights_knaves --steps 300 --output /tmp/kk_tiny
    deepspeed --num_gpus 2 launchers/train.py --deepspeed ds_configs/zero3.json --student /tmp/kk_tiny \\
        --teacher /tmp/kk_tiny --task rg:knights_knaves --max_new_tokens 96 ...
"""

from __future__ import annotations

import argparse
import math
import time

from rlad_ds.tasks import get_task
from rlad_ds.tiny import char_tokenizer, tiny_config


def rows(tokenizer, task, records: list[dict]):
    """Right-padded (input_ids, attention_mask, labels); the loss is on the reference completion + EOS."""
    import torch

    pairs = []
    for record in records:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": task.prompt(record)}], tokenize=False, add_generation_prompt=True
        )
        pairs.append(
            (
                tokenizer.encode(prompt, add_special_tokens=False),
                tokenizer.encode(task.reference(record), add_special_tokens=False) + [tokenizer.eos_token_id],
            )
        )
    width = max(len(p) + len(t) for p, t in pairs)
    input_ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels, attention_mask = torch.full_like(input_ids, -100), torch.zeros_like(input_ids)
    for i, (prompt, target) in enumerate(pairs):
        end = len(prompt) + len(target)
        input_ids[i, :end] = torch.tensor(prompt + target)
        attention_mask[i, :end] = 1
        labels[i, len(prompt) : end] = torch.tensor(target)
    return input_ids, attention_mask, labels


def sampled_score(model, tokenizer, task, records: list[dict], max_new_tokens: int) -> float:
    import torch

    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": task.prompt(r)}], tokenize=False, add_generation_prompt=True
        )
        for r in records
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(task.score(c, r) for c, r in zip(completions, records)) / len(records)


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="a task that generates prompts and has a reference")
    parser.add_argument("--task_args", default=None)
    parser.add_argument("--output", required=True, help="HF model dir to write")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=96, help="for the held-out check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    task = get_task(args.task, args.task_args)
    if task.generate is None or task.reference is None:
        parser.error(f"task {args.task!r} needs a generator and a reference completion")
    torch.manual_seed(args.seed)
    tokenizer = char_tokenizer()
    config = tiny_config("qwen3", len(tokenizer), hidden=args.hidden, layers=args.layers, max_positions=2048)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
    )
    train = task.generate("train", args.steps * args.batch_size, args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = train[step * args.batch_size : (step + 1) * args.batch_size]
        input_ids, attention_mask, labels = rows(tokenizer, task, batch)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    score = sampled_score(model, tokenizer, task, task.generate("test", 64, args.seed), args.max_new_tokens)
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    print(f"held-out mean score (64 prompts, temperature 1): {score:.3f}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
