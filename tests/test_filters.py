"""DAPO's filters on what the loss learns from (--mask_truncated, --soft_overlong_tokens, --dynamic_sampling) and the
rollout correction's options: which methods take them, the one-line refusals, the reward shaping against its
formula, the sampling rounds of one step, batches joined by role, and the sampler's log-probs through a rollout."""

from types import SimpleNamespace

import pytest
import torch

from rlad_ds.advantages import informative_groups, soft_overlong_penalty
from rlad_ds.batch import Batch, concat_batches
from rlad_ds.config.parsing import config_from_layers
from rlad_ds.errors import ConfigError
from rlad_ds.experience import StepExperience
from rlad_ds.methods import FILTERS, METHODS, get_method
from rlad_ds.rollout.output import concat_rollouts, finish_rollout
from rlad_ds.step_metrics import StepMetrics


def config(method, **sections):
    models = {"student": "s", "teacher": "t"} if get_method(method).needs_teacher else {"student": "s"}
    return config_from_layers({"model": models}, {**sections, "loss": {"method": method, **sections.get("loss", {})}})


def test_which_methods_take_which_filters():
    table = {name: sorted(m.accepts) for name, m in METHODS.items()}
    everything = sorted(FILTERS)
    assert table == {
        "rlad": everything,
        "grpo": everything,
        "kdrl": everything,
        "kd": ["rollout_correction"],
        "sft": [],
    }


FILTER_FLAGS = [
    ({"loss": {"mask_truncated": True}}, "--mask_truncated"),
    ({"loss": {"soft_overlong_tokens": 4}}, "--soft_overlong_tokens"),
    ({"train": {"dynamic_sampling": True}}, "--dynamic_sampling"),
]


@pytest.mark.parametrize("layers, flag", FILTER_FLAGS)
@pytest.mark.parametrize("method", ["rlad", "grpo", "kdrl"])
def test_methods_with_group_advantages_take_dapos_filters(method, layers, flag):
    config(method, **layers)


@pytest.mark.parametrize("layers, flag", FILTER_FLAGS)
@pytest.mark.parametrize("method", ["kd", "sft"])
def test_methods_without_group_advantages_refuse_them_in_one_line(method, layers, flag):
    with pytest.raises(ConfigError) as error:
        config(method, **layers)
    message = str(error.value)
    assert message.startswith(f"{flag} does nothing with --method {method}: it acts on the reward's group-advantage")
    assert message.endswith("drop it or use --method rlad, grpo, kdrl") and "\n" not in message


def test_rollout_correction_options_and_their_refusals():
    assert config("kd", loss={"rollout_correction": "icepop"}, rollout={"rollout": "vllm"}).loss.rollout_correction
    assert config("sft", loss={"rollout_correction": "none"}).loss.rollout_correction == "none"  # harmless
    refusals = [
        (("sft", {"loss": {"rollout_correction": "tis"}}), "--rollout_correction does nothing with --method sft: it"),
        (("sft", {"loss": {"rollout_correction_high": 3.0}}), "--rollout_correction_high does nothing with --method"),
        (("rlad", {"loss": {"rollout_correction": "tis"}, "rollout": {"rollout": "gathered"}}),
         "--rollout_correction tis needs the sampler's log-probs, which --rollout gathered does not return"),
        (("rlad", {"loss": {"rollout_correction": "none", "rollout_correction_low": 0.5}}),
         "--rollout_correction_low / _high bound a correction: drop them or choose a preset"),
        (("rlad", {"loss": {"rollout_correction": "tls"}}), "--rollout_correction 'tls' is unknown; use one of auto"),
        (("rlad", {"loss": {"rollout_correction_low": 3.0, "rollout_correction_high": 2.0}}),
         "--rollout_correction_low must be >= 0 and --rollout_correction_high > 0, low <= high"),
        (("rlad", {"train": {"max_sampling_rounds": 8}}), "--max_sampling_rounds bounds --dynamic_sampling only"),
        (("rlad", {"train": {"dynamic_sampling": True, "max_sampling_rounds": 0}}), "--max_sampling_rounds must be"),
        (("rlad", {"loss": {"soft_overlong_tokens": 40}, "rollout": {"max_new_tokens": 32}}),
         "--soft_overlong_tokens 40 is over --max_new_tokens 32"),
        (("rlad", {"loss": {"soft_overlong_tokens": -1}}), "--soft_overlong_tokens must be >= 0"),
    ]  # fmt: skip
    for (method, layers), message in refusals:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            config(method, **layers)
    # auto with its own bounds stays valid on any rollout: it resolves to tis only where the sampler gives log-probs
    assert config("rlad", loss={"rollout_correction_high": 3.0}, rollout={"rollout": "gathered"})


