"""What ZeRO-3 and the isolated verifiers add to a step of the demo's size, beside the same work done plainly,
measured side by side in one process, rounds interleaved.

    python -m benchmarks.zero_overhead [--rounds 7] [--json FILE]

One thread, one rank (no launcher: `rlad_ds.distributed.single_process_env`). The demo's shipped SFT student
(`rlad_ds.demo.cache.shipped_build`, a 76k-parameter Qwen3) twice: as a ZeRO-3 engine under the trainer's
ds_configs/zero3.json and as a plain module. Each round times, in this order:

  generate     16 demo prompts x 8 samples, at most 48 tokens (the demo's GRPO rollout): rlad_ds's
               `GatheredRollout` on the engine (its whole session: gather, hooks off, decode, hooks back) against
               `ModuleRollout` on the plain module; the same seed before each, so both sample the same tokens
               (checked)
  train step   forward + backward + optimizer step on those 128 rows (labels = the rows; learning rate 0, so
               the weights stay equal): the engine against the plain module with gradient clipping and torch's
               AdamW, as the engine's config has them
  rewards      the 128 responses scored by `RewardRunner` (the demo's task, 2 processes): with its pipelining
               (`RewardRunner.pipeline_depth` calls per process at once) against one call at a time

The table gives the median milliseconds of each side over the rounds after the first (warm-up) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.common import Stopwatch

PROMPTS, SAMPLES, MAX_NEW_TOKENS = 16, 8, 48


def _timed(fn, *args) -> tuple[float, object]:
    """Milliseconds of `fn(*args)`, and its value."""
    with Stopwatch() as watch:
        value = fn(*args)
    return watch.seconds * 1000.0, value


def engine_step(engine, rows) -> None:
    engine.backward(engine(input_ids=rows, labels=rows).loss)
    engine.step()


def plain_step(model, optimizer, rows) -> None:
    import torch

    model(input_ids=rows, labels=rows).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def build(student: Path):
    """The demo student as a one-rank ZeRO-3 engine and as a plain module with torch's AdamW, same weights."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from rlad_ds.distributed import init_process_group, single_process_env
    from rlad_ds.ds_config import CONFIG_DIR, fill_train_config

    single_process_env()
    init_process_group(600)
    plain = AutoModelForCausalLM.from_pretrained(student, attn_implementation="sdpa")
    zero = AutoModelForCausalLM.from_pretrained(student, attn_implementation="sdpa")
    config = fill_train_config(
        CONFIG_DIR / "zero3.json",
        world_size=1,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        lr=0.0,  # the weights stay the same, so both sides keep sampling the same tokens
        gradient_clipping=1.0,
        device="cpu",
    )
    engine, *_ = deepspeed.initialize(model=zero, model_parameters=zero.parameters(), config=config)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=0.0)
    return engine, plain, optimizer


def demo_rollout_request(tokenizer):
    """The demo's first 16 training problems and their left-padded prompts, as a rollout request."""
    from deepspeed.runtime.rollout import RolloutRequest

    from rlad_ds.tasks import arith

    examples = arith.generate("train", PROMPTS, seed=0)
    enc = tokenizer([arith.prompt(e) for e in examples], return_tensors="pt", padding=True, padding_side="left")
    return examples, RolloutRequest(prompt_ids=enc["input_ids"], prompt_attention_mask=enc["attention_mask"])


def time_round(round_: int, rollouts: dict, request, sampling, train: dict, score, times: dict):
    """One round of the three pairs into `times`; the ZeRO-3 side's rollout."""
    import torch

    outputs = {}
    for side, rollout in rollouts.items():
        torch.manual_seed(round_)
        ms, outputs[side] = _timed(rollout.generate, request, sampling)
        times[f"generate {side}"].append(ms)
    if not torch.equal(outputs["zero3"].input_ids, outputs["plain"].input_ids):
        raise RuntimeError("the ZeRO-3 and the plain student sampled different tokens from the same seed")
    for side, step in train.items():
        times[f"step {side}"].append(_timed(step, outputs["zero3"].input_ids)[0])
    for side, ms in score(outputs["zero3"]).items():
        times[f"rewards {side}"].append(ms)
    return outputs["zero3"]


def measure(rounds: int) -> dict:
    import functools

    import torch
    from deepspeed.runtime.rollout import SamplingConfig

    from rlad_ds import rewards
    from rlad_ds.demo.cache import shipped_build
    from rlad_ds.demo.recipe import demo_tokenizer
    from rlad_ds.generation import decode_responses
    from rlad_ds.rollout.hf import GatheredRollout, ModuleRollout

    torch.set_num_threads(1)
    build_dir = shipped_build()
    if build_dir is None:
        raise SystemExit("the demo's shipped models are missing from rlad_ds/demo/models; reinstall rlad_ds")
    engine, plain, optimizer = build(build_dir / "student")
    tokenizer = demo_tokenizer()
    examples, request = demo_rollout_request(tokenizer)
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, n_samples_per_prompt=SAMPLES)
    rollouts = {"zero3": GatheredRollout(engine, tokenizer), "plain": ModuleRollout(plain, tokenizer)}
    train = {"zero3": functools.partial(engine_step, engine), "plain": functools.partial(plain_step, plain, optimizer)}
    per_row = [e for e in examples for _ in range(SAMPLES)]
    times = {f"{kind} {side}": [] for kind in ("generate", "step") for side in ("zero3", "plain")}
    times.update({"rewards pipelined": [], "rewards single": []})
    with rewards.RewardRunner("arith", timeout_s=10.0, workers=2) as runner:
        depth = runner.pipeline_depth

        def score(output) -> dict:
            texts, seconds = decode_responses(tokenizer, output), {}
            for side, calls in (("pipelined", depth), ("single", 1)):
                runner.pipeline_depth = calls
                seconds[side] = _timed(runner.run, texts, per_row)[0]
            runner.pipeline_depth = depth
            return seconds

        for round_ in range(rounds):
            last = time_round(round_, rollouts, request, sampling, train, score, times)
    return summary(times, rounds, depth, int(last.response_lengths.sum()))


def summary(times: dict, rounds: int, depth: int, tokens: int) -> dict:
    """The three pairs' medians over the rounds after the first, and every round's times."""
    medians = {key: statistics.median(values[1:]) for key, values in times.items()}
    rows = [
        ("generate 16 x 8 (gathered ZeRO-3 / plain module)", "generate zero3", "generate plain"),
        ("forward + backward + step (ZeRO-3 / plain)", "step zero3", "step plain"),
        (f"128 rewards (pipelined x{depth} / one at a time)", "rewards pipelined", "rewards single"),
    ]
    return {
        "rounds": rounds,
        "pipeline_depth": depth,
        "tokens_per_rollout": tokens,
        "rows": [(name, medians[first], medians[second]) for name, first, second in rows],
        "times_ms": times,
    }


def format_table(result: dict) -> str:
    lines = ["| measurement | first (ms) | second (ms) | ratio |", "|---|---|---|---|"]
    for name, first, second in result["rows"]:
        lines.append(f"| {name} | {first:.1f} | {second:.1f} | {first / second:.2f} |")
    lines.append(
        f"\nmedians over rounds 2..{result['rounds']}; {result['tokens_per_rollout']} sampled tokens per rollout"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of every measurement (the first is warm-up)")
    parser.add_argument("--json", help="also write the table's numbers and every round's times here")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is a warm-up)")
    result = measure(args.rounds)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
