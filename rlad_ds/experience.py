"""What a step learns from: the part of `rlad_ds.trainer.Trainer` that turns prompts into the step's `Batch`.

    this rank's prompts -> rollout (the student's, or the teacher's for sft) -> verifier scores
    [+ DAPO's soft overlong punishment] -> group advantages -> the method's loss mask [- truncated responses]

With `--dynamic_sampling` (DAPO) a step samples in rounds: groups whose rewards are all equal carry no group
advantage and are left out, and another round of prompts is drawn while any rank holds fewer than its share of
`--prompts_per_step` groups that carry a signal, at most `--max_sampling_rounds` rounds. Whether to go on is one
collective per round, so every rank draws the same number of rounds (a rollout session is a collective). Each rank
then keeps its first share of informative groups; a rank left with none keeps one group with an empty loss mask, so
that it still runs the forwards every rank must run while teaching nothing. Round 0's prompts are the step's
DistributedSampler slice; an extra round's are a permutation of the training prompts seeded by (seed, step, round),
so a resumed run draws the same ones.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from rlad_ds.advantages import group_advantages, informative_groups, soft_overlong_penalty
from rlad_ds.batch import Batch, concat_batches
from rlad_ds.distributed import all_reduce_sum
from rlad_ds.errors import ConfigError
from rlad_ds.generation import decode_responses, generate, training_sampling
from rlad_ds.step_metrics import MAX, SUM, StepMetrics
from rlad_ds.tasks.base import correct

logger = logging.getLogger("rlad_ds")


class StepExperience:
    """Mixed into `Trainer`: reads its cfg, method, models, tokenizer, rewards, train_examples, rank, world_size."""

    def data_parallel(self) -> tuple[int, int]:
        """This rank's index among the data-parallel ranks, and their number: the N consecutive ranks of a
        sequence-parallel group (DeepSpeed's groups) read the same prompts."""
        n = self.cfg.train.sequence_parallel_size
        return self.rank // n, self.world_size // n

    def make_batch(self, step: int, timer, totals: StepMetrics) -> Batch:
        """The step's batch on this rank (one round, or the rounds of `--dynamic_sampling`); its statistics into
        `totals`."""
        if not self.cfg.train.dynamic_sampling:
            batch = self.sample_round(step, 0, timer, totals)
        else:
            batch = self._dynamic_rounds(step, timer, totals)
        self._count_loss_groups(batch, totals)
        return batch

    def _dynamic_rounds(self, step: int, timer, totals: StepMetrics) -> Batch:
        G, need = self.cfg.rollout.group_size, self.cfg.train.prompts_per_step // self.data_parallel()[1]
        kept, have, rounds = [], 0, 0
        while True:
            batch = self.sample_round(step, rounds, timer, totals)
            rounds += 1
            rows = informative_groups(batch.rewards, G).repeat_interleave(G).nonzero().squeeze(-1)
            if len(rows):
                kept.append(batch.rows(rows))
                have += len(rows) // G
            still_short = all_reduce_sum([float(have < need)], self.models.device)[0]
            if not still_short or rounds >= self.cfg.train.max_sampling_rounds:
                break
        if kept:
            chosen = concat_batches(kept)
            chosen = chosen.rows(torch.arange(min(have, need) * G, device=chosen.rewards.device))
        else:  # nothing to learn on this rank: one group with no loss token keeps it in step with the others
            chosen = batch.rows(torch.arange(G, device=batch.rewards.device))
            chosen.loss_mask = torch.zeros_like(chosen.loss_mask)
        totals.add("sampling_rounds", rounds, MAX)
        totals.add("groups_drawn", rounds * need, SUM)
        totals.add("groups_kept", min(have, need), SUM)
        return chosen

    def _count_loss_groups(self, batch: Batch, totals: StepMetrics) -> None:
        """The groups the loss learns from (any loss token), and how many of them carry no signal (all rewards
        equal: `zero_std_frac`)."""
        G = self.cfg.rollout.group_size
        if not self.method.uses_advantages:
            return
        in_loss = batch.loss_mask.reshape(-1, G * batch.loss_mask.shape[1]).any(-1)
        totals.add("zero_std_groups", (in_loss & ~informative_groups(batch.rewards, G)).sum(), SUM)
        totals.add("groups", in_loss.sum(), SUM)

    def sample_round(self, step: int, round_: int, timer, totals: StepMetrics) -> Batch:
        """One round: this rank's prompts, their rollouts, rewards, advantages and loss mask."""
        examples = self.prompts_for_step(step) if round_ == 0 else self.extra_prompts(step, round_)
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
            return self.reward(rollout, examples, totals)

    def prompts_for_step(self, step: int) -> list[dict]:
        """This rank's prompts of `step`: a DistributedSampler epoch order over the data-parallel ranks (a
        sequence-parallel group's ranks read the same prompts), the same on resume."""
        from torch.utils.data import DistributedSampler

        data_rank, data_size = self.data_parallel()
        per_rank = self.cfg.train.prompts_per_step // data_size
        sampler = DistributedSampler(
            range(len(self.train_examples)),
            num_replicas=data_size,
            rank=data_rank,
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

    def extra_prompts(self, step: int, round_: int) -> list[dict]:
        """This rank's prompts of an extra sampling round: its slice of a permutation seeded by (seed, step, round)."""
        data_rank, data_size = self.data_parallel()
        per_rank = self.cfg.train.prompts_per_step // data_size
        seed = int.from_bytes(hashlib.sha256(f"{self.cfg.train.seed}:{step}:{round_}".encode()).digest()[:8], "little")
        order = torch.randperm(len(self.train_examples), generator=torch.Generator().manual_seed(seed)).tolist()
        return [self.train_examples[i] for i in order[data_rank * per_rank : (data_rank + 1) * per_rank]]

    def reward(self, rollout, examples: list[dict], totals: StepMetrics) -> Batch:
        """Verifier scores of the rollouts (shaped by `--soft_overlong_tokens`), group advantages, the loss mask
        (without truncated responses under `--mask_truncated`); their totals into `totals`."""
        cfg, G, device = self.cfg, self.cfg.rollout.group_size, self.models.device
        scored = self.rewards.run(decode_responses(self.tokenizer, rollout), [e for e in examples for _ in range(G)])
        scored = self.models.long_context.same_in_group(scored)  # a verifier's timeout must not split a group
        self.reward_error = scored.messages[0] if scored.failed else None
        if scored.errors or scored.timeouts:
            logger.warning(
                "rank %d: %d reward calls raised and %d timed out; they score 0 (first: %s)",
                self.rank,
                scored.errors,
                scored.timeouts,
                scored.messages[0],
            )
        scores = torch.tensor(scored.scores, dtype=torch.float32, device=device)
        lengths, budget = rollout.response_lengths, cfg.rollout.max_new_tokens
        rewards = scores + soft_overlong_penalty(lengths, budget, cfg.loss.soft_overlong_tokens).to(scores)
        advantages = (
            group_advantages(rewards, G, scale_by_std=cfg.loss.scale_adv_by_std)[0]
            if self.method.uses_advantages
            else torch.zeros_like(rewards)
        )
        loss_mask = self.method.loss_mask(rollout.response_mask[:, 1:].clone(), scores)
        if cfg.loss.mask_truncated:
            loss_mask &= ~rollout.truncated.to(loss_mask.device)[:, None]
        self._count_rollouts(rollout, scores, rewards, scored, totals)
        rollout_logp = None if rollout.rollout_logprobs is None else rollout.rollout_logprobs[:, 1:]
        return Batch(
            rollout.input_ids,
            rollout.attention_mask,
            loss_mask,
            advantages.to(device),
            rewards,
            rollout_logp=rollout_logp,
        )

    def _count_rollouts(self, rollout, scores, rewards, scored, totals: StepMetrics) -> None:
        for name, value in (
            ("reward_sum", rewards.sum()),
            ("reward_sq_sum", (rewards**2).sum()),
            ("correct", correct(scores).sum()),
            ("samples", len(rewards)),
            ("response_len_sum", rollout.response_lengths.float().sum()),
            ("truncated", rollout.truncated.sum()),
            ("reward_errors", scored.errors + scored.timeouts),
            ("tokens", rollout.attention_mask.sum()),
        ):
            totals.add(name, value, SUM)
