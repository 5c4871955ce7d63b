"""Every loss of the trainer: TRRD (the RLAD method), GRPO, KDRL, KD and SFT, with their KL estimators and
aggregations. docs/method.md derives each formula and its conventions.

Pure torch, no DeepSpeed. Shapes: log-prob tensors are `[B, T]` (any float dtype) on the *sampled*
tokens; `advantages` is `[B]` (one per sequence) or `[B, T]`; `mask` is `[B, T]` (bool or float), 1 on
response tokens that count. Every loss returns `(loss, metrics)`: the scalar to minimise and a dict of
detached 0-dim tensors (or floats), so that a trainer can reduce them without a host transfer per micro-batch:

    log r_TRRD = alpha * (logp - old_logp) + (1 - alpha) * clamp(logp - teacher_logp, -c, c)
    surr       = min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
    loss       = -aggregate(surr) + beta_ref * aggregate(KL_k3(pi_S || pi_ref))

Convention for alpha: **alpha = 1 is exactly GRPO** (the teacher drops out); alpha -> 0 centres the
trust region entirely on the teacher. (The paper's Section 4.1 prose states the ends the other way
round; its equations (3), (5) and Appendix C agree with this convention.)

The teacher clamp is a plain `clamp`: where `|logp - teacher_logp| > c` the teacher term is constant,
so only the `alpha` share of the ratio's gradient flows there (a trust region on the teacher side, as
PPO's clip is on the old-policy side). With `A = 0` the teacher has no effect on the gradient.

Temperature convention: all four log-probs (`logp`, `old_logp`, `teacher_logp`, `ref_logp`) are of the
same distribution family, softmax(logits / T) with T the rollout temperature (the trainer passes T to
every scorer). The responses are sampled from the student's tempered distribution, so the PPO ratio must
compare tempered probabilities (verl, OpenRLHF and TRL divide the current, old and reference logits by
T); the teacher's term in the TRRD ratio and the KL estimators compare the student with the teacher, so
the teacher is tempered alike (as DeepSpeed's `generalized_jsd_loss` and TRL's distillation trainer do):
a teacher identical to the student then gives `logp - teacher_logp = 0` at every temperature, whereas an
untempered teacher would move the trust region at T != 1 even when the two models agree exactly.
At T = 1 (the paper's training setting) every convention coincides.
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# Metrics that are shares of the batch loss (normalised by the whole batch): micro-batch values add up.
LOSS_PARTS = ("policy_loss", "kd_loss")


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

    `loss_norm` replaces the final denominator (number of sequences, or of tokens for "token-mean"):
    a trainer splitting a batch into micro-batches passes the whole batch's count so that the
    micro-batch losses add up to the batch loss exactly. Sequences with no response token count as
    sequences (with zero loss), so that this holds for any split.
    """
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    if loss_agg == "token-mean":
        return summed.sum() / (mask.sum().clamp_min(1) if loss_norm is None else loss_norm)
    if loss_agg == "seq-mean-token-mean":
        per_seq = summed.sum(-1) / mask.sum(-1).clamp_min(1)
    elif loss_agg == "seq-mean-token-sum-norm":
        per_seq = summed.sum(-1) / (max_len or per_token.shape[-1])
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose from {LOSS_AGGS}")
    return per_seq.sum() / (per_seq.shape[0] if loss_norm is None else loss_norm)


