"""The RLAD trainer: one timed step (rollout -> reward -> advantages -> log-probs -> PPO update) and the loop.

    prompts (DistributedSampler shard) -> G rollouts each (student, gathered ZeRO-3) -> task rewards
    -> group advantages -> teacher / reference log-probs of the sampled tokens
    -> ppo_epochs x token-budget micro-batches of the selected loss -> optimizer step

`--method sft` (offline distillation) replaces the student's rollouts with the teacher's, keeps the
correct ones and trains the student on them by likelihood. Everything distributed is collective: every
rank runs the same number of forwards and backwards whatever its own data, so no configuration hangs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rlad_ds import checkpoint
from rlad_ds.advantages import group_advantages
from rlad_ds.config import Config
from rlad_ds.errors import ConfigError
from rlad_ds.losses import grpo_loss, kdrl_loss, masked_mean, sft_loss, trrd_loss

logger = logging.getLogger("rlad_ds")

# Fields that may change between a run and its resumption without making it a different run.
_RESUMABLE_FIELDS = {"max_steps", "resume", "save_steps", "keep_last", "overwrite_output_dir", "eval_steps",
                     "report_to", "collective_timeout_s", "output_dir"}


# Loss metrics computed with the whole batch's normaliser: micro-batch values add up instead of averaging.
_LOSS_PARTS = ("policy_loss", "kd_loss")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the message says why."""


@dataclass
class Batch:
    """One step's rollouts on this rank, everything the loss needs, aligned to next-token targets [B, T-1]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    teacher_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over ranks in one collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class Timer:
    """Wall time of named phases (synchronised on accelerators so that times are real)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
        start = time.perf_counter()
        yield
        get_accelerator().synchronize()
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start


