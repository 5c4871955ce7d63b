"""The training methods as objects: what each needs, who generates, which tokens it learns from, its loss.

    method  teacher            rollouts  learns from                  loss (rlad_ds.losses)
    rlad    scores the tokens  student   reward (group advantages)    trrd_loss: the teacher in the PPO ratio
    grpo    none               student   reward                       grpo_loss
    kdrl    scores the tokens  student   reward + KL to the teacher   kdrl_loss: GRPO + beta_kd * KL
    kd      scores the tokens  student   KL to the teacher only       kd_loss: on-policy distillation
    sft     generates          teacher   the teacher's correct traces sft_loss: likelihood

The trainer never asks which method it runs: it reads these attributes and calls `loss`. `check_config`
refuses, with one line, an option the chosen method would silently ignore (a loss field changed from its
default, a teacher for a method without one, adaptive alpha outside RLAD, a filter it does not accept).

Filters on what the loss learns from (`FILTERS`), accepted where they make sense:
- DAPO's `--mask_truncated`, `--soft_overlong_tokens` and `--dynamic_sampling` act on the reward's signal, which
  reaches the loss only through group advantages: rlad, grpo and kdrl take them. kd learns the teacher's view of
  every token the student writes, with no reward (dropping truncated or all-equal groups would only bias it
  towards short, easy prompts); sft learns the teacher's accepted traces, already chosen by the reward.
- `--rollout_correction` reweights estimators that assume the student drew the tokens: every method whose
  rollouts are the student's (rlad, grpo, kdrl, kd); sft's tokens are the teacher's, learnt by likelihood.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from rlad_ds.errors import ConfigError
from rlad_ds.losses import grpo_loss, kd_loss, kdrl_loss, sft_loss, trrd_loss
from rlad_ds.sampler_mismatch import PRESETS, SAMPLER_LOGPROB_ROLLOUTS
from rlad_ds.tasks.base import correct

# Loss fields that only some methods read; `loss_agg` is read by every method.
_POLICY = frozenset({"clip_low", "clip_high", "dual_clip", "beta_ref", "scale_adv_by_std"})
_KL = frozenset({"beta_kd", "kl_estimator"})
_TRRD = frozenset({"alpha", "adaptive_alpha", "alpha_min", "alpha_max", "teacher_log_ratio_clip"})
METHOD_FIELDS = _POLICY | _KL | _TRRD
# Filters: (config section, fields) and why a method without group advantages / the student's rollouts refuses it.
_REWARD_SIGNAL = "it acts on the reward's group-advantage signal, which this method's loss does not use"
FILTERS = {
    "mask_truncated": ("loss", ("mask_truncated",), _REWARD_SIGNAL),
    "soft_overlong_tokens": ("loss", ("soft_overlong_tokens",), _REWARD_SIGNAL),
    "dynamic_sampling": ("train", ("dynamic_sampling", "max_sampling_rounds"), _REWARD_SIGNAL),
    "rollout_correction": (
        "loss",
        ("rollout_correction", "rollout_correction_low", "rollout_correction_high"),
        "it reweights estimators over the student's own samples, and this method learns the teacher's tokens",
    ),
}
_REWARD_FILTERS = frozenset({"mask_truncated", "soft_overlong_tokens", "dynamic_sampling", "rollout_correction"})


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    teacher_scores: bool = False  # the teacher's log-probs of the sampled tokens enter the loss
    teacher_generates: bool = False  # training rollouts come from the teacher instead of the student
    uses_advantages: bool = True  # the reward enters the loss through group advantages
    uses_ratio: bool = True  # an importance ratio: old-policy log-probs are needed when ppo_epochs > 1
    reads: frozenset = frozenset()  # the METHOD_FIELDS it reads
    accepts: frozenset = frozenset()  # the FILTERS it takes

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_scores or self.teacher_generates

    def loss_mask(self, response_mask, rewards):
        """The response tokens this method trains on (all of them, except for SFT)."""
        return response_mask

    def initial_controls(self, loss_cfg) -> dict:
        """Values the method adapts during training (saved in checkpoints); none by default."""
        return {}

    def update_controls(self, controls: dict, metrics: dict, loss_cfg) -> dict:
        return controls

    def loss(self, logp, batch, loss_cfg, controls: dict, reduce: dict):
        """(loss, metrics) of a micro-batch (`rlad_ds.batch.Batch`) given the student's log-probs `logp`."""
        raise NotImplementedError


