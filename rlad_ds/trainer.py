"""The trainer: one timed step, read as its phases, and the loop with callbacks.

    prompts (DistributedSampler shard) -> rollout (the student's, or the teacher's for sft) -> reward
    -> teacher / reference / old-policy log-probs of the sampled tokens
    -> ppo_epochs x token-budget micro-batches of the method's loss -> optimizer step

The trainer receives its models (`rlad_ds.run_models`), its method object (`rlad_ds.methods`), its reward
runner and its data; it never asks which method it runs. A step's metrics go into one `StepMetrics`, reduced over
the ranks once at the end of the step. `fit(callbacks)` runs the loop and tells each
callback about every step, evaluation, checkpoint and the end of the run: metrics logging, the demo's
summary, the study and the benchmarks are callbacks. Everything distributed is collective: every rank runs
the same number of forwards and backwards whatever its own data, so no configuration hangs.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from rlad_ds import signals
from rlad_ds.advantages import group_advantages
from rlad_ds.batch import Batch
from rlad_ds.callbacks import Callback
from rlad_ds.checkpoint.protocol import load_checkpoint, save_checkpoint
from rlad_ds.checkpoint.run_dir import run_identity
from rlad_ds.distributed import world
from rlad_ds.errors import ConfigError, Interrupted
from rlad_ds.evaluation import eval_metrics
from rlad_ds.generation import decode_responses, evaluate_examples, generate, training_sampling
from rlad_ds.health import RunHealth
from rlad_ds.losses import LOSS_PARTS, masked_mean
from rlad_ds.step_metrics import LOSS_SHARE, SUM, TOKEN_MEAN, StepMetrics
from rlad_ds.tasks.base import correct
from rlad_ds.timing import Timer

logger = logging.getLogger("rlad_ds")


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over ranks in one collective (the loss normalisers, a stop request)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class Trainer:
    def __init__(
        self, cfg, method, models, tokenizer, task, rewards, train_examples: list[dict], eval_examples: list[dict]
    ):
        self.cfg, self.method, self.models = cfg, method, models
        self.tokenizer, self.task, self.rewards = tokenizer, task, rewards
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.rank, self.world_size = world()
        self.step = 0
        self.health = RunHealth(cfg.train.max_bad_steps, cfg.train.max_failed_reward_steps, self.rank)
        self.save_seconds: float | None = None
        self.reward_error: str | None = None  # this step's first failed reward call on this rank, for the log
        self.controls = method.initial_controls(cfg.loss)
        self.callbacks: list[Callback] = []

    # ---- one step ----------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        """Rollout, reward, teacher (and reference, old-policy) log-probs, update: one optimizer step."""
        timer, start = Timer(), time.perf_counter()
        group = self.models.long_context.group  # its ranks hold the same samples: their sums count once
        totals = StepMetrics(self.models.device, self.world_size, self.cfg.train.ppo_epochs, copies=group.size)
        examples = self.prompts_for_step(step)
        sampler = self.models.teacher_rollout if self.method.teacher_generates else self.models.student_rollout
        with timer("weight_sync"):
            sampler.sync_weights(step)  # a no-op for rollouts that read the training weights in place
        with timer("rollout"):
            rollout = generate(
                sampler,
                self.tokenizer,
                [e["prompt_text"] for e in examples],
                training_sampling(self.cfg.rollout),
                self.models.device,
                batch_size=self.cfg.rollout.rollout_batch_size,
            )
            rollout = self.models.long_context.same_in_group(rollout)
        with timer("reward"):
            batch = self.reward(rollout, examples, totals)
        self.score(batch, timer)
        for callback in self.callbacks:
            callback.on_batch(self, batch)
        grad_norm = self.update(batch, timer, totals)
        metrics = self.step_metrics(totals, grad_norm)
        metrics.update({**self.controls, **timer.times})
        metrics["time/step"] = time.perf_counter() - start
        metrics["tokens_per_s"] = float(rollout.attention_mask.sum()) / metrics["time/step"]
        self.controls = self.method.update_controls(self.controls, metrics, self.cfg.loss)
        return metrics

    def prompts_for_step(self, step: int) -> list[dict]:
        """This rank's prompts of `step`: a DistributedSampler epoch order over the data-parallel ranks (a
        sequence-parallel group's ranks read the same prompts), the same on resume."""
        from torch.utils.data import DistributedSampler

        group = self.models.long_context.group
        per_rank = self.cfg.train.prompts_per_step // group.data_size
        sampler = DistributedSampler(
            range(len(self.train_examples)),
            num_replicas=group.data_size,
            rank=group.data_rank,
            shuffle=True,
            seed=self.cfg.train.seed,
            drop_last=True,
        )
        steps_per_epoch = len(sampler) // per_rank
        if steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_examples)} training prompts are fewer than --prompts_per_step "
                f"{self.cfg.train.prompts_per_step}; add data or lower --prompts_per_step"
            )
        sampler.set_epoch(step // steps_per_epoch)
        position = step % steps_per_epoch
        return [self.train_examples[i] for i in list(sampler)[position * per_rank : (position + 1) * per_rank]]

    def reward(self, rollout, examples: list[dict], totals: StepMetrics) -> Batch:
        """Verifier scores of the rollouts, group advantages, the loss mask; their totals into `totals`."""
        G, device = self.cfg.rollout.group_size, self.models.device
        scored = self.rewards.run(decode_responses(self.tokenizer, rollout), [e for e in examples for _ in range(G)])
        scored = self.models.long_context.same_in_group(scored)
        self.reward_error = scored.messages[0] if scored.failed else None
        if scored.errors or scored.timeouts:
            logger.warning(
                "rank %d: %d reward calls raised and %d timed out; they score 0 (first: %s)",
                self.rank,
                scored.errors,
                scored.timeouts,
                scored.messages[0],
            )
        rewards = torch.tensor(scored.scores, dtype=torch.float32, device=device)
        advantages, adv_stats = (
            group_advantages(rewards, G, scale_by_std=self.cfg.loss.scale_adv_by_std)
            if self.method.uses_advantages
            else (torch.zeros_like(rewards), {"zero_std_frac": float("nan")})
        )
        loss_mask = self.method.loss_mask(rollout.response_mask[:, 1:].clone(), rewards)
        for name, value in (
            ("reward_sum", rewards.sum()),
            ("reward_sq_sum", (rewards**2).sum()),
            ("correct", correct(rewards).sum()),
            ("samples", len(rewards)),
            ("response_len_sum", rollout.response_lengths.float().sum()),
            ("truncated", rollout.truncated.sum()),
            ("reward_errors", scored.errors + scored.timeouts),
            ("zero_std_groups", adv_stats["zero_std_frac"] * len(examples)),
            ("groups", len(examples)),
            ("tokens", rollout.attention_mask.sum()),
        ):
            totals.add(name, value, SUM)
        return Batch(rollout.input_ids, rollout.attention_mask, loss_mask, advantages.to(device), rewards)

    def score(self, batch: Batch, timer: Timer) -> None:
        """The frozen models' (and, with several PPO epochs, the old policy's) log-probs of the sampled tokens."""
        models, ids, mask = self.models, batch.input_ids, batch.attention_mask
        if self.method.teacher_scores:
            with timer("teacher"):
                batch.teacher_logp = models.teacher_scorer.logprobs(ids, mask)
        if models.reference_scorer is not None:
            with timer("reference"):
                batch.ref_logp = models.reference_scorer.logprobs(ids, mask)
        if self.method.uses_ratio and self.cfg.train.ppo_epochs > 1:
            # With one epoch every micro-batch is seen once before the update, so the policy that sampled it is
            # the one being trained: old_logp == logp.detach() and this pass is skipped.
            with timer("old_logprobs"):
                batch.old_logp = models.student_scorer.logprobs(ids, mask)

    def update(self, batch: Batch, timer: Timer, totals: StepMetrics) -> float:
        """ppo_epochs passes of token-budget micro-batches, one optimizer step per pass; the last gradient norm."""
        from rlad_ds.microbatches import synced_microbatch_count

        engine, device, long_context = self.models.student, self.models.device, self.models.long_context
        # Global normalisers, divided by the world size because DeepSpeed averages gradients over data-parallel
        # ranks: the micro-batch losses of all ranks then add up to the loss of the whole batch exactly. With
        # sequence parallelism each of a group's N ranks adds its batch once more and DeepSpeed divides by world / N
        # only (it sums the group's shards), so the same ratio holds.
        n_rows, n_tokens = all_reduce_sum([batch.loss_mask.shape[0], float(batch.loss_mask.sum())], device)
        loss_norm = (n_tokens if self.cfg.loss.loss_agg == "token-mean" else n_rows) / self.world_size
        slices = long_context.slices(batch.attention_mask, self.cfg.train.micro_batch_tokens, self.models.packed)
        n_micro = synced_microbatch_count(len(slices))
        grad_norm = 0.0
        for _ in range(self.cfg.train.ppo_epochs):
            for i in range(n_micro):
                # A rank with fewer micro-batches than another repeats its first one with zero weight.
                piece = slices[min(i, len(slices) - 1)]
                engine.set_gradient_accumulation_boundary(i == n_micro - 1)
                with long_context.compute(), long_context.activation_offload():
                    self.micro_step(
                        batch.micro(piece.rows, piece.cols), piece.spans, loss_norm, i < len(slices), timer, totals
                    )
            with timer("optimizer"):
                engine.step()
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else 0.0
            # Counted over all ranks: a NaN on one rank must make every rank skip and count the step alike, or
            # they would disagree about stopping at --max_bad_steps and the ones going on would hang.
            totals.add("non_finite", float(not math.isfinite(grad_norm)), SUM)
        return grad_norm

    def micro_step(
        self, micro: Batch, spans, loss_norm: float, counts: bool, timer: Timer, totals: StepMetrics
    ) -> None:
        """Forward, loss and backward of one micro-batch (`spans`: its rows' real tokens, for packing); its metrics
        into `totals` unless it is a filler (a rank's repeat, with zero weight, to run as many forwards as the other
        ranks)."""
        cfg = self.cfg
        with timer("train_forward"):
            out = self.models.long_context.logprobs(
                self.models.student,
                micro.input_ids,
                micro.attention_mask,
                packed=self.models.packed,
                spans=spans,
                temperature=cfg.rollout.temperature,
                chunk_size=cfg.model.logprob_chunk_size or None,
                with_entropy=True,
            )
            reduce = dict(loss_agg=cfg.loss.loss_agg, max_len=cfg.rollout.max_new_tokens, loss_norm=loss_norm)
            loss, metrics = self.method.loss(out.logprobs, micro, cfg.loss, self.controls, reduce)
            loss = loss * (1.0 if counts else 0.0)
        with timer("train_backward"):
            self.models.student.backward(loss, scale_wrt_gas=False)
        if not counts:
            return
        tokens = micro.loss_mask.sum()
        metrics["entropy"] = masked_mean(out.entropy.detach(), micro.loss_mask)
        for key, value in metrics.items():
            totals.add(key, value, LOSS_SHARE if key in LOSS_PARTS else TOKEN_MEAN, weight=tokens)
        totals.add("loss", loss.detach(), LOSS_SHARE)

    def step_metrics(self, totals: StepMetrics, grad_norm: float) -> dict:
        """The step's logged metrics, reduced over all ranks in one collective: rollout and reward rates, the loss
        statistics (token means, then the loss and its parts), the gradient norm."""
        reduced = totals.reduce()
        n = max(reduced["samples"], 1.0)
        mean = reduced["reward_sum"] / n
        metrics = {
            "reward_mean": mean,
            "reward_std": math.sqrt(max(reduced["reward_sq_sum"] / n - mean**2, 0.0)),
            "accuracy": reduced["correct"] / n,
            "response_len": reduced["response_len_sum"] / n,
            "truncated_frac": reduced["truncated"] / n,
            "reward_errors": reduced["reward_errors"],
            "reward_failed_frac": reduced["reward_errors"] / n,
            "lr": self.models.student.get_lr()[0],
            "tokens": reduced["tokens"],
        }
        if self.method.uses_advantages:
            metrics["zero_std_frac"] = reduced["zero_std_groups"] / max(reduced["groups"], 1.0)
        for kind in (TOKEN_MEAN, LOSS_SHARE):
            metrics.update({k: v for k, v in reduced.items() if totals.kinds[k] == kind})
        metrics.update(grad_norm=grad_norm, finite=reduced["non_finite"] == 0 and math.isfinite(metrics["loss"]))
        return metrics

    # ---- evaluation, state, loop -------------------------------------------------------------------------------

    def evaluate(self) -> dict | None:
        """Mean@k / Pass@k of the student on the held-out prompts (greedy by default), through the same path as
        launchers/eval.py; None without held-out prompts."""
        if not self.eval_examples:
            return None
        return evaluate_examples(
            self.models.student_rollout,
            self.tokenizer,
            self.task,
            self.eval_examples,
            self.cfg,
            self.rewards,
            self.models.device,
        )

    def trainer_state(self) -> dict:
        data_size = self.models.long_context.group.data_size
        per_rank = self.cfg.train.prompts_per_step // data_size
        # The identity lets --resume auto refuse another run's checkpoint (e.g. after --group_size changed).
        return {
            "step": self.step,
            "controls": self.controls,
            "bad_steps": self.health.bad_steps,
            "world_size": self.world_size,
            "samples_seen": self.step * per_rank * data_size,
            "identity": run_identity(self.cfg),
        }

    def resume(self, directory) -> None:
        # Another world size is loaded through DeepSpeed's universal checkpoint; the data order goes on unchanged
        # (each step's prompts over all ranks are the same slice of the epoch's permutation for any world size).
        state = load_checkpoint(self.models.student, directory, seed=self.cfg.train.seed)
        self.step, self.controls, self.health.bad_steps = state["step"], state["controls"], state["bad_steps"]
        logger.info("resumed from %s at step %d", directory, self.step)

    def fit(self, callbacks=()) -> dict:
        """Train until `max_steps`, evaluating and saving as configured; returns the accuracies before and after."""
        self.callbacks, train = list(callbacks), self.cfg.train
        signals.STOP.save, signals.STOP.grace_s = train.save_on_signal, train.signal_grace_s
        history = {"eval_before": None, "eval_after": None}
        if self.step == 0:
            history["eval_before"] = self._evaluate(0, {})
        while self.step < train.max_steps:
            metrics = self.train_step(self.step)
            self.step += 1
            stop = self.health.count_finite(self.step, metrics)
            if stop is not None:  # reported first: the failing step's numbers are what the user debugs from
                for callback in self.callbacks:
                    callback.on_step_end(self, self.step, metrics)
                raise stop
            if (self.cfg.eval.eval_steps and self.step % self.cfg.eval.eval_steps == 0) or self.step == train.max_steps:
                history["eval_after"] = self._evaluate(self.step, metrics)
            for callback in self.callbacks:
                callback.on_step_end(self, self.step, metrics)
            self.health.check_rewards(metrics, self.reward_error)
            save_due = train.save_steps > 0 and self.step % train.save_steps == 0
            saved = train.save_steps >= 0 and (save_due or self.step == train.max_steps)
            if saved:
                self._save()
            signals.STOP.seconds_needed = metrics["time/step"] + (self.save_seconds or metrics["time/step"])
            self._stop_if_asked(saved)
        for callback in self.callbacks:
            callback.on_train_end(self, history)
        return history

    def _save(self) -> None:
        start = time.perf_counter()
        path = save_checkpoint(
            self.models.student, self.cfg.train.output_dir, self.step, self.trainer_state(), self.cfg.train.keep_last
        )
        self.save_seconds = time.perf_counter() - start
        for callback in self.callbacks:
            callback.on_checkpoint(self, self.step, path)

    def _stop_if_asked(self, saved: bool) -> None:
        """A SIGTERM / SIGINT on any rank (`signals.STOP`) stops every rank after the same step, with a checkpoint
        (unless --save_steps -1): the ranks agree first, so that none waits in a collective for one that left."""
        stop = signals.STOP
        if not all_reduce_sum([float(stop.requested)], self.models.device)[0]:
            return
        if not saved and self.cfg.train.save_steps >= 0:
            self._save()
        where = (
            f"checkpoint step_{self.step:08d} saved"
            if self.cfg.train.save_steps >= 0
            else "no checkpoint (--save_steps -1)"
        )
        raise Interrupted(
            f"stopped by {stop.signal_name or 'SIGTERM'} after step {self.step}: {where}; run the "
            f"same command to resume",
            stop.exit_code or 128 + 15,
        )

    def _evaluate(self, step: int, metrics: dict) -> float | None:
        """Evaluate, tell the callbacks, add the results' summary to `metrics`; the accuracy, or None."""
        results = self.evaluate()
        if results is None:
            return None
        for callback in self.callbacks:
            callback.on_evaluate(self, step, results)
        metrics.update(eval_metrics(results))
        if metrics["eval_score_errors"] and self.rank == 0:
            logger.warning(
                "evaluation at step %d: %d scoring errors / timeouts, scored 0 (not wrong answers; first: %s)",
                step,
                metrics["eval_score_errors"],
                "; ".join(results["score_messages"]),
            )
        return metrics["eval_accuracy"]
