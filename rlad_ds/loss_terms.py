"""The parts every loss is built of: masked means, Schulman's per-token KL estimators, and the reductions of a
per-token `[B, T]` term to a loss (`--loss_agg`). Pure torch; docs/method.md#aggregation states each one."""

from __future__ import annotations

import torch

LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is set (0 when nothing is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kl_estimate(logp: torch.Tensor, other_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_other) from tokens sampled from pi (Schulman's k1 / k2 / k3)."""
    if estimator == "k1":
        return logp - other_logp
    if estimator == "k2":
        return 0.5 * (logp - other_logp).square()
    if estimator == "k3":
        q = other_logp - logp
        return torch.expm1(q) - q
    raise ValueError(f"unknown KL estimator {estimator!r}; choose from {KL_ESTIMATORS}")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str = "seq-mean-token-mean",
    *,
    max_len: int | None = None,
    loss_norm: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token `[B, T]` quantity to a scalar.

    - "seq-mean-token-mean" (the paper): mean over tokens of each sequence, then mean over sequences.
    - "token-mean" (DAPO): mean over every response token of the batch.
    - "seq-mean-token-sum-norm" (Dr.GRPO): sum over tokens / `max_len` (a constant: the generation
      budget; defaults to T), then mean over sequences.

    A sequence with no token in `mask` (an `sft` row whose teacher trace failed, a truncated response under
    `--mask_truncated`, a row the rollout correction rejected) is left out of the mean over sequences, as verl's
    `agg_loss` leaves it out: it would otherwise scale the step by the share of rows that have loss tokens.
    `loss_norm` replaces the final denominator (number of sequences with a loss token, or of tokens for
    "token-mean"): a trainer splitting a batch into micro-batches passes the whole batch's count so that the
    micro-batch losses add up to the batch loss exactly.
    """
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    if loss_agg == "token-mean":
        return summed.sum() / (mask.sum().clamp_min(1) if loss_norm is None else loss_norm)
    counts = mask.sum(-1)
    if loss_agg == "seq-mean-token-mean":
        per_seq = summed.sum(-1) / counts.clamp_min(1)
    elif loss_agg == "seq-mean-token-sum-norm":
        per_seq = summed.sum(-1) / (max_len or per_token.shape[-1])
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose from {LOSS_AGGS}")
    return per_seq.sum() / (nonempty_rows(mask).clamp_min(1) if loss_norm is None else loss_norm)


def nonempty_rows(mask: torch.Tensor) -> torch.Tensor:
    """How many rows of a `[B, T]` mask have at least one token set (a 0-dim tensor): the sequences a per-sequence
    mean counts."""
    return (mask.sum(-1) > 0).sum()


def loss_denominator(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """What `aggregate` divides by for `loss_agg` over a whole batch (a 0-dim tensor): its loss tokens for
    "token-mean", else its rows with a loss token."""
    return mask.sum() if loss_agg == "token-mean" else nonempty_rows(mask)