def _policy_options(batch, cfg) -> dict:
    return dict(
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        ref_logp=batch.ref_logp,
        beta_ref=cfg.beta_ref,
        is_weights=batch.correction_weights,
    )


def adapt_alpha(alpha: float, kl_teacher: float, lo: float, hi: float) -> float:
    """Adaptive alpha (the paper's "next step"), a documented rule: trust the teacher as far as it agrees.

    `kl_teacher` is the k3 estimate of KL(student || teacher) on the sampled response tokens (the
    `kl_teacher` metric); agreement = exp(-kl_teacher), in (0, 1]: 1 when the teacher gives the student's
    tokens the student's own probabilities. The target alpha is `hi - (hi - lo) * agreement` (strong
    agreement -> more weight on the teacher, i.e. lower alpha) and alpha moves a tenth of the way there each
    step, so one noisy batch cannot swing it.
    """
    agreement = math.exp(-max(kl_teacher, 0.0))  # k3 is >= 0 per token; max() guards rounding
    target = hi - (hi - lo) * agreement
    return min(hi, max(lo, alpha + 0.1 * (target - alpha)))


class RLAD(Method):
    def initial_controls(self, cfg) -> dict:
        return {"alpha": cfg.alpha}

    def update_controls(self, controls, metrics, cfg) -> dict:
        if not cfg.adaptive_alpha:
            return controls
        return {"alpha": adapt_alpha(controls["alpha"], metrics["kl_teacher"], cfg.alpha_min, cfg.alpha_max)}

    def loss(self, logp, batch, cfg, controls, reduce):
        return trrd_loss(
            logp,
            batch.old(logp),
            batch.teacher_logp,
            batch.advantages,
            batch.loss_mask,
            alpha=controls["alpha"],
            teacher_log_ratio_clip=cfg.teacher_log_ratio_clip,
            **_policy_options(batch, cfg),
            **reduce,
        )


class GRPO(Method):
    def loss(self, logp, batch, cfg, controls, reduce):
        return grpo_loss(
            logp, batch.old(logp), batch.advantages, batch.loss_mask, **_policy_options(batch, cfg), **reduce
        )


class KDRL(Method):
    def loss(self, logp, batch, cfg, controls, reduce):
        return kdrl_loss(
            logp,
            batch.old(logp),
            batch.teacher_logp,
            batch.advantages,
            batch.loss_mask,
            beta_kd=cfg.beta_kd,
            kl_estimator=cfg.kl_estimator,
            **_policy_options(batch, cfg),
            **reduce,
        )


class KD(Method):
    def loss(self, logp, batch, cfg, controls, reduce):
        return kd_loss(
            logp,
            batch.teacher_logp,
            batch.loss_mask,
            beta_kd=cfg.beta_kd,
            kl_estimator=cfg.kl_estimator,
            ref_logp=batch.ref_logp,
            beta_ref=cfg.beta_ref,
            is_weights=batch.correction_weights,
            **reduce,
        )


class SFT(Method):
    def loss_mask(self, response_mask, rewards):
        # Offline distillation: learn only the teacher's traces that the verifier accepts.
        return response_mask & correct(rewards).to(response_mask.device)[:, None]

    def loss(self, logp, batch, cfg, controls, reduce):
        return sft_loss(logp, batch.loss_mask, **reduce)