def adapt_alpha(alpha: float, kl_teacher: float, lo: float, hi: float) -> float:
    """Adaptive alpha (the paper's "next step"), a documented rule: trust the teacher as far as it agrees.

    `kl_teacher` is the k3 estimate of KL(student || teacher) on the sampled response tokens (the
    `kl_teacher` metric); agreement = exp(-kl_teacher), in (0, 1]: 1 when the teacher gives the student's
    tokens the student's own probabilities. The target alpha is `hi - (hi - lo) * agreement` (strong
    agreement -> more weight on the teacher, i.e. lower alpha) and alpha moves a tenth of the way there each
    step, so one noisy batch cannot swing it.
    """
    agreement = math.exp(-max(kl_teacher, 0.0))  # k3 is >= 0 per token; max() guards rounding
    target = hi - (hi - lo) * agreement
    return min(hi, max(lo, alpha + 0.1 * (target - alpha)))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world_size = _world()
        self.output_dir = Path(cfg.train.output_dir)
        self.step = 0
        self.alpha = cfg.loss.alpha
        self.bad_steps = 0

    # ---- set-up ------------------------------------------------------------------------------------------------

    def setup(self, student_path: Path, teacher_path: Path, task_name: str, train_examples: list[dict],
              eval_examples: list[dict], student_tokenizer) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.rollout import SamplingConfig

        from rlad_ds.ds_config import fill_train_config, teacher_config
        from rlad_ds.models import choose_attention, load_causal_lm
        from rlad_ds.rewards import RewardRunner
        from rlad_ds.rollout import PerLayerRollout, build_rollout, resolve_rollout_kind
        from rlad_ds.teacher import Teacher

        cfg = self.cfg
        self.device_type = get_accelerator().device_name()
        self.tokenizer = student_tokenizer
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.rewards = RewardRunner(task_name, timeout_s=cfg.data.reward_timeout_s)
        attn = choose_attention(self.device_type,
                                None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation)
        # Each rank's micro-batch count varies with response lengths (token budget); DeepSpeed only needs a
        # nominal micro-batch size, and the trainer marks the accumulation boundary itself.
        student_ds = fill_train_config(cfg.deepspeed, world_size=self.world_size, micro_batch_size=1,
                                       gradient_accumulation_steps=1, lr=cfg.train.lr,
                                       gradient_clipping=cfg.train.grad_clip, device=self.device_type,
                                       persistence_threshold=_env_int("RLAD_PERSISTENCE_THRESHOLD"))
        model = load_causal_lm(student_path, student_ds, attn_implementation=attn,
                               gradient_checkpointing=cfg.model.gradient_checkpointing,
                               trust_remote_code=cfg.model.trust_remote_code)
        kind = resolve_rollout_kind(cfg.rollout.engine, model, self.device_type)
        if kind == "hybrid_engine":
            student_ds["hybrid_engine"] = {"enabled": True}
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=student_ds)
        self.rollout = build_rollout(kind, self.engine, student_tokenizer,
                                     int(cfg.rollout.gather_budget_gb * 2**30))
        self.sampling = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens,
                                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       top_k=cfg.rollout.top_k, n_samples_per_prompt=cfg.rollout.group_size)
        frozen = teacher_config(offload=cfg.model.teacher_offload, world_size=self.world_size, micro_batch_size=1,
                                device=self.device_type,
                                persistence_threshold=_env_int("RLAD_PERSISTENCE_THRESHOLD"))
        # Padding-free packing needs attention that honours per-sequence position ids: flash-attention's
        # varlen kernels on GPU (transformers' sdpa/eager masks also do, which is how CPU tests cover it).
        self.packed = cfg.model.pack_sequences == "on" or (cfg.model.pack_sequences == "auto"
                                                           and attn == "flash_attention_2")
        score_options = dict(chunk_size=cfg.model.logprob_chunk_size or None, packed=self.packed,
                             max_tokens_per_microbatch=cfg.train.micro_batch_tokens)
        self.teacher = None
        if cfg.loss.method != "grpo":  # GRPO never reads the teacher: it does not pay for it either
            self.teacher = Teacher.load(teacher_path, frozen, student_tokenizer=student_tokenizer,
                                        attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code,
                                        **score_options)
        self.reference = None
        if cfg.model.use_reference:
            self.reference = Teacher.load(student_path, frozen, student_tokenizer=student_tokenizer,
                                          attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code,
                                          **score_options)
        # The student scored with no grad: old-policy log-probs when there is more than one PPO epoch.
        self.student_scorer = Teacher(self.engine, student_tokenizer, **score_options)
        self.teacher_rollout = PerLayerRollout(self.teacher.engine, student_tokenizer) if cfg.loss.method == "sft" \
            else None

    # ---- data --------------------------------------------------------------------------------------------------

    def prompts_for_step(self, step: int) -> list[dict]:
        """This rank's prompts of `step`: a DistributedSampler epoch order, the same on resume."""
        from torch.utils.data import DistributedSampler

        per_rank = self.cfg.train.prompts_per_step // self.world_size
        sampler = DistributedSampler(range(len(self.train_examples)), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.cfg.train.seed, drop_last=True)
        steps_per_epoch = len(sampler) // per_rank
        if steps_per_epoch == 0:
            raise ConfigError(f"{len(self.train_examples)} training prompts are fewer than --prompts_per_step "
                              f"{self.cfg.train.prompts_per_step}; add data or lower --prompts_per_step")
        sampler.set_epoch(step // steps_per_epoch)
        position = step % steps_per_epoch
        indices = list(sampler)[position * per_rank:(position + 1) * per_rank]
        return [self.train_examples[i] for i in indices]

    def encode_prompts(self, examples: list[dict]):
        from deepspeed.runtime.rollout import RolloutRequest

        self.tokenizer.padding_side = "left"
        enc = self.tokenizer([ex["prompt_text"] for ex in examples], return_tensors="pt", padding=True,
                             add_special_tokens=False)
        return RolloutRequest(prompt_ids=enc["input_ids"].to(self.engine.device),
                              prompt_attention_mask=enc["attention_mask"].to(self.engine.device))

    def completions(self, rollout) -> list[str]:
        texts = []
        for ids, mask in zip(rollout.input_ids, rollout.response_mask):
            texts.append(self.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True))
        return texts

    # ---- one step ----------------------------------------------------------------------------------------------

    def make_batch(self, examples: list[dict], timer: Timer) -> tuple[Batch, dict]:
        cfg, G = self.cfg, self.cfg.rollout.group_size
        request = self.encode_prompts(examples)
        with timer("rollout"):
            generator = self.teacher_rollout if self.teacher_rollout is not None else self.rollout
            rollout = generator.generate(request, self.sampling)
        with timer("reward"):
            texts = self.completions(rollout)
            per_sample = [ex for ex in examples for _ in range(G)]
            scored = self.rewards.run(texts, per_sample)
            scores = scored.scores
            if scored.errors or scored.timeouts:
                logger.warning("rank %d: %d reward calls raised and %d timed out; they score 0 (first: %s)",
                               self.rank, scored.errors, scored.timeouts, scored.messages[0])
            rewards = torch.tensor(scores, dtype=torch.float32)
            advantages, adv_stats = group_advantages(rewards, G, scale_by_std=cfg.loss.scale_adv_by_std)
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        loss_mask = rollout.response_mask[:, 1:].clone()
        if cfg.loss.method == "sft":  # offline distillation: learn only the teacher's correct traces
            loss_mask &= (rewards >= 1.0).to(loss_mask.device)[:, None]
        batch = Batch(input_ids, attention_mask, loss_mask, advantages.to(self.engine.device))
        if self.teacher is not None and cfg.loss.method != "sft":
            with timer("teacher"):
                batch.teacher_logp = self.teacher.score(input_ids, attention_mask)
        if self.reference is not None:
            with timer("reference"):
                batch.ref_logp = self.reference.score(input_ids, attention_mask,
                                                      temperature=cfg.rollout.temperature)
        if cfg.train.ppo_epochs > 1:
            # With one epoch every micro-batch is seen once before the update, so the policy that sampled it
            # is the one being trained: old_logp == logp.detach() and this pass is skipped.
            with timer("old_logprobs"):
                batch.old_logp = self.student_scorer.score(input_ids, attention_mask,
                                                           temperature=cfg.rollout.temperature)
        lengths = rollout.response_lengths.float()
        stats = {"reward_sum": float(rewards.sum()), "reward_sq_sum": float((rewards ** 2).sum()),
                 "correct": float((rewards >= 1.0).sum()), "samples": float(len(scores)),
                 "response_len_sum": float(lengths.sum()), "truncated": float(rollout.truncated.sum()),
                 "reward_errors": float(scored.errors + scored.timeouts),
                 "zero_std_groups": adv_stats["zero_std_frac"] * len(examples), "groups": float(len(examples)),
                 "tokens": float(attention_mask.sum())}
        return batch, stats

    def loss_fn(self, logp, batch: Batch, rows, cols, loss_norm):
        cfg = self.cfg.loss
        mask = batch.loss_mask[rows][:, cols]
        adv = batch.advantages[rows]
        old = logp.detach() if batch.old_logp is None else batch.old_logp[rows][:, cols]
        common = dict(loss_agg=cfg.loss_agg, max_len=self.cfg.rollout.max_new_tokens, loss_norm=loss_norm)
        policy = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                      ref_logp=None if batch.ref_logp is None else batch.ref_logp[rows][:, cols],
                      beta_ref=cfg.beta_ref, **common)
        teacher = None if batch.teacher_logp is None else batch.teacher_logp[rows][:, cols]
        if cfg.method == "rlad":
            return trrd_loss(logp, old, teacher, adv, mask, alpha=self.alpha,
                             teacher_log_ratio_clip=cfg.teacher_log_ratio_clip, **policy)
        if cfg.method == "kdrl":
            return kdrl_loss(logp, old, teacher, adv, mask, beta_kd=cfg.beta_kd, kl_estimator=cfg.kl_estimator,
                             **policy)
        if cfg.method == "grpo":
            return grpo_loss(logp, old, adv, mask, **policy)
        return sft_loss(logp, mask, **common)

    def train_on(self, batch: Batch, timer: Timer) -> dict:
        """ppo_epochs passes of token-budget micro-batches; one optimizer step per pass."""
        from rlad_ds.logprobs import microbatch_logprobs, microbatch_slices, synced_microbatch_count

        cfg = self.cfg
        device = self.engine.device
        # Global normalisers, divided by the world size because DeepSpeed averages gradients over ranks:
        # the micro-batch losses of all ranks then add up to the loss of the whole batch exactly.
        n_rows, n_tokens = all_reduce_sum([batch.loss_mask.shape[0], float(batch.loss_mask.sum())], device)
        loss_norm = (n_tokens if cfg.loss.loss_agg == "token-mean" else n_rows) / self.world_size
        slices = microbatch_slices(batch.attention_mask, cfg.train.micro_batch_tokens, self.packed)
        n_micro = synced_microbatch_count(len(slices))
        metric_sums: dict[str, float] = {}
        grad_norms, losses = [], []
        for _ in range(cfg.train.ppo_epochs):
            loss_total, loss_parts = 0.0, {}
            for i in range(n_micro):
                # A rank with fewer micro-batches than another repeats its first one with zero weight.
                rows, cols = slices[min(i, len(slices) - 1)]
                weight = 1.0 if i < len(slices) else 0.0
                self.engine.set_gradient_accumulation_boundary(i == n_micro - 1)
                with timer("train_forward"):
                    inputs = slice(cols.start, cols.stop + 1)
                    out = microbatch_logprobs(self.engine, batch.input_ids[rows, inputs],
                                              batch.attention_mask[rows, inputs], packed=self.packed,
                                              temperature=cfg.rollout.temperature,
                                              chunk_size=cfg.model.logprob_chunk_size or None, with_entropy=True)
                    loss, metrics = self.loss_fn(out.logprobs, batch, rows, cols, loss_norm)
                    loss = loss * weight
                with timer("train_backward"):
                    self.engine.backward(loss, scale_wrt_gas=False)
                if weight:
                    loss_total += loss.item()
                    mask = batch.loss_mask[rows, cols]
                    share = float(mask.sum())
                    metrics["entropy"] = masked_mean(out.entropy.detach(), mask).item()
                    for key, value in metrics.items():
                        if key in _LOSS_PARTS:
                            loss_parts[key] = loss_parts.get(key, 0.0) + value
                        else:
                            metric_sums[key] = metric_sums.get(key, 0.0) + value * share
                    metric_sums["_tokens"] = metric_sums.get("_tokens", 0.0) + share
            with timer("optimizer"):
                self.engine.step()
            grad_norms.append(_grad_norm(self.engine))
            losses.append(loss_total)
        tokens = metric_sums.pop("_tokens", 0.0)
        # Counted over all ranks: a NaN on one rank must make every rank skip and count the step alike, or
        # they would disagree about stopping at --max_bad_steps and the ones going on would hang.
        non_finite = sum(not math.isfinite(x) for x in losses + grad_norms)
        # Token-weighted means of the per-token statistics; the loss and its parts (last epoch) are sums of
        # micro-batch shares of the batch loss, each scaled by the world size (see loss_norm above).
        *reduced, loss, non_finite = all_reduce_sum([tokens, *metric_sums.values(), *loss_parts.values(),
                                                     losses[-1], float(non_finite)], device)
        result = {k: v / max(reduced[0], 1.0) for k, v in zip(metric_sums, reduced[1:])}
        result.update({k: v / self.world_size for k, v in zip(loss_parts, reduced[1 + len(metric_sums):])})
        result["loss"] = loss / self.world_size
        result["grad_norm"] = grad_norms[-1]
        result["finite"] = non_finite == 0
        return result

    def train_step(self, step: int) -> dict:
        timer = Timer()
        start = time.perf_counter()
        batch, stats = self.make_batch(self.prompts_for_step(step), timer)
        train_metrics = self.train_on(batch, timer)
        keys = list(stats)
        totals = dict(zip(keys, all_reduce_sum([stats[k] for k in keys], self.engine.device)))
        n = max(totals["samples"], 1.0)
        mean = totals["reward_sum"] / n
        metrics = {"loss": train_metrics.pop("loss"), "reward_mean": mean,
                   "reward_std": math.sqrt(max(totals["reward_sq_sum"] / n - mean ** 2, 0.0)),
                   "accuracy": totals["correct"] / n, "response_len": totals["response_len_sum"] / n,
                   "truncated_frac": totals["truncated"] / n, "reward_errors": totals["reward_errors"],
                   "zero_std_frac": totals["zero_std_groups"] / max(totals["groups"], 1.0),
                   "lr": self.engine.get_lr()[0], "alpha": self.alpha, **train_metrics, **timer.times}
        elapsed = time.perf_counter() - start
        metrics["time/step"] = elapsed
        metrics["tokens_per_s"] = totals["tokens"] / elapsed
        if self.cfg.loss.adaptive_alpha and "kl_teacher" in metrics:
            self.alpha = adapt_alpha(self.alpha, metrics["kl_teacher"], self.cfg.loss.alpha_min,
                                     self.cfg.loss.alpha_max)
        return metrics

    # ---- evaluation, state, loop ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Greedy held-out accuracy, examples sharded over ranks (every rank runs the same generate calls)."""
        from deepspeed.runtime.rollout import SamplingConfig

        if not self.eval_examples:
            return None
        shard = self.eval_examples[self.rank::self.world_size] or self.eval_examples[:1]
        weight = 1.0 if self.eval_examples[self.rank::self.world_size] else 0.0
        sampling = SamplingConfig(max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=0.0,
                                  n_samples_per_prompt=1)
        rollout = self.rollout.generate(self.encode_prompts(shard), sampling)
        scores = self.rewards.run(self.completions(rollout), shard).scores
        correct, count = all_reduce_sum([weight * sum(s >= 1.0 for s in scores), weight * len(scores)],
                                        self.engine.device)
        return correct / max(count, 1.0)

    def trainer_state(self) -> dict:
        per_rank = self.cfg.train.prompts_per_step // self.world_size
        return {"step": self.step, "alpha": self.alpha, "bad_steps": self.bad_steps,
                "world_size": self.world_size, "samples_seen": self.step * per_rank * self.world_size}

    def resume(self, directory: Path) -> None:
        state = checkpoint.load_checkpoint(self.engine, directory)
        if state["world_size"] != self.world_size:
            raise ConfigError(f"checkpoint {directory} was written by {state['world_size']} ranks, this run has "
                              f"{self.world_size}; resume with the same world size")
        self.step, self.alpha, self.bad_steps = state["step"], state["alpha"], state["bad_steps"]
        logger.info("resumed from %s at step %d", directory, self.step)

    def fit(self, metrics_logger) -> dict:
        cfg = self.cfg.train
        history = {"eval_before": None, "eval_after": None}
        if self.step == 0:
            history["eval_before"] = self.evaluate()
            if history["eval_before"] is not None:
                metrics_logger.log(0, {"eval_accuracy": history["eval_before"]})
        while self.step < cfg.max_steps:
            metrics = self.train_step(self.step)
            self.step += 1
            if not metrics["finite"]:
                self.bad_steps += 1
                if self.rank == 0:  # `finite` is the same on every rank
                    logger.warning("step %d: non-finite loss or gradient norm; the update was skipped (%d in a row)",
                                   self.step, self.bad_steps)
            else:
                self.bad_steps = 0
            metrics["skipped_steps"] = self.bad_steps
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                metrics_logger.log(self.step, metrics)  # the failing step's numbers are what the user debugs from
                raise TrainingError(f"{self.bad_steps} consecutive non-finite steps; lower --lr or check the "
                                    f"data and rewards (see metrics.jsonl)")
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < cfg.max_steps:
                metrics["eval_accuracy"] = self.evaluate()
            if self.step == cfg.max_steps:
                history["eval_after"] = metrics["eval_accuracy"] = self.evaluate()
            metrics_logger.log(self.step, metrics)
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.max_steps:
                checkpoint.save_checkpoint(self.engine, self.output_dir, self.step, self.trainer_state(),
                                           cfg.keep_last)
        return history


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def run_identity(cfg: Config) -> dict:
    """The config fields that define a run (what `--resume` must match)."""
    identity = cfg.to_dict()
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in _RESUMABLE_FIELDS}
    return identity


def check_output_dir(cfg: Config) -> None:
    """Refuse an output dir that holds a different run, unless told to overwrite (nothing is deleted here)."""
    record = Path(cfg.train.output_dir) / "run_config.json"
    if not record.is_file() or cfg.train.overwrite_output_dir:
        return
    try:
        previous = json.loads(record.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"--output_dir {cfg.train.output_dir} has an unreadable run_config.json; choose another "
                          f"--output_dir or pass --overwrite_output_dir") from None
    if previous != run_identity(cfg):
        raise ConfigError(f"--output_dir {cfg.train.output_dir} holds a different run (see its run_config.json); "
                          f"choose another --output_dir or pass --overwrite_output_dir")
    if cfg.train.resume == "none" and checkpoint.complete_checkpoints(cfg.train.output_dir):
        raise ConfigError(f"--output_dir {cfg.train.output_dir} already has checkpoints of this run; pass "
                          f"--resume auto to continue it or --overwrite_output_dir to start again")
