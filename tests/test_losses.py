"""The losses against METHOD.md: hand-computed cases, GRPO equivalence, clipping through gradients, gradcheck."""

import math

import pytest
import torch

from rlad_ds.losses import aggregate, grpo_loss, kdrl_loss, kl_estimate, masked_mean, sft_loss, trrd_loss

AGGS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def lp(*probs):
    return torch.tensor([list(map(math.log, probs))], dtype=torch.float64)


def grad_of(loss_fn, logp, *args, **kwargs):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = loss_fn(logp, *args, **kwargs)
    loss.backward()
    return loss.detach(), logp.grad, metrics


def random_batch(B=4, T=7, seed=0, dtype=torch.float64, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2 - 0.1
    old = logp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    teacher = logp + 3 * spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, teacher, adv, mask


# ---- aggregation -------------------------------------------------------------------------------------------


def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(x, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(x, mask, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate(x, mask.bool(), "seq-mean-token-sum-norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(x, mask, "sum")


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_add_up_with_loss_norm(agg):
    logp, old, teacher, adv, mask = random_batch(B=6, T=5, seed=3, spread=0.5)
    full, _ = trrd_loss(logp, old, teacher, adv, mask, loss_agg=agg, max_len=5)
    norm = mask.sum().item() if agg == "token-mean" else 6
    parts = [
        trrd_loss(logp[s], old[s], teacher[s], adv[s], mask[s], loss_agg=agg, max_len=5, loss_norm=norm)[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    ]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-12)


def test_masked_mean_and_kl_estimators():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])).item() == 2.0
    assert masked_mean(torch.tensor([1.0]), torch.tensor([0])).item() == 0.0
    p, q = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(p, q, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(p, q, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(p, q, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # exp(q)-1-q, q=log(1/2)
    logp, _, teacher, _, _ = random_batch(spread=1.0)
    assert (kl_estimate(logp, teacher, "k3") >= 0).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(p, q, "k4")


# ---- TRRD by hand ------------------------------------------------------------------------------------------


def test_trrd_hand_case_inside_trust_region():
    # log r = 0.5*log(0.5/0.4) + 0.5*log(0.5/0.8) -> r = sqrt(1.25 * 0.625) = 0.88388, inside [0.8, 1.28].
    r = math.sqrt(1.25 * 0.625)
    for a in (1.0, -1.0):
        loss, grad, m = grad_of(
            trrd_loss, lp(0.5), lp(0.4), lp(0.8), torch.tensor([a], dtype=torch.float64), torch.ones(1, 1)
        )
        assert loss.item() == pytest.approx(-a * r)
        assert grad.item() == pytest.approx(-a * r)  # d(-A r)/dlogp = -A r (alpha + 1 - alpha)
        assert m["ratio_mean"] == pytest.approx(r)
        assert m["teacher_log_ratio_mean"] == pytest.approx(math.log(0.625))
        assert m["teacher_clamp_frac"] == 0.0 and m["clip_frac_high"] == 0.0 and m["clip_frac_low"] == 0.0


def test_trrd_hand_case_with_teacher_clamp_and_clip():
    # teacher log-ratio log(0.5/0.1) = 1.609 is clamped to 1: log r = 0.5*log(1.25) + 0.5 -> r = 1.8434.
    r = math.exp(0.5 * math.log(1.25) + 0.5)
    mask = torch.ones(1, 1)
    loss, grad, m = grad_of(trrd_loss, lp(0.5), lp(0.4), lp(0.1), torch.tensor([1.0], dtype=torch.float64), mask)
    assert loss.item() == pytest.approx(-1.28)  # clipped at 1 + clip_high
    assert grad.item() == 0.0
    assert m["clip_frac_high"] == 1.0 and m["teacher_clamp_frac"] == 1.0
    loss, grad, m = grad_of(trrd_loss, lp(0.5), lp(0.4), lp(0.1), torch.tensor([-1.0], dtype=torch.float64), mask)
    assert loss.item() == pytest.approx(r)  # min(-r, -1.28) = -r: the pessimistic side is unclipped
    assert grad.item() == pytest.approx(0.5 * r)  # only the alpha share flows through a clamped teacher term
    # Without the clamp the full teacher log-ratio enters and the whole ratio gradient flows.
    r_free = math.exp(0.5 * math.log(1.25) + 0.5 * math.log(5))
    loss, grad, m = grad_of(
        trrd_loss,
        lp(0.5),
        lp(0.4),
        lp(0.1),
        torch.tensor([-1.0], dtype=torch.float64),
        mask,
        teacher_log_ratio_clip=None,
    )
    assert loss.item() == pytest.approx(r_free) and grad.item() == pytest.approx(r_free)
    assert m["teacher_clamp_frac"] == 0.0


def test_equal_logprobs_give_ratio_one_and_minus_mean_advantage():
    logp = torch.full((3, 4), -1.3, dtype=torch.float64)
    adv = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    for agg in AGGS:
        loss, m = trrd_loss(logp, logp, logp, adv, mask, loss_agg=agg)
        expected = -aggregate(adv[:, None].expand(3, 4), mask, agg)
        assert loss.item() == pytest.approx(expected.item()) and m["ratio_mean"] == pytest.approx(1.0)
    loss, _ = trrd_loss(logp, logp, logp, adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item())


def test_first_epoch_ratio_is_the_teacher_view():
    # logp == old_logp: log r reduces to (1 - alpha) * clamp(logp - teacher_logp).
    logp, _, teacher, adv, mask = random_batch(spread=0.2)
    _, m = trrd_loss(logp, logp, teacher, adv, mask, alpha=0.3)
    expected = masked_mean(torch.exp(0.7 * (logp - teacher).clamp(-1, 1)), mask)
    assert m["ratio_mean"] == pytest.approx(expected.item())


# ---- GRPO equivalence, zero advantage, clipping, padding -----------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
def test_alpha_one_is_exactly_grpo(agg):
    logp, old, teacher, adv, mask = random_batch(spread=0.4)
    l1, g1, _ = grad_of(trrd_loss, logp, old, teacher, adv, mask, alpha=1.0, loss_agg=agg)
    l2, g2, _ = grad_of(grpo_loss, logp, old, adv, mask, loss_agg=agg)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_zero_advantage_zero_gradient():
    logp, old, teacher, _, mask = random_batch(spread=0.5)
    zero = torch.zeros(logp.shape[0], dtype=logp.dtype)
    for fn, args in ((trrd_loss, (old, teacher)), (grpo_loss, (old,))):
        loss, grad, _ = grad_of(fn, logp, *args, zero, mask)
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    # KDRL with zero advantage is on-policy KD alone: the teacher term still pulls.
    _, grad, m = grad_of(kdrl_loss, logp, old, teacher, zero, mask, beta_kd=0.1)
    assert torch.count_nonzero(grad[mask]) > 0 and m["kd_loss"] > 0


@pytest.mark.parametrize("fn", ["trrd", "grpo"])
def test_clip_bounds_through_gradients(fn):
    # old_logp = teacher_logp so that the TRRD ratio is r = pi / pi_old, as for GRPO.
    def g(ratio, adv):
        logp, old = torch.tensor([[math.log(0.3 * ratio)]], dtype=torch.float64), lp(0.3)
        if fn == "trrd":
            return grad_of(
                trrd_loss,
                logp,
                old,
                old,
                torch.tensor([adv], dtype=torch.float64),
                torch.ones(1, 1),
                clip_low=0.2,
                clip_high=0.28,
            )[1].item()
        return grad_of(
            grpo_loss,
            logp,
            old,
            torch.tensor([adv], dtype=torch.float64),
            torch.ones(1, 1),
            clip_low=0.2,
            clip_high=0.28,
        )[1].item()

    assert g(1.27, 1.0) == pytest.approx(-1.27) and g(1.29, 1.0) == 0.0  # positive A clips at 1 + clip_high
    assert g(0.81, -1.0) == pytest.approx(0.81) and g(0.79, -1.0) == 0.0  # negative A clips at 1 - clip_low
    assert g(0.5, 1.0) == pytest.approx(-0.5) and g(1.5, -1.0) == pytest.approx(1.5)  # pessimistic side is free


def test_asymmetric_clip_metrics():
    logp = torch.tensor([[math.log(0.3 * 1.3), math.log(0.3 * 0.7), math.log(0.3)]], dtype=torch.float64)
    old = torch.full_like(logp, math.log(0.3))
    _, m = grpo_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3))
    assert m["clip_frac_high"] == pytest.approx(1 / 3) and m["clip_frac_low"] == 0.0
    _, m = grpo_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 3))
    assert m["clip_frac_low"] == pytest.approx(1 / 3) and m["clip_frac_high"] == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    logp, old = lp(0.9), lp(0.09)  # ratio 10
    adv = torch.tensor([-1.0], dtype=torch.float64)
    loss, _ = grpo_loss(logp, old, adv, torch.ones(1, 1))
    assert loss.item() == pytest.approx(10.0)
    loss, grad, _ = grad_of(grpo_loss, logp, old, adv, torch.ones(1, 1), dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and grad.item() == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        grpo_loss(logp, old, adv, torch.ones(1, 1), dual_clip=0.5)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("method", ["trrd", "grpo", "kdrl"])
def test_padding_never_changes_the_loss(agg, method):
    logp, old, teacher, adv, mask = random_batch(spread=0.5)
    ref = logp - 0.1

    def run(lp_, old_, teacher_, ref_, mask_):
        kwargs = dict(loss_agg=agg, max_len=10, ref_logp=ref_, beta_ref=0.05)
        if method == "trrd":
            return grad_of(trrd_loss, lp_, old_, teacher_, adv, mask_, **kwargs)
        if method == "grpo":
            return grad_of(grpo_loss, lp_, old_, adv, mask_, **kwargs)
        return grad_of(kdrl_loss, lp_, old_, teacher_, adv, mask_, beta_kd=0.2, **kwargs)

    base_loss, base_grad, _ = run(logp, old, teacher, ref, mask)
    # Garbage (even inf/nan-free extremes) in padded positions and 3 extra padded columns change nothing.
    g = torch.Generator().manual_seed(9)
    pad = lambda x: torch.cat([x, -50 * torch.rand(x.shape[0], 3, generator=g, dtype=x.dtype)], 1)  # noqa: E731
    junk = lambda x: torch.where(mask, x, torch.full_like(x, -30.0))  # noqa: E731
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], 3, dtype=torch.bool)], 1)
    loss, grad, _ = run(pad(junk(logp)), pad(junk(old)), pad(teacher), pad(ref), padded_mask)
    assert loss.item() == pytest.approx(base_loss.item(), rel=1e-12)
    assert torch.allclose(grad[:, :-3][mask], base_grad[mask]) and torch.count_nonzero(grad[~padded_mask]) == 0


