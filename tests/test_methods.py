"""The method objects: what each declares, the combinations refused before anything loads, their losses."""

import math

import pytest
import torch

from rlad_ds.batch import Batch
from rlad_ds.config.parsing import config_from_layers
from rlad_ds.errors import ConfigError
from rlad_ds.losses import kd_loss, kdrl_loss
from rlad_ds.methods import METHODS, adapt_alpha, get_method

MODELS = {"model": {"student": "s", "teacher": "t"}}


def config(method, **sections):
    layers = {"loss": {"method": method, **sections.pop("loss", {})}, **sections}
    return config_from_layers(MODELS if get_method(method).needs_teacher else {"model": {"student": "s"}}, layers)


def test_what_each_method_declares():
    table = {
        name: (m.teacher_scores, m.teacher_generates, m.uses_advantages, m.uses_ratio) for name, m in METHODS.items()
    }
    assert table == {
        "rlad": (True, False, True, True),
        "grpo": (False, False, True, True),
        "kdrl": (True, False, True, True),
        "kd": (True, False, False, False),
        "sft": (False, True, False, False),
    }
    assert [name for name, m in METHODS.items() if m.needs_teacher] == ["rlad", "kdrl", "kd", "sft"]
    with pytest.raises(ConfigError, match="--method 'ppo' is unknown; use one of rlad, grpo, kdrl, kd, sft"):
        get_method("ppo")


