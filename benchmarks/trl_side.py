"""The TRL side of `benchmarks.trl_compare`: TRL's GRPOTrainer on the rlad_ds run's own recipe, prompts and
verifier, one optimizer step timed at a time. Runs in the TRL venv's python (never in the project's environment):

    /tmp/trlvenv/bin/python -m benchmarks.trl_side --steps N --out FILE

`benchmarks/trl_compare.py` says what is compared and how the venv is set up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

# The recipe both sides run: the demo profile (no --student) with rlad_ds's GRPO and no evaluation.
RECIPE_FLAGS = ["--method", "grpo", "--eval_size", "0"]
# rlad_ds's loss aggregations as TRL loss types (the same normalisation of the per-token losses).
LOSS_TYPES = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "seq-mean-token-sum-norm": "dr_grpo"}


def median_after_warmup(values: list[float]) -> float:
    """The median of `values` without the first (warm-up); of all of them when there is only one."""
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else float("nan")


def recipe_config(steps: int):
    """The config tree of the rlad_ds run: the same flags under the demo's profile."""
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.demo import recipe

    cfg, _ = parse_config([*RECIPE_FLAGS, "--max_steps", str(steps)], profile=recipe.PROFILE)
    return cfg


def step_prompts(cfg, tokenizer, steps: int) -> list[dict]:
    """The records (with "prompt_text") of rlad_ds's steps 0..steps-1 on one rank, in its order."""
    from torch.utils.data import DistributedSampler

    from rlad_ds.data import load_train_examples

    examples = load_train_examples(cfg.data, tokenizer, seed=cfg.train.seed)
    per_step = cfg.train.prompts_per_step
    sampler = DistributedSampler(
        range(len(examples)), num_replicas=1, rank=0, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    sampler.set_epoch(0)  # Trainer.prompts_for_step: epoch step // steps_per_epoch, 0 for these few steps
    order = list(sampler)
    if steps * per_step > len(order):
        raise ValueError(f"{steps} steps need {steps * per_step} prompts; the epoch has {len(order)}")
    return [examples[i] for i in order[: steps * per_step]]


def make_reward(task: str, task_args):
    """A TRL reward function that scores each completion with the task's own verifier, in-process."""
    from rlad_ds.rewards import score

    def arith_reward(prompts, completions, record, **_):
        return [score(task, completion, json.loads(raw), task_args) for completion, raw in zip(completions, record)]

    return arith_reward


def trl_config(cfg, steps: int, output_dir: str):
    """GRPOConfig with every setting taken from the rlad_ds config tree (see the module docstring)."""
    from trl import GRPOConfig

    rollout, loss, train = cfg.rollout, cfg.loss, cfg.train
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=train.seed,
        max_steps=steps,
        per_device_train_batch_size=rollout.group_size * train.prompts_per_step,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=rollout.group_size,
        shuffle_dataset=False,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=max(rollout.top_k, 0),
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=train.grad_clip,
        beta=loss.beta_ref,
        num_iterations=train.ppo_epochs,
        epsilon=loss.clip_low,
        epsilon_high=loss.clip_high,
        loss_type=LOSS_TYPES[loss.loss_agg],
        scale_rewards="group" if loss.scale_adv_by_std else "none",
        use_vllm=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        log_completions=False,
        disable_tqdm=True,
    )


def check_semantics(args, cfg) -> None:
    """One TRL step = one optimizer step over prompts_per_step x G completions, generated at once."""
    rows = cfg.rollout.group_size * cfg.train.prompts_per_step
    got = (args.generation_batch_size, args.steps_per_generation, args.gradient_accumulation_steps, args.num_iterations)
    if got != (rows, 1, 1, 1):
        raise SystemExit(
            f"TRL resolved (generation_batch_size, steps_per_generation, gradient_accumulation_steps, "
            f"num_iterations) = {got}, expected ({rows}, 1, 1, 1)"
        )


class StepClock:
    """A TrainerCallback (built lazily: transformers lives in the TRL venv) timing each optimizer step, and the
    generate calls inside it through a wrapper around the trainer's `_generate_single_turn`."""

    @staticmethod
    def attach(trainer) -> list[dict]:
        import torch
        from transformers import TrainerCallback

        steps, current = [], {}
        inner = trainer._generate_single_turn

        def timed_generate(prompt_ids, *args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(prompt_ids, *args, **kwargs)
            finally:
                current["generate_s"] = current.get("generate_s", 0.0) + time.perf_counter() - start
                current["generate_calls"] = current.get("generate_calls", 0) + 1
                current["rows"] = current.get("rows", 0) + len(prompt_ids)

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                current.clear()
                current.update(threads=torch.get_num_threads(), start=time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                record = dict(current, step_s=time.perf_counter() - current.pop("start"))
                steps.append({k: v for k, v in record.items() if k != "start"})

        trainer._generate_single_turn = timed_generate
        trainer.add_callback(Clock())
        return steps


# The resolved GRPOConfig values the worker records beside its times.
RECORDED_SETTINGS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "generation_batch_size",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "learning_rate",
    "beta",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "loss_type",
    "scale_rewards",
    "max_grad_norm",
    "optim",
    "lr_scheduler_type",
    "bf16",
    "gradient_checkpointing",
    "use_vllm",
)


def trl_worker(steps: int, out: Path) -> None:
    """Train `steps` TRL GRPO steps on the demo and write the per-step times and settings to `out`."""
    import torch

    torch.set_num_threads(1)
    import trl

    cfg = recipe_config(steps)
    with tempfile.TemporaryDirectory(prefix="trl_compare_") as tmp:
        args = trl_config(cfg, steps, tmp)
        check_semantics(args, cfg)
        trainer = _trainer(cfg, args, steps)
        torch.set_num_threads(1)
        times = StepClock.attach(trainer)
        trainer.train()
    rows = cfg.rollout.group_size * cfg.train.prompts_per_step
    bad = [t for t in times if t.get("generate_calls") != 1 or t.get("rows") != rows]
    if len(times) != steps or bad:
        raise SystemExit(f"expected {steps} steps of one generate call of {rows} rows each, got {times}")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    # enums (optim, scheduler) as text
    settings = {k: getattr(getattr(args, k), "value", getattr(args, k)) for k in RECORDED_SETTINGS}
    record = {
        "trl": trl.__version__,
        "torch": torch.__version__,
        "steps": times,
        "rewards": rewards,
        "settings": settings,
    }
    out.write_text(json.dumps(record, indent=1))


def _trainer(cfg, args, steps: int):
    """TRL's GRPOTrainer on the demo student, its tokenizer, rlad_ds's prompts in rlad_ds's order and the verifier."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from rlad_ds.demo.cache import cache_dir, prepare_demo

    student = prepare_demo(cache_dir(), seed=0, progress=False)["student"]
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, attn_implementation="sdpa")
    rows = [
        {"prompt": r["prompt_text"], "record": json.dumps({k: v for k, v in r.items() if k != "prompt_text"})}
        for r in step_prompts(cfg, tokenizer, steps)
    ]
    return GRPOTrainer(
        model=model,
        reward_funcs=make_reward(cfg.data.task, cfg.data.task_args),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    trl_worker(arguments.steps, Path(arguments.out))