def test_gradcheck_float64():
    logp, old, teacher, adv, mask = random_batch(B=3, T=5, seed=1, spread=0.7)
    ref = old - 0.2
    for agg in AGGS:
        assert torch.autograd.gradcheck(
            lambda x, agg=agg: trrd_loss(x, old, teacher, adv, mask, loss_agg=agg, ref_logp=ref, beta_ref=0.1)[0],
            (logp.clone().requires_grad_(True),),
        )
        assert torch.autograd.gradcheck(
            lambda x, agg=agg: kdrl_loss(x, old, teacher, adv, mask, beta_kd=0.3, kl_estimator="k3", loss_agg=agg)[0],
            (logp.clone().requires_grad_(True),),
        )


def test_reference_kl_term_and_kdrl_value():
    logp, old, teacher, adv, mask = random_batch(spread=0.3)
    ref = logp + 0.25
    base, _ = grpo_loss(logp, old, adv, mask)
    with_ref, m = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta_ref=0.1)
    k3 = kl_estimate(logp, ref, "k3")
    assert (with_ref - base).item() == pytest.approx(0.1 * aggregate(k3, mask).item())
    assert m["kl_ref"] == pytest.approx(masked_mean(k3, mask).item())
    for est in ("k1", "k2", "k3"):
        kd, m = kdrl_loss(logp, old, teacher, adv, mask, beta_kd=0.5, kl_estimator=est)
        assert (kd - base).item() == pytest.approx(0.5 * aggregate(kl_estimate(logp, teacher, est), mask).item())


def test_low_precision_inputs_and_validation():
    logp, old, teacher, adv, mask = random_batch(dtype=torch.bfloat16, spread=0.1)
    loss, m = trrd_loss(logp, old, teacher, adv, mask)
    assert loss.dtype == torch.bfloat16 and math.isfinite(loss.item()) and math.isfinite(m["kl_teacher"])
    adv_tokens = adv[:, None].expand_as(logp)
    assert trrd_loss(logp, old, teacher, adv_tokens, mask)[0].item() == loss.item()
    with pytest.raises(ValueError, match="alpha"):
        trrd_loss(logp, old, teacher, adv, mask, alpha=1.5)
    with pytest.raises(ValueError, match="clip"):
        trrd_loss(logp, old, teacher, adv, mask, clip_low=0.0)
    with pytest.raises(ValueError, match="teacher_log_ratio_clip"):
        trrd_loss(logp, old, teacher, adv, mask, teacher_log_ratio_clip=0)


def test_sft_loss_is_masked_nll():
    logp = torch.tensor([[-1.0, -2.0, -7.0]])
    loss, _ = sft_loss(logp, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(1.5)