@pytest.mark.parametrize(
    "method, layers, message",
    [
        ("grpo", {"loss": {"alpha": 0.3}}, "--alpha does nothing with --method grpo; it is read by --method rlad"),
        ("kdrl", {"loss": {"adaptive_alpha": True}}, "--adaptive_alpha does nothing with --method kdrl"),
        (
            "grpo",
            {"loss": {"beta_kd": 1.0}},
            "--beta_kd does nothing with --method grpo; it is read by --method kdrl, kd",
        ),
        ("rlad", {"loss": {"kl_estimator": "k3"}}, "--kl_estimator does nothing with --method rlad"),
        ("sft", {"loss": {"clip_high": 0.3}}, "--clip_high does nothing with --method sft"),
        ("kd", {"loss": {"teacher_log_ratio_clip": None}}, "--teacher_log_ratio_clip does nothing with --method kd"),
        ("rlad", {"loss": {"alpha_max": 0.8}}, "--alpha_min / --alpha_max bound the adaptive alpha only"),
        ("grpo", {"model": {"teacher": "t"}}, "--method grpo uses no teacher: drop --teacher"),
        ("grpo", {"model": {"teacher_offload": "on"}}, "--method grpo uses no teacher: drop --teacher_offload"),
        ("rlad", {"model": {"reference_offload": True}}, "--reference_offload places the reference model"),
        ("rlad", {"rollout": {"group_size": 1}}, "--group_size must be >= 2 for --method rlad"),
    ],
)
def test_options_a_method_would_ignore_are_refused(method, layers, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(method, **layers)


def test_the_same_options_pass_where_they_are_read():
    assert config("rlad", loss={"alpha": 0.3, "adaptive_alpha": True, "alpha_max": 0.8}).loss.alpha == 0.3
    assert config("kd", loss={"beta_kd": 1.0, "kl_estimator": "k3", "beta_ref": 0.1}).loss.beta_kd == 1.0
    assert config("kd", rollout={"group_size": 1}).rollout.group_size == 1  # no group advantages
    assert config("rlad", loss={"beta_ref": 0.1}, model={"reference_offload": True}).model.reference_offload
    assert config("grpo").model.teacher is None
    with pytest.raises(ConfigError, match="--method kdrl needs --teacher"):
        config_from_layers({"model": {"student": "s"}, "loss": {"method": "kdrl"}})
    with pytest.raises(ConfigError, match="--teacher needs --student too"):
        config_from_layers({"model": {"teacher": "t"}})


def batch(seed=0, rows=3, cols=5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(rows, cols, generator=g) * 3).requires_grad_()
    mask = torch.rand(rows, cols, generator=g) > 0.2
    teacher = -torch.rand(rows, cols, generator=g) * 3
    return logp, Batch(
        loss_mask=mask,
        advantages=torch.randn(rows, generator=g),
        teacher_logp=teacher,
        ref_logp=-torch.rand(rows, cols, generator=g) * 3,
    )


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kd_is_kdrl_with_no_reward_in_value_and_gradient(estimator):
    logp, micro = batch()
    kd, _ = kd_loss(
        logp,
        micro.teacher_logp,
        micro.loss_mask,
        beta_kd=0.3,
        kl_estimator=estimator,
        ref_logp=micro.ref_logp,
        beta_ref=0.05,
    )
    (grad_kd,) = torch.autograd.grad(kd, logp)
    kdrl, _ = kdrl_loss(
        logp,
        logp.detach(),
        micro.teacher_logp,
        torch.zeros(3),
        micro.loss_mask,
        beta_kd=0.3,
        kl_estimator=estimator,
        ref_logp=micro.ref_logp,
        beta_ref=0.05,
    )
    (grad_kdrl,) = torch.autograd.grad(kdrl, logp)
    assert kd.item() == kdrl.item() and torch.equal(grad_kd, grad_kdrl)


def test_k2_gives_the_reverse_kl_score_function_gradient():
    """On-policy distillation's per-token gradient with k2 is (logp - teacher_logp) * grad logp."""
    logp, micro = batch(1)
    mask = torch.ones_like(micro.loss_mask)
    loss, metrics = kd_loss(logp, micro.teacher_logp, mask, beta_kd=1.0, loss_agg="token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, (logp.detach() - micro.teacher_logp) / mask.numel())
    assert metrics["kl_teacher"] > 0 and math.isfinite(metrics["kd_loss"])


def test_each_method_loss_runs_and_sft_learns_only_accepted_traces():
    logp, micro = batch(2)
    for name, method in METHODS.items():
        cfg = config(name).loss
        loss, metrics = method.loss(logp, micro, cfg, method.initial_controls(cfg), {"loss_agg": cfg.loss_agg})
        assert math.isfinite(loss.item()), name
        assert ("kd_loss" in metrics) == (name in ("kdrl", "kd")) and ("kl_teacher" in metrics) == (
            name != "grpo" and name != "sft"
        )
    response = torch.ones(2, 4, dtype=torch.bool)
    assert get_method("sft").loss_mask(response, torch.tensor([1.0, 0.5])).tolist() == [[True] * 4, [False] * 4]
    assert torch.equal(get_method("grpo").loss_mask(response, torch.tensor([1.0, 0.0])), response)


def test_only_rlad_adapts_alpha():
    rlad = get_method("rlad")
    cfg = config("rlad", loss={"adaptive_alpha": True}).loss
    controls = rlad.initial_controls(cfg)
    assert controls == {"alpha": 0.5}
    assert rlad.update_controls(controls, {"kl_teacher": 0.7}, cfg) == {"alpha": adapt_alpha(0.5, 0.7, 0.1, 0.9)}
    fixed = config("rlad").loss
    assert rlad.update_controls(controls, {"kl_teacher": 0.7}, fixed) == controls
    assert all(m.initial_controls(config(n).loss) == {} for n, m in METHODS.items() if n != "rlad")


def test_adaptive_alpha_rule():
    # KL 0 (full agreement) pulls alpha towards the lower bound (more weight on the teacher), a large KL towards
    # the upper, a tenth of the way per step, never past the bounds; the target in between is hi - (hi-lo)*exp(-KL).
    assert adapt_alpha(0.5, 0.0, 0.1, 0.9) == pytest.approx(0.5 + 0.1 * (0.1 - 0.5))
    assert adapt_alpha(0.5, 1e9, 0.1, 0.9) == pytest.approx(0.5 + 0.1 * (0.9 - 0.5))
    target = 0.9 - 0.8 * math.exp(-0.7)
    assert adapt_alpha(0.5, 0.7, 0.1, 0.9) == pytest.approx(0.5 + 0.1 * (target - 0.5))
    assert adapt_alpha(0.5, -1e-7, 0.1, 0.9) == adapt_alpha(0.5, 0.0, 0.1, 0.9)  # rounding below 0 is agreement 1
    alpha = 0.5
    for _ in range(200):
        alpha = adapt_alpha(alpha, 0.0, 0.1, 0.9)
    assert alpha == pytest.approx(0.1, abs=1e-6) and alpha >= 0.1
    assert adapt_alpha(0.95, 1e9, 0.1, 0.9) == 0.9
