"""The trainer: one timed step, read as its phases, and the loop with callbacks.

    prompts (DistributedSampler shard) -> rollout (the student's, or the teacher's for sft) -> reward
    [-> more rounds with --dynamic_sampling]                                     (rlad_ds.experience)
    -> teacher / reference / old-policy log-probs of the sampled tokens
    -> ppo_epochs x token-budget micro-batches of the method's loss, reweighted by the rollout correction when
       the sampler gave its own log-probs (rlad_ds.sampler_mismatch) -> optimizer step

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

from rlad_ds import signals
from rlad_ds.batch import Batch
from rlad_ds.callbacks import Callback
from rlad_ds.checkpoint.protocol import load_checkpoint, save_checkpoint
from rlad_ds.checkpoint.run_dir import run_identity
from rlad_ds.distributed import all_reduce_sum, world
from rlad_ds.errors import Interrupted
from rlad_ds.evaluation import eval_metrics
from rlad_ds.experience import StepExperience
from rlad_ds.generation import evaluate_examples
from rlad_ds.health import RunHealth
from rlad_ds.loss_terms import loss_denominator, masked_mean
from rlad_ds.losses import LOSS_PARTS
from rlad_ds.sampler_mismatch import SamplerCorrection
from rlad_ds.step_metrics import LOSS_SHARE, MAX, SUM, TOKEN_MEAN, StepMetrics
from rlad_ds.timing import Timer

logger = logging.getLogger("rlad_ds")


class Trainer(StepExperience):
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
        sampler_logprobs = getattr(getattr(models, "student_rollout", None), "sampler_logprobs", False)
        accepted = "rollout_correction" in method.accepts
        self.correction = SamplerCorrection(cfg.loss, sampler_logprobs, accepted, self.rank)

    # ---- one step ----------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        """Rollout, reward, teacher (and reference, old-policy) log-probs, update: one optimizer step."""
        timer, start = Timer(), time.perf_counter()
        # A sequence-parallel group's ranks hold the same samples: their sums count once.
        copies = self.cfg.train.sequence_parallel_size
        totals = StepMetrics(self.models.device, self.world_size, self.cfg.train.ppo_epochs, copies=copies)
        batch = self.make_batch(step, timer, totals)
        self.score(batch, timer)
        for callback in self.callbacks:
            callback.on_batch(self, batch)
        grad_norm = self.update(batch, timer, totals)
        metrics = self.step_metrics(totals, grad_norm)
        metrics.update({**self.controls, **timer.times})
        metrics["time/step"] = time.perf_counter() - start
        metrics["tokens_per_s"] = metrics["tokens"] / self.world_size / metrics["time/step"]  # per rank
        self.controls = self.method.update_controls(self.controls, metrics, self.cfg.loss)
        return metrics

    def score(self, batch: Batch, timer: Timer) -> None:
        """The frozen models' (and, with several PPO epochs, the old policy's) log-probs of the sampled tokens."""
        models, ids, mask = self.models, batch.input_ids, batch.attention_mask
        if self.method.teacher_scores:
            with timer("teacher"):
                batch.teacher_logp = models.teacher_scorer.logprobs(ids, mask)
        if models.reference_scorer is not None:
            with timer("reference"):
                batch.ref_logp = models.reference_scorer.logprobs(ids, mask)
        several_epochs = self.method.uses_ratio and self.cfg.train.ppo_epochs > 1
        if several_epochs or (self.correction.drops_rows and batch.rollout_logp is not None):
            # With one epoch every micro-batch is seen once before the update, so the policy that sampled it is
            # the one being trained: old_logp == logp.detach() and this pass is skipped, unless the rollout
            # correction must weigh the whole batch before the update (it can drop rows from the normaliser).
            with timer("old_logprobs"):
                batch.old_logp = models.student_scorer.logprobs(ids, mask)
            self.correction.weigh_batch(batch)

    def update(self, batch: Batch, timer: Timer, totals: StepMetrics) -> float:
        """ppo_epochs passes of token-budget micro-batches, one optimizer step per pass; the last gradient norm."""
        from rlad_ds.microbatches import synced_microbatch_count

        engine, device, long_context = self.models.student, self.models.device, self.models.long_context
        # Global normaliser (loss tokens, or rows with a loss token), divided by the world size because DeepSpeed
        # averages gradients over data-parallel ranks: the micro-batch losses of all ranks then add up to the loss of
        # the whole batch exactly. With sequence parallelism each of a group's N ranks adds its batch once more and
        # DeepSpeed divides by world / N only (it sums the group's shards), so the same ratio holds. Rows the rollout
        # correction drops are counted out already (`correction_keep`).
        mask = batch.loss_mask if batch.correction_keep is None else batch.correction_keep
        (count,) = all_reduce_sum([float(loss_denominator(mask, self.cfg.loss.loss_agg))], device)
        loss_norm = max(count, 1.0) / self.world_size
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
            corrected, mismatch = self.correction.for_loss(micro, out.logprobs)
            loss, metrics = self.method.loss(out.logprobs, corrected, cfg.loss, self.controls, reduce)
            loss = loss * (1.0 if counts else 0.0)
        with timer("train_backward"):
            self.models.student.backward(loss, scale_wrt_gas=False)
        if not counts:
            return
        tokens, sampled = corrected.loss_mask.sum(), micro.loss_mask.sum()
        metrics["entropy"] = masked_mean(out.entropy.detach(), corrected.loss_mask)
        for key, value in metrics.items():
            totals.add(key, value, LOSS_SHARE if key in LOSS_PARTS else TOKEN_MEAN, weight=tokens)
        totals.add("loss", loss.detach(), LOSS_SHARE)
        for key, value in mismatch.items():  # over the response tokens before the correction kept some
            totals.add(key, value, MAX if key == "rollout_ratio_max" else TOKEN_MEAN, weight=sampled)

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
        if self.method.uses_advantages:  # over the groups the loss learns from
            metrics["zero_std_frac"] = reduced["zero_std_groups"] / max(reduced["groups"], 1.0)
        if self.cfg.train.dynamic_sampling:
            metrics["sampling_rounds"] = reduced["sampling_rounds"]
            metrics["discarded_group_frac"] = 1.0 - reduced["groups_kept"] / max(reduced["groups_drawn"], 1.0)
        for kind in (TOKEN_MEAN, LOSS_SHARE, MAX):
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
        data_size = self.data_parallel()[1]
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
        train = self.cfg.train
        state = load_checkpoint(self.models.student, directory, train.seed, train.checkpoint_verify)
        self.step, self.controls, self.health.bad_steps = state["step"], state["controls"], state["bad_steps"]
        signals.STOP.last_checkpoint = str(directory)
        logger.info("resumed from %s at step %d", directory, self.step)

    def fit(self, callbacks=()) -> dict:
        """Train until `max_steps`, evaluating and saving as configured; returns the accuracies before and after, the
        last step's training reward and the step it started from."""
        self.callbacks, train = list(callbacks), self.cfg.train
        signals.STOP.save, signals.STOP.grace_s = train.save_on_signal, train.signal_grace_s
        history = {"eval_before": None, "eval_after": None, "reward_mean": None, "start_step": self.step}
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
            self.health.check_signal(self.step, metrics)
            history["reward_mean"] = metrics.get("reward_mean")
            save_due = train.save_steps > 0 and self.step % train.save_steps == 0
            saved = train.save_steps >= 0 and (save_due or self.step == train.max_steps)
            if saved:
                self._save()
            signals.STOP.seconds_needed = metrics["time/step"] + (self.save_seconds or metrics["time/step"])
            self._stop_if_asked(saved)
        for callback in self.callbacks:  # the export and the summary also of a run that learned nothing
            callback.on_train_end(self, history)
        failed = self.health.end_of_run()
        if failed is not None:
            raise failed
        return history

    def _save(self) -> None:
        start = time.perf_counter()
        train = self.cfg.train
        path = save_checkpoint(
            self.models.student,
            train.output_dir,
            self.step,
            self.trainer_state(),
            train.keep_last,
            train.checkpoint_verify,
        )
        self.save_seconds = time.perf_counter() - start
        signals.STOP.last_checkpoint = str(path)
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
