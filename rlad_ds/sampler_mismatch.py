"""The sampler is not the trainer: which rollout correction a run applies (`--rollout_correction`), its weights over
a batch or a micro-batch, and the mismatch metrics logged whenever the rollouts carry the sampler's log-probs.

Each preset is one setting of `rlad_ds.losses.rollout_correction` and equals one peer's mode, with that peer's
default bounds (docs/rollout_correction.md runs the peers' own code beside it). `auto`, the default, is `tis` when
the student's rollout returns the sampler's log-probs (vLLM: another program, other kernels) and off otherwise
(transformers' generate runs the trainer's own model and kernels).

Where the weights are computed: `old_logp` is the trainer's log-prob of the sampled tokens under the policy that
is being corrected towards. With one PPO epoch it is the micro-batch's own forward, detached, so the weights are
computed per micro-batch; a preset that drops rejected rows from the loss's normaliser (`geo_rs`) needs them
before the update (the normaliser is the whole batch's), so it asks for the old-policy pass and weights the whole
batch at once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from rlad_ds.loss_terms import kl_estimate, masked_mean
from rlad_ds.losses import rollout_correction, rollout_ratio, within

logger = logging.getLogger("rlad_ds")


@dataclass(frozen=True)
class Preset:
    name: str
    equals: str  # the peers' modes it reproduces, with their default bounds
    low: float | None
    high: float | None
    options: dict  # rollout_correction's level, statistic, action, weight, drop_rejected

    def kwargs(self, low: float | None, high: float | None) -> dict:
        """`rollout_correction`'s keyword arguments, with the run's bounds where it set them."""
        return {**self.options, "low": self.low if low is None else low, "high": self.high if high is None else high}


def _preset(name, equals, low, high, level, action, statistic="sum", weight="ratio", drop_rejected=False):
    options = dict(level=level, statistic=statistic, action=action, weight=weight, drop_rejected=drop_rejected)
    return Preset(name, equals, low, high, options)


PRESETS = {
    p.name: p
    for p in (
        _preset(
            "tis",
            "TRL token_truncate, verl rollout_is=token (default 2.0), OpenRLHF tis (token clip, default 0.5..5)",
            None,
            2.0,
            "token",
            "truncate",
        ),
        _preset(
            "icepop",
            "TRL token_mask, verl rollout_is=token with 'low_high' (default 0.5_5.0), OpenRLHF icepop (token mask)",
            0.5,
            5.0,
            "token",
            "mask",
        ),
        _preset(
            "seq_tis",
            "TRL sequence_truncate, verl rollout_is=sequence (default 2.0)",
            None,
            2.0,
            "sequence",
            "truncate",
        ),
        _preset(
            "seq_mask",
            "TRL sequence_mask (its default mode, bounds none..3.0), verl rollout_is=sequence with 'low_high'",
            None,
            3.0,
            "sequence",
            "mask",
        ),
        _preset(
            "seq_mask_tis",
            "OpenRLHF seq-mask-tis (geometric-mean gate, each token's own untruncated ratio, default 0.5..5)",
            0.5,
            5.0,
            "sequence",
            "mask",
            statistic="mean",
            weight="token",
        ),
        _preset(
            "geo_rs",
            "verl Geo-RS, rollout_rs=seq_mean_k1 (default '0.999_1.001', on the inverse ratio: x in 1/1.001..1/0.999)",
            1 / 1.001,
            1 / 0.999,
            "sequence",
            "mask",
            statistic="mean",
            weight="one",
            drop_rejected=True,
        ),
    )
}
CORRECTION_CHOICES = ("auto", "none", *PRESETS)
AUTO_PRESET = "tis"
SAMPLER_LOGPROB_ROLLOUTS = ("vllm",)  # the --rollout kinds whose outputs carry the sampler's log-probs


def resolve(name: str, sampler_logprobs: bool, accepted: bool) -> Preset | None:
    """The preset a run applies: `name`, or for `auto` `tis` when the sampler returns its log-probs; None when off
    (`none`, a method that does not reweight, or `auto` with a sampler that is the trainer's own program)."""
    if not accepted or name == "none" or (name == "auto" and not sampler_logprobs):
        return None
    return PRESETS[AUTO_PRESET if name == "auto" else name]


class SamplerCorrection:
    """A run's rollout correction and mismatch metrics (`rlad_ds.trainer.Trainer` holds one)."""

    def __init__(self, loss_cfg, sampler_logprobs: bool, accepted: bool, rank: int = 0):
        self.preset = resolve(loss_cfg.rollout_correction, sampler_logprobs, accepted)
        self.options = (
            self.preset.kwargs(loss_cfg.rollout_correction_low, loss_cfg.rollout_correction_high) if self.preset else {}
        )
        if rank == 0:
            where = "the sampler returns its log-probs" if sampler_logprobs else "no sampler log-probs"
            bounds = f" [{self.options['low']}, {self.options['high']}]" if self.preset else ""
            chosen = self.preset.name if self.preset else "off"
            logger.info(
                "rollout correction: %s%s (--rollout_correction %s; %s)",
                chosen,
                bounds,
                loss_cfg.rollout_correction,
                where,
            )

    @property
    def drops_rows(self) -> bool:
        """Whether the correction can leave rows out of the loss's normaliser: then it runs on the whole batch."""
        return bool(self.options.get("drop_rejected"))

    def weigh_batch(self, batch) -> None:
        """For a row-dropping preset: the whole batch's weights and kept tokens, from its old-policy log-probs,
        before the normalisers are counted."""
        if self.drops_rows and batch.rollout_logp is not None:
            weights, keep = rollout_correction(batch.old_logp, batch.rollout_logp, batch.loss_mask, **self.options)
            batch.correction_weights, batch.correction_keep = weights, keep

    def for_loss(self, micro, logp: torch.Tensor):
        """The micro-batch the loss reads (its loss mask the kept tokens, its weights set) and the mismatch metrics
        as {name: (value, kind)}; unchanged and none without sampler log-probs."""
        if micro.rollout_logp is None:
            return micro, {}
        old = micro.old(logp)
        metrics = mismatch_metrics(old, micro.rollout_logp, micro.loss_mask, self.options)
        if not self.preset:
            return micro, metrics
        if micro.correction_weights is not None:
            weights, keep = micro.correction_weights, micro.correction_keep
        else:
            weights, keep = rollout_correction(old, micro.rollout_logp, micro.loss_mask, **self.options)
        return dataclasses.replace(micro, loss_mask=keep, correction_weights=weights), metrics


def mismatch_metrics(old_logp, rollout_logp, mask, options: dict) -> dict:
    """How far the sampler is from the trainer on the response tokens of `mask`, as {name: 0-dim tensor}:
    `rollout_kl`, the k3 estimate of KL(sampler || trainer) (tokens drawn by the sampler), averaged; the largest
    trainer / sampler token ratio `rollout_ratio_max`; `rollout_corrected_frac`, the share of tokens whose weight
    the correction's bounds changed (truncated or rejected; 0 when off)."""
    with torch.no_grad():
        on = mask.bool()
        ratio = rollout_ratio(old_logp, rollout_logp, mask)
        metrics = {
            "rollout_kl": masked_mean(kl_estimate(rollout_logp, old_logp, "k3"), on),
            "rollout_ratio_max": torch.where(on, ratio, torch.zeros_like(ratio)).max(),
        }
        if options:
            x = rollout_ratio(old_logp, rollout_logp, mask, options["level"], options["statistic"])
            outside = ~within(x, options["low"], options["high"])
            metrics["rollout_corrected_frac"] = masked_mean(outside.to(x.dtype), on)
        else:
            metrics["rollout_corrected_frac"] = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
        return metrics
