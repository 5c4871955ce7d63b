"""Every loss of the trainer: TRRD (the RLAD method), GRPO, KDRL, KD and SFT, and the rollout correction for
tokens a sampler other than the old policy drew (`rollout_correction`). docs/method.md derives each formula and
its conventions; the KL estimators and aggregations they are built of are `rlad_ds.loss_terms`'.

Pure torch, no DeepSpeed. Shapes: log-prob tensors are `[B, T]` (any float dtype) on the *sampled*
tokens; `advantages` is `[B]` (one per sequence) or `[B, T]`; `mask` is `[B, T]` (bool or float), 1 on
response tokens that count. Every loss returns `(loss, metrics)`: the scalar to minimise and a dict of
detached 0-dim tensors (or floats), so that a trainer can reduce them without a host transfer per micro-batch:

    log r_TRRD = alpha * (logp - old_logp) + (1 - alpha) * clamp(logp - teacher_logp, -c, c)
    surr       = min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
    loss       = -aggregate(w * surr) + beta_ref * aggregate(w * KL_k3(pi_S || pi_ref))

with `w` the rollout correction's weights (`is_weights`, 1 when none) and `aggregate` over its `keep` mask.

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

from rlad_ds.loss_terms import aggregate, kl_estimate, masked_mean

# Metrics that are shares of the batch loss (normalised by the whole batch): micro-batch values add up.
LOSS_PARTS = ("policy_loss", "kd_loss")


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
    is_weights,
    extra_per_token=None,
):
    """-aggregate(w * surrogate) [+ w * extra per-token penalty] [+ beta_ref * w * KL_k3(pi || pi_ref)], with
    metrics; `w` = `is_weights`, the rollout correction's (none: 1)."""
    surrogate, metrics = _clipped_surrogate(log_ratio, advantages, mask, clip_low, clip_high, dual_clip)
    surrogate = _weighted(surrogate, is_weights)
    per_token = -surrogate
    if extra_per_token is not None:
        per_token = per_token + _weighted(extra_per_token, is_weights)
    per_token = per_token + _reference_term(logp, ref_logp, beta_ref, mask, is_weights, metrics)
    loss = aggregate(per_token, mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    metrics["policy_loss"] = aggregate(-surrogate.detach(), mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    return loss, metrics


def _weighted(per_token, is_weights):
    """A per-token term whose estimator assumes the old policy drew the tokens, reweighted for the sampler that did
    (docs/method.md#rollout-correction); unchanged without weights."""
    return per_token if is_weights is None else per_token * is_weights


def _reference_term(logp, ref_logp, beta_ref, mask, is_weights, metrics):
    """beta_ref * w * KL_k3(pi || pi_ref) per token (0 without a reference), its mean into `metrics`."""
    if ref_logp is None or not beta_ref:
        return 0.0
    ref_kl = kl_estimate(logp, ref_logp, "k3")
    metrics["kl_ref"] = masked_mean(ref_kl.detach(), mask)
    return beta_ref * _weighted(ref_kl, is_weights)


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
    is_weights=None,
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
        is_weights=is_weights,
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
    is_weights=None,
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
        is_weights=is_weights,
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
    is_weights=None,
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
        is_weights=is_weights,
        extra_per_token=beta_kd * teacher_kl,
    )
    weighted_kl = _weighted(teacher_kl.detach(), is_weights)
    metrics["kd_loss"] = aggregate(weighted_kl, mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
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
    is_weights=None,
):
    """On-policy distillation with no reward: `beta_kd` * KL(pi_S || pi_T) on the student's own samples.

    The value and gradient are those of `kdrl_loss` with every advantage zero. With k2 (the default) the
    per-token gradient is `(logp - teacher_logp) * grad(logp)`, the score-function gradient of the reverse
    KL; k1's gradient, `grad(logp)`, has zero expectation on on-policy samples and trains nothing.
    """
    teacher_kl = _weighted(kl_estimate(logp, teacher_logp, kl_estimator), is_weights)
    metrics = {}
    per_token = beta_kd * teacher_kl + _reference_term(logp, ref_logp, beta_ref, mask, is_weights, metrics)
    loss = aggregate(per_token, mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    metrics["kd_loss"] = aggregate(teacher_kl.detach(), mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    with torch.no_grad():
        metrics["kl_teacher"] = masked_mean(kl_estimate(logp, teacher_logp, "k3"), mask)
    return loss, metrics


def sft_loss(logp, mask, *, loss_agg="seq-mean-token-mean", max_len=None, loss_norm=None):
    """Negative log-likelihood of the given (teacher-written, reward-filtered) tokens: offline distillation."""
    loss = aggregate(-logp, mask, loss_agg, max_len=max_len, loss_norm=loss_norm)
    return loss, {"policy_loss": loss.detach()}


# ---- rollout correction: the sampler is not the trainer -----------------------------------------------------


def rollout_ratio(old_logp, rollout_logp, mask, level: str = "token", statistic: str = "sum") -> torch.Tensor:
    """The quantity `rollout_correction` tests, `[B, T]` (no grad): with l_t = old_logp - rollout_logp on the
    tokens of `mask` (0 elsewhere), r_t = exp(l_t) per token (`level="token"`), or one value per row broadcast over
    it (`level="sequence"`): exp(sum_t l_t), the product of the ratios (`statistic="sum"`), or exp(mean_t l_t),
    their geometric mean (`"mean"`)."""
    if level not in ("token", "sequence") or statistic not in ("sum", "mean"):
        raise ValueError(f"level must be token or sequence and statistic sum or mean, got {level!r}, {statistic!r}")
    with torch.no_grad():
        mask = mask.to(old_logp.dtype)
        log_ratio = (old_logp - rollout_logp) * mask
        if level == "token":
            return log_ratio.exp()
        total = log_ratio.sum(-1, keepdim=True)
        if statistic == "mean":
            total = total / mask.sum(-1, keepdim=True).clamp_min(1)
        return total.exp().expand_as(log_ratio)


def within(x: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    """low <= x <= high elementwise, both bounds inclusive; a bound of None is no bound."""
    inside = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        inside = inside & (x >= low)
    if high is not None:
        inside = inside & (x <= high)
    return inside


def rollout_correction(
    old_logp,
    rollout_logp,
    mask,
    *,
    level="token",
    statistic="sum",
    action="truncate",
    low=None,
    high=2.0,
    weight="ratio",
    drop_rejected=False,
):
    """`(weights, keep)`, both `[B, T]`, that correct a loss for tokens drawn by a sampler (`rollout_logp`, e.g.
    vLLM's) other than the old policy the loss assumes drew them (`old_logp`, the trainer's own forward).

    x is `rollout_ratio(old_logp, rollout_logp, mask, level, statistic)`. `action="truncate"`: weights =
    clamp(x, low, high), keep = mask. `action="mask"`: a token passes iff low <= x <= high (inclusive); weights =
    base where it passes and 0 elsewhere, base being x (`weight="ratio"`), the token's own exp(l_t) (`"token"`) or
    1 (`"one"`); keep = mask where it passes if `drop_rejected` (the rejected tokens leave the loss's normaliser
    too), else mask. A bound of None is no bound. `weights` carries no gradient and is 0 where `mask` is 0; `keep`
    has `mask`'s dtype. Every peer's correction is one setting of these (`rlad_ds.sampler_mismatch.PRESETS`;
    docs/rollout_correction.md); docs/method.md#rollout-correction derives where the weights enter the loss.
    """
    if action not in ("truncate", "mask") or weight not in ("ratio", "token", "one"):
        raise ValueError(f"action must be truncate or mask and weight ratio, token or one, got {action!r}, {weight!r}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"the lower bound {low} is above the upper bound {high}")
    x = rollout_ratio(old_logp, rollout_logp, mask, level, statistic)
    on = mask.bool()
    with torch.no_grad():
        if action == "truncate":
            weights, keep = (x if low is None and high is None else x.clamp(low, high)), on
        else:
            passed = within(x, low, high)
            bases = {"ratio": x, "one": torch.ones_like(x)}
            base = bases[weight] if weight in bases else rollout_ratio(old_logp, rollout_logp, mask)
            weights = torch.where(passed, base, torch.zeros_like(x))
            keep = on & passed if drop_rejected else on
        # where(), not a product: a weight of inf (exp of a huge sum) off the mask must give 0, not nan.
        return torch.where(on, weights, torch.zeros_like(weights)), keep.to(mask.dtype)
