"""The rollout correction (`rlad_ds.losses.rollout_correction`) against its definition, by hand: each level, statistic,
action and weight, inclusive bounds, rows it drops; the presets; the mismatch metrics; the weights inside every loss
that reweights; normalisers that leave empty rows out; the trainer's glue (`rlad_ds.sampler_mismatch`)."""

import math

import pytest
import torch

from rlad_ds.batch import Batch
from rlad_ds.config.parsing import config_from_layers
from rlad_ds.loss_terms import aggregate, loss_denominator, nonempty_rows
from rlad_ds.losses import grpo_loss, kd_loss, kdrl_loss, rollout_correction, rollout_ratio, sft_loss, trrd_loss
from rlad_ds.sampler_mismatch import PRESETS, SamplerCorrection, mismatch_metrics, resolve

F64 = torch.float64


def logps(log_ratios, mask=None):
    """old_logp, rollout_logp whose differences are `log_ratios` (rows of per-token log ratios), and the mask."""
    log_ratio = torch.tensor(log_ratios, dtype=F64)
    rollout = -torch.rand(log_ratio.shape, generator=torch.Generator().manual_seed(0), dtype=F64) - 0.5
    mask = torch.ones_like(log_ratio, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    return rollout + log_ratio, rollout, mask


def test_token_truncate_clamps_each_ratio_and_keeps_the_mask():
    old, rollout, mask = logps([[math.log(3.0), 0.0, math.log(0.1), 5.0]], [[1, 1, 1, 0]])
    weights, keep = rollout_correction(old, rollout, mask)  # defaults: token, truncate, high 2
    assert weights.tolist()[0][:3] == pytest.approx([2.0, 1.0, 0.1]) and weights[0, 3] == 0  # 0 off the mask
    assert torch.equal(keep, mask) and keep.dtype == torch.bool
    weights, _ = rollout_correction(old, rollout, mask.double(), low=0.5, high=None)
    assert weights.tolist()[0][:3] == pytest.approx([3.0, 1.0, 0.5])
    weights, _ = rollout_correction(old, rollout, mask, low=None, high=None)  # no bound: the plain ratio
    assert weights.tolist()[0][:3] == pytest.approx([3.0, 1.0, 0.1])


def test_weights_carry_no_gradient():
    old, rollout, mask = logps([[0.3, -0.2]])
    weights, _ = rollout_correction(old.requires_grad_(), rollout, mask)
    assert not weights.requires_grad


def test_sequence_level_is_the_product_or_the_geometric_mean_of_the_row():
    rows = [[0.1, 0.2, -0.4, 9.0], [0.3, 0.0, 0.0, 0.0]]
    old, rollout, mask = logps(rows, [[1, 1, 1, 0], [1, 0, 0, 0]])
    product = rollout_ratio(old, rollout, mask, "sequence", "sum")
    geometric = rollout_ratio(old, rollout, mask, "sequence", "mean")
    assert product[0].tolist() == pytest.approx([math.exp(-0.1)] * 4)  # the masked 9.0 is not in it
    assert geometric[0].tolist() == pytest.approx([math.exp(-0.1 / 3)] * 4)
    assert product[1].tolist() == pytest.approx([math.exp(0.3)] * 4) == geometric[1].tolist()
    weights, _ = rollout_correction(old, rollout, mask, level="sequence", high=1.2)
    assert weights[0].tolist() == pytest.approx([math.exp(-0.1)] * 3 + [0.0])
    assert weights[1].tolist() == pytest.approx([1.2, 0, 0, 0])


def test_mask_bounds_are_inclusive_and_none_is_unbounded():
    old, rollout, mask = logps([[0.5, -0.5, 0.0]])
    x = rollout_ratio(old, rollout, mask)
    low, high = x[0, 1].item(), x[0, 0].item()
    weights, keep = rollout_correction(old, rollout, mask, action="mask", low=low, high=high)
    assert torch.equal(weights, x) and keep.all()  # both ends pass
    weights, _ = rollout_correction(old, rollout, mask, action="mask", low=math.nextafter(low, 2), high=high)
    assert weights[0, 1] == 0 and weights[0, 0] > 0
    weights, _ = rollout_correction(old, rollout, mask, action="mask", low=low, high=math.nextafter(high, 0))
    assert weights[0, 0] == 0 and weights[0, 1] > 0
    weights, _ = rollout_correction(old, rollout, mask, action="mask", low=None, high=None)
    assert torch.equal(weights, x)


@pytest.mark.parametrize("weight", ["ratio", "token", "one"])
def test_mask_weights_are_the_base_where_the_unit_passes(weight):
    old, rollout, mask = logps([[0.1, -0.3], [2.0, 0.5]])  # geometric means exp(-0.1) and exp(1.25)
    weights, keep = rollout_correction(
        old, rollout, mask, level="sequence", statistic="mean", action="mask", low=0.5, high=2.0, weight=weight
    )
    base = {"ratio": [math.exp(-0.1)] * 2, "token": [math.exp(0.1), math.exp(-0.3)], "one": [1.0, 1.0]}[weight]
    assert weights[0].tolist() == pytest.approx(base) and weights[1].tolist() == [0.0, 0.0]
    assert keep.all()  # rejected rows stay in the normaliser unless drop_rejected


def test_drop_rejected_takes_rejected_tokens_out_of_keep():
    old, rollout, mask = logps([[0.1, 3.0, 0.0]], [[1, 1, 0]])
    weights, keep = rollout_correction(old, rollout, mask.float(), action="mask", high=2.0, drop_rejected=True)
    assert keep.tolist() == [[1.0, 0.0, 0.0]] and keep.dtype == torch.float32
    assert weights.tolist()[0] == pytest.approx([math.exp(0.1), 0.0, 0.0])


def test_huge_sums_give_finite_weights_and_no_nan():
    old, rollout, mask = logps([[400.0, 400.0, 400.0], [-400.0, -400.0, 0.0]], [[1, 1, 0], [1, 1, 1]])
    old, rollout = old.float(), rollout.float()  # exp(800) is inf in fp32
    for action in ("truncate", "mask"):
        weights, _ = rollout_correction(old, rollout, mask, level="sequence", action=action, low=0.5, high=2.0)
        assert torch.isfinite(weights).all(), action
    weights, _ = rollout_correction(old, rollout, mask, level="sequence", low=0.5, high=2.0)
    assert weights.tolist() == [[2.0, 2.0, 0.0], [0.5, 0.5, 0.5]]


def test_bad_arguments_are_refused():
    old, rollout, mask = logps([[0.0]])
    for kwargs, message in (
        ({"level": "row"}, "level"),
        ({"statistic": "max"}, "statistic"),
        ({"action": "clip"}, "action"),
        ({"weight": "half"}, "weight"),
        ({"low": 3.0, "high": 2.0}, "above the upper bound"),
    ):
        with pytest.raises(ValueError, match=message):
            rollout_correction(old, rollout, mask, **kwargs)


# ---- presets -----------------------------------------------------------------------------------------------------


def test_each_preset_is_one_setting_of_the_function():
    table = {name: (p.options["level"], p.options["statistic"], p.options["action"], p.options["weight"],
                    p.options["drop_rejected"], p.low, p.high) for name, p in PRESETS.items()}  # fmt: skip
    assert table == {
        "tis": ("token", "sum", "truncate", "ratio", False, None, 2.0),
        "icepop": ("token", "sum", "mask", "ratio", False, 0.5, 5.0),
        "seq_tis": ("sequence", "sum", "truncate", "ratio", False, None, 2.0),
        "seq_mask": ("sequence", "sum", "mask", "ratio", False, None, 3.0),
        "seq_mask_tis": ("sequence", "mean", "mask", "token", False, 0.5, 5.0),
        "geo_rs": ("sequence", "mean", "mask", "one", True, 1 / 1.001, 1 / 0.999),
    }
    assert PRESETS["icepop"].kwargs(None, 4.0) == {**PRESETS["icepop"].options, "low": 0.5, "high": 4.0}


def test_auto_is_tis_for_a_sampler_with_log_probs_and_off_otherwise():
    assert resolve("auto", sampler_logprobs=True, accepted=True).name == "tis"
    assert resolve("auto", sampler_logprobs=False, accepted=True) is None
    assert resolve("icepop", sampler_logprobs=True, accepted=True).name == "icepop"
    assert resolve("none", sampler_logprobs=True, accepted=True) is None
    assert resolve("auto", sampler_logprobs=True, accepted=False) is None  # sft


# ---- mismatch metrics ----------------------------------------------------------------------------------------------


def test_mismatch_metrics():
    old, rollout, mask = logps([[math.log(3.0), 0.0, math.log(0.25), 7.0]], [[1, 1, 1, 0]])
    options = PRESETS["tis"].kwargs(None, None)
    m = mismatch_metrics(old, rollout, mask, options)
    k3 = [r - 1 - math.log(r) for r in (3.0, 1.0, 0.25)]  # KL(sampler || trainer): q = log(trainer / sampler)
    assert m["rollout_kl"].item() == pytest.approx(sum(k3) / 3)
    assert m["rollout_ratio_max"].item() == pytest.approx(3.0)  # the masked exp(7) is not the max
    assert m["rollout_corrected_frac"].item() == pytest.approx(1 / 3)  # only 3 > 2 is truncated
    icepop = mismatch_metrics(old, rollout, mask, PRESETS["icepop"].kwargs(None, None))
    assert icepop["rollout_corrected_frac"].item() == pytest.approx(1 / 3)  # 0.25 < 0.5 is rejected
    off = mismatch_metrics(old, rollout, mask, {})
    assert off["rollout_corrected_frac"].item() == 0 and off["rollout_kl"].item() == pytest.approx(sum(k3) / 3)
    equal = mismatch_metrics(rollout, rollout, mask, options)
    assert equal["rollout_kl"].item() == 0 and equal["rollout_ratio_max"].item() == 1


# ---- the weights inside the losses ---------------------------------------------------------------------------------


def case(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 2 - 0.1
    old = logp + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
    teacher = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.2
    weights = torch.rand(B, T, generator=g, dtype=F64) * 2
    return logp, old, teacher, ref, adv, mask, weights


LOSSES = {
    "grpo": lambda lp, o, t, r, a, m, **k: grpo_loss(lp, o, a, m, ref_logp=r, beta_ref=0.1, **k),
    "rlad": lambda lp, o, t, r, a, m, **k: trrd_loss(lp, o, t, a, m, ref_logp=r, beta_ref=0.1, **k),
    "kdrl": lambda lp, o, t, r, a, m, **k: kdrl_loss(lp, o, t, a, m, beta_kd=0.3, ref_logp=r, beta_ref=0.1, **k),
    "kd": lambda lp, o, t, r, a, m, **k: kd_loss(lp, t, m, beta_kd=0.3, ref_logp=r, beta_ref=0.1, **k),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_weights_multiply_every_per_token_term(name):
    """Each token's gradient is its unweighted gradient times its weight (every term of these losses is one whose
    estimator assumes the old policy drew the tokens), and weights of one change nothing."""
    logp, old, teacher, ref, adv, mask, weights = case()
    fn = LOSSES[name]
    plain, _ = fn(logp, old, teacher, ref, adv, mask, loss_agg="token-mean")
    ones, _ = fn(logp, old, teacher, ref, adv, mask, loss_agg="token-mean", is_weights=torch.ones_like(weights))
    assert ones.item() == pytest.approx(plain.item(), rel=1e-14)
    grads = []
    for w in (None, weights):
        x = logp.clone().requires_grad_()
        fn(x, old, teacher, ref, adv, mask, loss_agg="token-mean", is_weights=w)[0].backward()
        grads.append(x.grad)
    assert torch.allclose(grads[1], grads[0] * weights, rtol=1e-12, atol=1e-15)


def test_kdrl_logged_parts_still_add_up_with_weights():
    logp, old, teacher, _, adv, mask, weights = case(seed=2)
    loss, m = kdrl_loss(logp, old, teacher, adv, mask, beta_kd=0.3, is_weights=weights)
    assert loss.item() == pytest.approx(m["policy_loss"].item() + 0.3 * m["kd_loss"].item(), rel=1e-12)


# ---- normalisers that leave empty rows out -------------------------------------------------------------------------


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_a_row_with_no_loss_token_is_not_a_sequence_of_the_mean(agg):
    """An sft row whose teacher trace failed does not scale the step down: the loss is the mean over the rows that
    have loss tokens, as if the empty row were not in the batch, and micro-batches still add up."""
    logp = -torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with_empty, _ = sft_loss(logp, mask, loss_agg=agg, max_len=4)
    without, _ = sft_loss(logp[[0, 2]], mask[[0, 2]], loss_agg=agg, max_len=4)
    assert with_empty.item() == pytest.approx(without.item(), rel=1e-14)
    assert nonempty_rows(mask).item() == 2 and loss_denominator(mask, agg).item() == 2
    assert loss_denominator(mask, "token-mean").item() == 6
    norm = loss_denominator(mask, agg).item()
    parts = [aggregate(-logp[s], mask[s], agg, max_len=4, loss_norm=norm) for s in (slice(0, 2), slice(2, 3))]
    assert sum(parts).item() == pytest.approx(with_empty.item(), rel=1e-14)
    assert aggregate(logp, torch.zeros_like(mask), agg).item() == 0.0  # nothing to learn: 0, not nan


# ---- the trainer's glue --------------------------------------------------------------------------------------------


def loss_cfg(name="auto", **bounds):
    layers = {"loss": {"rollout_correction": name, **bounds}}
    if name not in ("auto", "none"):
        layers["rollout"] = {"rollout": "vllm"}
    return config_from_layers({"model": {"student": "s", "teacher": "t"}}, layers).loss


def micro(seed=0, sampler=True):
    logp, _, _, _, adv, mask, _ = case(seed)
    # With one PPO epoch old_logp is logp itself: rows 0 and 2 are far from the sampler, rows 1 and 3 match it.
    rollout = logp - torch.log(torch.tensor([[3.0], [1.0], [0.3], [1.0]], dtype=F64))
    return logp, Batch(loss_mask=mask, advantages=adv, rollout_logp=rollout if sampler else None)


def test_for_loss_hands_the_loss_the_kept_tokens_and_the_weights():
    logp, batch = micro()
    correction = SamplerCorrection(loss_cfg("geo_rs"), sampler_logprobs=True, accepted=True)
    assert correction.drops_rows
    corrected, metrics = correction.for_loss(batch, logp)
    weights, keep = rollout_correction(logp, batch.rollout_logp, batch.loss_mask, **correction.options)
    assert torch.equal(corrected.loss_mask, keep) and torch.equal(corrected.correction_weights, weights)
    assert not keep[0].any() and not keep[2].any() and torch.equal(keep[1], batch.loss_mask[1])
    assert set(metrics) == {"rollout_kl", "rollout_ratio_max", "rollout_corrected_frac"}
    assert metrics["rollout_ratio_max"].item() == pytest.approx(3.0)


def test_weighed_batch_is_sliced_not_recomputed_and_off_is_metrics_only():
    logp, batch = micro(1)
    correction = SamplerCorrection(loss_cfg("geo_rs", rollout_correction_high=1.5), True, True)
    batch.old_logp = logp + 0.01
    correction.weigh_batch(batch)
    assert batch.correction_keep is not None and correction.options["high"] == 1.5
    part = batch.micro(torch.tensor([0, 2]), slice(0, 6))
    corrected, _ = correction.for_loss(part, logp[[0, 2]])
    assert torch.equal(corrected.loss_mask, batch.correction_keep[[0, 2]])
    off = SamplerCorrection(loss_cfg("none"), True, True)
    same, metrics = off.for_loss(batch, logp)
    assert same is batch and metrics["rollout_corrected_frac"].item() == 0
    without, none = SamplerCorrection(loss_cfg(), True, True).for_loss(micro(sampler=False)[1], logp)
    assert none == {} and without.correction_weights is None