def test_soft_overlong_penalty_is_dapos_formula():
    """TRL's get_soft_overlong_punishment docstring case (max 100, cache 20, 90 tokens: -0.5) and the ends."""
    lengths = torch.tensor([0, 50, 80, 81, 90, 100, 101])
    assert soft_overlong_penalty(lengths, 100, 20).tolist() == pytest.approx([0, 0, 0, -0.05, -0.5, -1, -1])
    assert soft_overlong_penalty(lengths, 100, 0).tolist() == [0.0] * 7


def test_informative_groups_are_those_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert informative_groups(rewards, 2).tolist() == [False, True, False, False]
    assert informative_groups(rewards, 4).tolist() == [True, True]


# ---- a step's sampling rounds --------------------------------------------------------------------------------------


def round_batch(rewards, width, seed=0):
    """A round of rollouts: one row per reward, `width` tokens, every response token a loss token."""
    n = len(rewards)
    g = torch.Generator().manual_seed(seed)
    return Batch(
        input_ids=torch.randint(3, 50, (n, width), generator=g),
        attention_mask=torch.ones(n, width, dtype=torch.long),
        loss_mask=torch.ones(n, width - 1, dtype=torch.bool),
        advantages=torch.zeros(n),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        rollout_logp=-torch.rand(n, width - 1, generator=g),
    )


class Rounds(StepExperience):
    """A trainer's experience whose rounds are given batches (G = 2, 2 prompts per step, one rank)."""

    def __init__(self, rounds, max_rounds=4, dynamic=True):
        self.cfg = SimpleNamespace(
            rollout=SimpleNamespace(group_size=2),
            train=SimpleNamespace(
                prompts_per_step=2, dynamic_sampling=dynamic, max_sampling_rounds=max_rounds, sequence_parallel_size=1
            ),
        )
        self.method, self.models = get_method("grpo"), SimpleNamespace(device="cpu")
        self.rank, self.world_size, self.rounds, self.drawn = 0, 1, list(rounds), 0

    def sample_round(self, step, round_, timer, totals):
        assert round_ == self.drawn
        self.drawn += 1
        return self.rounds[round_]


def run_rounds(rounds, **kwargs):
    trainer, totals = Rounds(rounds, **kwargs), StepMetrics("cpu")
    batch = trainer.make_batch(0, None, totals)
    return trainer, batch, totals.reduce()


def test_dynamic_sampling_keeps_informative_groups_until_the_step_holds_enough():
    first = round_batch([1.0, 0.0, 1.0, 1.0], width=5, seed=1)  # one informative group of two
    second = round_batch([0.0, 0.0, 1.0, 1.0], width=7, seed=2)  # none
    third = round_batch([0.0, 1.0, 0.5, 0.0], width=6, seed=3)  # two: one more than needed
    trainer, batch, m = run_rounds([first, second, third])
    assert trainer.drawn == 3 and m["sampling_rounds"] == 3
    assert (m["groups_drawn"], m["groups_kept"], m["zero_std_groups"], m["groups"]) == (6, 2, 0, 2)
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0, 1.0] and batch.input_ids.shape == (4, 6)
    assert torch.equal(batch.input_ids[:2, :5], first.input_ids[:2]) and (batch.attention_mask[:2, 5:] == 0).all()
    assert torch.equal(batch.rollout_logp[2:], third.rollout_logp[:2])


