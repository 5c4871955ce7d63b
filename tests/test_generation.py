"""The one generation and evaluation path (`rlad_ds.generation`) over a fake rollout engine: batching, padding,
seeding, decoding and evaluation, with no model and no process group."""

import pytest
import torch
from deepspeed.runtime.rollout import RolloutEngine, SamplingConfig

from rlad_ds.config.parsing import config_from_layers
from rlad_ds.generation import decode_responses, evaluate_examples, generate
from rlad_ds.rewards import RewardRunner
from rlad_ds.rollout.output import finish_rollout
from rlad_ds.tasks import get_task


class EchoRollout(RolloutEngine):
    """Answers every prompt with its own last character, n times, then EOS; records what it was asked."""

    name = "echo"
    collective_calls = False

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.sessions = tokenizer, [], 0

    def session(self):
        self.sessions += 1
        return torch.no_grad()

    def generate(self, request, sampling):
        self.calls.append((request.prompt_ids.clone(), torch.initial_seed()))
        n = sampling.n_samples_per_prompt
        last = request.prompt_ids[:, -1:].repeat_interleave(n, 0)
        eos = torch.full_like(last, self.tokenizer.eos_token_id)
        output = torch.cat([request.prompt_ids.repeat_interleave(n, 0), last, eos], dim=1)
        return finish_rollout(
            request.prompt_attention_mask, output, n, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        )

    def sync_weights(self, step):
        pass


def test_generate_batches_pads_each_batch_alone_and_seeds_per_batch(tiny_tokenizer):
    rollout = EchoRollout(tiny_tokenizer)
    prompts = ["ab", "cdef", "g", "hij", "k"]
    out = generate(
        rollout,
        tiny_tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=4, n_samples_per_prompt=2),
        "cpu",
        batch_size=2,
        seeds=[10, 11, 12, 13, 14],
    )
    assert rollout.sessions == 1  # one session (one gather) for all the calls
    assert [ids.shape for ids, _ in rollout.calls] == [(2, 4), (2, 3), (1, 1)]  # padded to its own longest
    assert [seed for _, seed in rollout.calls] == [10, 12, 14]  # the seed of each call's first prompt
    assert decode_responses(tiny_tokenizer, out) == [p[-1] for p in prompts for _ in range(2)]
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert out.response_lengths.tolist() == [2] * 10 and out.eos.all()
    # Concatenated rows keep their prompts left-padded to the widest, responses right after them.
    texts = [tiny_tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(out.input_ids, out.attention_mask)]
    assert texts[::2] == [p + p[-1] + tiny_tokenizer.eos_token for p in prompts]
    assert generate(rollout, tiny_tokenizer, [], SamplingConfig(max_new_tokens=4), "cpu") is None
    assert rollout.sessions == 2  # an empty shard still enters the session (a collective for real engines)


def test_evaluate_examples_scores_through_the_reward_runner(tiny_tokenizer):
    """The echo engine answers K&K prompts with one character: every completion is wrong, and the results
    have one row per subset with the problems in order; the training RNG is left as it was."""
    kk = get_task("kk")
    cfg = config_from_layers(
        {"eval": {"eval_samples": 3, "eval_k": [1, 3], "eval_temperature": 0.7}, "rollout": {"rollout_batch_size": 2}}
    )
    records = [{**r, "prompt_text": kk.prompt(r)} for r in kk.generate("test", 5, seed=1)]
    state = torch.get_rng_state()
    with RewardRunner("kk", workers=1) as rewards:
        results = evaluate_examples(
            EchoRollout(tiny_tokenizer), tiny_tokenizer, kk, records, cfg, rewards, "cpu", keep_completions=True
        )
    assert torch.equal(state, torch.get_rng_state())
    assert results["n"] == 3 and results["ks"] == [1, 3] and results["overall"]["problems"] == 5
    assert results["overall"]["mean@1"] == 0.0 and results["generated_tokens"] == 5 * 3 * 2
    assert [p["completions"] for p in results["problems"]] == [[r["prompt_text"][-1]] * 3 for r in records]
    assert sum(row["problems"] for row in results["subsets"].values()) == 5


@pytest.mark.parametrize("rows", [1, 4])
def test_generate_with_one_batch_is_one_call(tiny_tokenizer, rows):
    rollout = EchoRollout(tiny_tokenizer)
    generate(rollout, tiny_tokenizer, ["abc"] * rows, SamplingConfig(max_new_tokens=2), "cpu")
    assert len(rollout.calls) == 1


def test_hf_rollout_splits_a_batch_whose_kv_cache_would_not_fit_its_budget(tiny_tokenizer):
    """Rows per generate call come from the KV-cache budget (layers x KV heads x head dim x bytes x tokens), whole
    prompts per call; the samples are those of one call for everything (greedy)."""
    from transformers import AutoModelForCausalLM

    from rlad_ds.models import kv_cache_bytes_per_token
    from rlad_ds.rollout.hf import ModuleRollout
    from rlad_ds.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", len(tiny_tokenizer), hidden=32, layers=2))
    prompts, sampling = ["ab", "cdef", "g", "hij", "k"], SamplingConfig(max_new_tokens=6, n_samples_per_prompt=2)
    row_bytes = kv_cache_bytes_per_token(model.config, 4) * (4 + 6)  # widest prompt + new tokens, fp32
    assert row_bytes == 2 * 2 * 2 * 8 * 4 * 10  # K and V x 2 layers x 2 KV heads x head_dim 8 x fp32 x 10 tokens
    calls = []
    generate_once = model.generate
    model.generate = lambda ids, **kwargs: calls.append(ids.shape[0]) or generate_once(ids, **kwargs)
    whole = generate(ModuleRollout(model, tiny_tokenizer), tiny_tokenizer, prompts, sampling, "cpu")
    assert calls == [10]  # everything fits in the default budget
    calls.clear()
    budget = 5 * row_bytes / 2**30  # 5 rows: 2 prompts x 2 samples per call
    split = generate(ModuleRollout(model, tiny_tokenizer, budget), tiny_tokenizer, prompts, sampling, "cpu")
    assert calls == [4, 4, 2]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, n_samples_per_prompt=2)
    whole = generate(ModuleRollout(model, tiny_tokenizer), tiny_tokenizer, prompts, greedy, "cpu")
    split = generate(ModuleRollout(model, tiny_tokenizer, budget), tiny_tokenizer, prompts, greedy, "cpu")
    assert torch.equal(whole.input_ids, split.input_ids) and torch.equal(whole.response_mask, split.response_mask)
    assert split.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