METHODS = {
    m.name: m
    for m in (
        RLAD(
            "rlad",
            "TRRD: the teacher enters the PPO ratio (the paper's method)",
            teacher_scores=True,
            reads=_POLICY | _TRRD,
            accepts=_REWARD_FILTERS,
        ),
        GRPO("grpo", "GRPO on the student's rollouts; no teacher", reads=_POLICY, accepts=_REWARD_FILTERS),
        KDRL(
            "kdrl",
            "GRPO + beta_kd * KL(student || teacher) on the sampled tokens",
            teacher_scores=True,
            reads=_POLICY | _KL,
            accepts=_REWARD_FILTERS,
        ),
        KD(
            "kd",
            "on-policy distillation: beta_kd * KL(student || teacher) on the student's rollouts, no reward",
            teacher_scores=True,
            uses_advantages=False,
            uses_ratio=False,
            reads=_KL | {"beta_ref"},
            accepts=frozenset({"rollout_correction"}),
        ),
        SFT(
            "sft",
            "offline distillation: likelihood of the teacher's rollouts that the verifier accepts",
            teacher_generates=True,
            uses_advantages=False,
            uses_ratio=False,
        ),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"--method {name!r} is unknown; use one of {', '.join(METHODS)}")
    return METHODS[name]


def check_config(cfg) -> None:
    """Refuse options that the chosen method would ignore, each with one line naming the fix."""
    method = get_method(cfg.loss.method)
    if cfg.model.teacher is not None and cfg.model.student is None:
        raise ConfigError("--teacher needs --student too; give both HF model dirs, or neither for the built-in demo")
    if method.needs_teacher and cfg.model.student is not None and cfg.model.teacher is None:
        raise ConfigError(f"--method {method.name} needs --teacher, an HF model dir sharing the student's tokenizer")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.loss)}
    for name in sorted(METHOD_FIELDS - method.reads):
        if getattr(cfg.loss, name) != defaults[name]:
            readers = ", ".join(m.name for m in METHODS.values() if name in m.reads)
            raise ConfigError(
                f"--{name} does nothing with --method {method.name}; it is read by --method "
                f"{readers}: drop it or change --method"
            )
    if not cfg.loss.adaptive_alpha and (cfg.loss.alpha_min, cfg.loss.alpha_max) != (
        defaults["alpha_min"],
        defaults["alpha_max"],
    ):
        raise ConfigError("--alpha_min / --alpha_max bound the adaptive alpha only: add --adaptive_alpha or drop them")
    if not method.needs_teacher:
        if cfg.model.teacher is not None:
            raise ConfigError(f"--method {method.name} uses no teacher: drop --teacher")
        if cfg.model.teacher_offload != _default(cfg.model, "teacher_offload"):
            raise ConfigError(f"--method {method.name} uses no teacher: drop --teacher_offload")
    if cfg.loss.beta_ref == 0 and cfg.model.reference_offload != _default(cfg.model, "reference_offload"):
        raise ConfigError("--reference_offload places the reference model, which only --beta_ref > 0 loads")
    _check_filters(cfg, method)
    if method.uses_advantages and cfg.rollout.group_size < 2:
        raise ConfigError(
            f"--group_size must be >= 2 for --method {method.name} (group-relative advantages), "
            f"got {cfg.rollout.group_size}"
        )


def _check_filters(cfg, method: Method) -> None:
    """Refuse a filter the method does not accept, and filter options that would do nothing."""
    for name, (section, fields, why) in FILTERS.items():
        group = getattr(cfg, section)
        changed = [f for f in fields if getattr(group, f) not in (_default(group, f), "none")]
        if changed and name not in method.accepts:
            takers = ", ".join(m.name for m in METHODS.values() if name in m.accepts)
            raise ConfigError(
                f"--{changed[0]} does nothing with --method {method.name}: {why}; drop it or use --method {takers}"
            )
    loss, rollout = cfg.loss, cfg.rollout
    bounds = (loss.rollout_correction_low, loss.rollout_correction_high) != (None, None)
    if bounds and loss.rollout_correction == "none":
        raise ConfigError("--rollout_correction_low / _high bound a correction: drop them or choose a preset")
    if loss.rollout_correction in PRESETS and rollout.rollout not in ("auto", *SAMPLER_LOGPROB_ROLLOUTS):
        raise ConfigError(
            f"--rollout_correction {loss.rollout_correction} needs the sampler's log-probs, which --rollout "
            f"{rollout.rollout} does not return (it samples with the trainer's own model): drop it or use vllm"
        )
    if cfg.train.max_sampling_rounds != _default(cfg.train, "max_sampling_rounds") and not cfg.train.dynamic_sampling:
        raise ConfigError("--max_sampling_rounds bounds --dynamic_sampling only: add --dynamic_sampling or drop it")
    if loss.soft_overlong_tokens > rollout.max_new_tokens:
        raise ConfigError(
            f"--soft_overlong_tokens {loss.soft_overlong_tokens} is over --max_new_tokens {rollout.max_new_tokens}; "
            f"it is the last part of the response budget"
        )


def _default(section, name: str):
    return next(f.default for f in dataclasses.fields(section) if f.name == name)