def _clipped_surrogate(log_ratio, advantages, mask, clip_low, clip_high, dual_clip):
    """PPO's pessimistic surrogate per token, and its clip statistics."""
    if clip_low <= 0 or clip_high <= 0:
        raise ValueError(f"clip bounds must be > 0, got clip_low={clip_low}, clip_high={clip_high}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(log_ratio.dtype).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
    if dual_clip is not None:
        # Dual-clip PPO: for A < 0 bound the loss by -dual_clip * A, so a huge ratio cannot blow it up.
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        surrogate = torch.where(advantages < 0, torch.maximum(surrogate, dual_clip * advantages), surrogate)
    with torch.no_grad():
        stats = {
            "ratio_mean": masked_mean(ratio, mask),
            # Tokens whose gradient the clip removed: pushed up past 1 + clip_high, or down past 1 - clip_low.
            "clip_frac_high": masked_mean(((ratio > 1 + clip_high) & (advantages > 0)).to(ratio.dtype), mask),
            "clip_frac_low": masked_mean(((ratio < 1 - clip_low) & (advantages < 0)).to(ratio.dtype), mask),
        }
    return surrogate, stats


def _policy_loss(
    log_ratio,
    logp,
    advantages,
    mask,
    *,
    clip_low,
    clip_high,
    dual_clip,
    loss_agg,
    max_len,
    loss_norm,
    ref_logp,
    beta_ref,
    extra_per_token=None,
):
    """-aggregate(surrogate) [+ extra per-token penalty] [+ beta_ref * KL_k3(pi || pi_ref)], with metrics."""
    surrogate, metrics = _clipped_surrogate(log_ratio, advantages, mask, clip_low, clip_high, dual_clip)
    per_token = -surrogate
    if extra_per_token is not None:
        per_token = per_token + extra_per_token
    if ref_logp is not None and beta_ref:
        ref_kl = kl_estimate(logp, ref_logp, "k3")
        per_token = per_token + beta_ref * ref_kl
        metrics["kl_ref"] = masked_mean(ref_kl.detach(), mask)
    loss = aggregate(per_token, mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    metrics["policy_loss"] = aggregate(-surrogate.detach(), mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    return loss, metrics


def _old_and_teacher_metrics(logp, old_logp, teacher_logp, mask):
    with torch.no_grad():
        metrics = {"kl_old": masked_mean(kl_estimate(logp, old_logp, "k3"), mask)}
        if teacher_logp is not None:
            metrics["kl_teacher"] = masked_mean(kl_estimate(logp, teacher_logp, "k3"), mask)
        return metrics


def grpo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.28,
    loss_agg="seq-mean-token-mean",
    dual_clip=None,
    ref_logp=None,
    beta_ref=0.0,
    max_len=None,
    loss_norm=None,
):
    """GRPO (clipped PPO surrogate on group advantages), optionally with a k3 KL to a reference."""
    loss, metrics = _policy_loss(
        logp - old_logp,
        logp,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        loss_agg=loss_agg,
        max_len=max_len,
        loss_norm=loss_norm,
        ref_logp=ref_logp,
        beta_ref=beta_ref,
    )
    metrics.update(_old_and_teacher_metrics(logp, old_logp, None, mask))
    return loss, metrics


def trrd_loss(
    logp,
    old_logp,
    teacher_logp,
    advantages,
    mask,
    *,
    alpha=0.5,
    clip_low=0.2,
    clip_high=0.28,
    teacher_log_ratio_clip=1.0,
    loss_agg="seq-mean-token-mean",
    dual_clip=None,
    ref_logp=None,
    beta_ref=0.0,
    max_len=None,
    loss_norm=None,
):
    """TRRD, the RLAD objective: a PPO ratio whose trust region is centred on old^alpha * teacher^(1-alpha).

    `teacher_log_ratio_clip` (c, the paper uses 1.0) clamps `logp - teacher_logp` to [-c, c]; None disables
    it. alpha = 1 is exactly `grpo_loss`; see the module docstring for the convention.
    """
    log_ratio, teacher_log_ratio = trrd_log_ratio(logp, old_logp, teacher_logp, alpha, teacher_log_ratio_clip)
    loss, metrics = _policy_loss(
        log_ratio,
        logp,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        loss_agg=loss_agg,
        max_len=max_len,
        loss_norm=loss_norm,
        ref_logp=ref_logp,
        beta_ref=beta_ref,
    )
    metrics.update(_teacher_ratio_metrics(teacher_log_ratio, teacher_log_ratio_clip, mask))
    metrics.update(_old_and_teacher_metrics(logp, old_logp, teacher_logp, mask))
    return loss, metrics


@torch.no_grad()
def _teacher_ratio_metrics(teacher_log_ratio, clip, mask) -> dict:
    """The mean of logp - teacher_logp, and the share of tokens whose teacher term the clamp holds constant."""
    outside = (
        teacher_log_ratio.abs() > clip if clip is not None else torch.zeros_like(teacher_log_ratio, dtype=torch.bool)
    )
    clamped = masked_mean(outside.to(teacher_log_ratio.dtype), mask)
    return {"teacher_log_ratio_mean": masked_mean(teacher_log_ratio, mask), "teacher_clamp_frac": clamped}


def trrd_log_ratio(logp, old_logp, teacher_logp, alpha: float = 0.5, teacher_log_ratio_clip: float | None = 1.0):
    """(log r_TRRD, logp - teacher_logp): `alpha * (logp - old_logp) + (1 - alpha) * clamp(logp - teacher_logp, -c,
    c)`, the log of a PPO ratio centred on old^alpha * teacher^(1 - alpha) (docs/method.md#trrd)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    teacher_log_ratio = logp - teacher_logp
    clamped = teacher_log_ratio
    if teacher_log_ratio_clip is not None:
        if teacher_log_ratio_clip <= 0:
            raise ValueError(f"teacher_log_ratio_clip must be > 0 or None, got {teacher_log_ratio_clip}")
        clamped = teacher_log_ratio.clamp(-teacher_log_ratio_clip, teacher_log_ratio_clip)
    return alpha * (logp - old_logp) + (1 - alpha) * clamped, teacher_log_ratio


def kdrl_loss(
    logp,
    old_logp,
    teacher_logp,
    advantages,
    mask,
    *,
    beta_kd,
    kl_estimator="k2",
    clip_low=0.2,
    clip_high=0.28,
    loss_agg="seq-mean-token-mean",
    dual_clip=None,
    ref_logp=None,
    beta_ref=0.0,
    max_len=None,
    loss_norm=None,
):
    """KDRL: GRPO plus `beta_kd` * KL(pi_S || pi_T) estimated on the sampled tokens.

    With all advantages zero this is on-policy KD alone (the teacher term with no reward).
    """
    teacher_kl = kl_estimate(logp, teacher_logp, kl_estimator)
    loss, metrics = _policy_loss(
        logp - old_logp,
        logp,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        loss_agg=loss_agg,
        max_len=max_len,
        loss_norm=loss_norm,
        ref_logp=ref_logp,
        beta_ref=beta_ref,
        extra_per_token=beta_kd * teacher_kl,
    )
    metrics["kd_loss"] = aggregate(teacher_kl.detach(), mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    metrics.update(_old_and_teacher_metrics(logp, old_logp, teacher_logp, mask))
    return loss, metrics


def kd_loss(
    logp,
    teacher_logp,
    mask,
    *,
    beta_kd,
    kl_estimator="k2",
    loss_agg="seq-mean-token-mean",
    ref_logp=None,
    beta_ref=0.0,
    max_len=None,
    loss_norm=None,
):
    """On-policy distillation with no reward: `beta_kd` * KL(pi_S || pi_T) on the student's own samples.

    The value and gradient are those of `kdrl_loss` with every advantage zero. With k2 (the default) the
    per-token gradient is `(logp - teacher_logp) * grad(logp)`, the score-function gradient of the reverse
    KL; k1's gradient, `grad(logp)`, has zero expectation on on-policy samples and trains nothing.
    """
    teacher_kl = kl_estimate(logp, teacher_logp, kl_estimator)
    per_token = beta_kd * teacher_kl
    metrics = {}
    if ref_logp is not None and beta_ref:
        ref_kl = kl_estimate(logp, ref_logp, "k3")
        per_token = per_token + beta_ref * ref_kl
        metrics["kl_ref"] = masked_mean(ref_kl.detach(), mask)
    loss = aggregate(per_token, mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    metrics["kd_loss"] = aggregate(teacher_kl.detach(), mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    with torch.no_grad():
        metrics["kl_teacher"] = masked_mean(kl_estimate(logp, teacher_logp, "k3"), mask)
    return loss, metrics


def sft_loss(logp, mask, *, loss_agg="seq-mean-token-mean", max_len=None, loss_norm=None):
    """Negative log-likelihood of the given (teacher-written, reward-filtered) tokens: offline distillation."""
    loss = aggregate(-logp, mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    return loss, {"policy_loss": loss.detach()}