def test_a_rank_left_with_nothing_keeps_one_group_that_teaches_nothing():
    flat = [round_batch([1.0, 1.0, 0.0, 0.0], width=4, seed=s) for s in range(2)]
    trainer, batch, m = run_rounds(flat, max_rounds=2)
    assert trainer.drawn == 2 and m["groups_kept"] == 0 and m["groups"] == 0  # no group in the loss
    assert batch.rewards.tolist() == [1.0, 1.0] and not batch.loss_mask.any()


def test_bounded_rounds_train_on_what_they_found_and_one_round_without_dynamic_sampling():
    rounds = [round_batch([1.0, 0.0, 1.0, 1.0], width=4, seed=s) for s in range(3)]
    trainer, batch, m = run_rounds(rounds, max_rounds=2)
    assert trainer.drawn == 2 and m["groups_kept"] == 2 and len(batch.rewards) == 4
    trainer, batch, m = run_rounds(rounds, dynamic=False)
    assert trainer.drawn == 1 and len(batch.rewards) == 4 and m["zero_std_groups"] == 1 and m["groups"] == 2
    assert "sampling_rounds" not in m


def test_batches_join_by_role_and_refuse_a_field_set_in_only_some():
    a, b = round_batch([1.0, 0.0], width=3), round_batch([0.5, 0.0], width=5)
    joined = concat_batches([a, b])
    assert joined.input_ids.shape == (4, 5) and joined.loss_mask.shape == (4, 4) and joined.rewards.shape == (4,)
    assert not joined.loss_mask[:2, 2:].any() and joined.teacher_logp is None
    b.teacher_logp = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="teacher_logp is set in some batches and not in others"):
        concat_batches([a, b])
    assert concat_batches([a]) is a
    assert torch.equal(a.rows(torch.tensor([1])).input_ids, a.input_ids[1:])


# ---- the sampler's log-probs through a rollout ---------------------------------------------------------------------


def test_sampler_logprobs_follow_their_tokens_through_finish_and_concat():
    prompt_mask = torch.tensor([[0, 1, 1]])
    output = torch.tensor([[0, 5, 6, 7, 2, 9], [0, 5, 6, 8, 8, 8]])  # EOS (2) at response position 1, then junk
    response_logprobs = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6]])
    out = finish_rollout(prompt_mask, output, 2, 2, 0, response_logprobs)
    expected = torch.tensor([[0, 0, 0, -0.1, -0.2, 0], [0, 0, 0, -0.4, -0.5, -0.6]])
    assert torch.allclose(out.rollout_logprobs, expected)
    assert finish_rollout(prompt_mask, output, 2, 2, 0).rollout_logprobs is None
    wider = finish_rollout(
        torch.tensor([[1, 1, 1, 1]]), torch.tensor([[4, 4, 4, 4, 9]]), 1, 2, 0, torch.tensor([[-1.0]])
    )
    joined = concat_rollouts([out, wider], 0)
    assert joined.rollout_logprobs.shape == joined.input_ids.shape == (3, 7)
    assert torch.allclose(joined.rollout_logprobs[0], torch.tensor([0, 0, 0, 0, -0.1, -0.2, 0]))  # prompt padded
    assert torch.allclose(joined.rollout_logprobs[2], torch.tensor([0, 0, 0, 0, -1.0, 0, 0]))


def test_vllm_asks_for_the_sampled_tokens_log_probs_when_it_samples(tiny_tokenizer):
    pytest.importorskip("vllm")
    from deepspeed.runtime.rollout import SamplingConfig

    from rlad_ds.rollout.vllm import VLLMRollout

    rollout = VLLMRollout.__new__(VLLMRollout)
    rollout.tokenizer = tiny_tokenizer
    assert rollout.sampling_params(SamplingConfig(max_new_tokens=4, temperature=0.7)).logprobs == 0
    assert rollout.sampling_params(SamplingConfig(max_new_tokens=4, temperature=0.0)).logprobs is None
    assert rollout.sampling_params(SamplingConfig(max_new_tokens=4), logprobs=3).logprobs == 3
