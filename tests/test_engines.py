"""Student (ZeRO-3 + rollouts) and teacher engines: one process, and 2 ranks through the real launcher.

The checks themselves live in tests/dist/engines_check.py (one launch covers them all, a launch costs
8-12 s); see its sections: partitioning, gathered and per-layer rollouts equal plain generation, unequal
lengths across ranks finish, hooks survive an exception, training after rollouts equals training
without, chunked log-prob gradients under ZeRO-3 (tied and untied), teacher log-probs equal plain HF.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, one_rank_env, run_deepspeed

from rlad_ds.rollout.hf import generation_config
from rlad_ds.rollout.output import RolloutOutput, finish_rollout

SCRIPT = ROOT / "tests" / "dist" / "engines_check.py"


@pytest.fixture(scope="module")
def small_vocab_models(tmp_path_factory):
    """A 7-token vocabulary makes EOS frequent, so rows and ranks stop at different lengths."""
    from tiny_models import save_tiny_model

    from rlad_ds.tiny import char_tokenizer

    root = tmp_path_factory.mktemp("small_vocab")
    tokenizer = char_tokenizer("abcd")
    return [
        save_tiny_model(root / "student", "qwen3", tokenizer, seed=0, hidden=32, layers=2),
        save_tiny_model(root / "tied", "qwen3", tokenizer, seed=3, hidden=32, layers=2, tie_embeddings=True),
        save_tiny_model(root / "teacher", "qwen3", tokenizer, seed=1, hidden=64, layers=2),
    ]


def read_results(out_dir, world):
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


def test_engines_single_process(small_vocab_models, tmp_path):
    # A subprocess, so the distributed environment deepspeed.initialize needs never leaks into other tests.
    env = one_rank_env(PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *small_vocab_models, tmp_path],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result,) = read_results(tmp_path, 1)
    assert result["partition_fraction"] == 1.0


@pytest.mark.slow
def test_engines_two_ranks(small_vocab_models, tmp_path):
    proc = run_deepspeed([SCRIPT, *small_vocab_models, tmp_path], nprocs=2, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    results = read_results(tmp_path, 2)
    for result in results:
        assert abs(result["partition_fraction"] - 0.5) < 0.05
        assert result["teacher_max_abs_err"] < 1e-5
    # The ranks really stopped at different lengths (rank 0 budget 3 tokens, rank 1 budget 30).
    assert max(results[0]["gathered_response_lengths"]) < max(results[1]["gathered_response_lengths"])


def test_generation_runs_torchs_own_linear_and_gives_zero3_its_own_back():
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    from rlad_ds.rollout.hf import plain_linear

    torch_linear = getattr(Init, "linear_bk", torch.nn.functional.linear)
    before, had_backup = torch.nn.functional.linear, hasattr(Init, "linear_bk")
    Init.linear_bk, torch.nn.functional.linear = torch_linear, zero3_linear_wrap  # as zero.Init leaves them
    try:
        with plain_linear():
            assert torch.nn.functional.linear is torch_linear
        assert torch.nn.functional.linear is zero3_linear_wrap
        with pytest.raises(KeyError), plain_linear():
            raise KeyError("generation failed")
        assert torch.nn.functional.linear is zero3_linear_wrap
    finally:
        torch.nn.functional.linear = before
        if not had_backup:
            del Init.linear_bk


def test_finish_rollout_masks_and_flags():
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    eos, pad = 2, 0
    # n=2 samples per prompt; generated part: EOS then junk / no EOS / EOS first / EOS last.
    output = torch.tensor([[0, 5, 6, 7, 2, 9], [0, 5, 6, 7, 8, 9], [4, 5, 6, 2, 8, 8], [4, 5, 6, 7, 8, 2]])
    batch = finish_rollout(prompt_mask, output, 2, eos, pad)
    assert isinstance(batch, RolloutOutput)
    assert batch.input_ids.tolist() == [[0, 5, 6, 7, 2, 0], [0, 5, 6, 7, 8, 9], [4, 5, 6, 2, 0, 0], [4, 5, 6, 7, 8, 2]]
    assert batch.eos.tolist() == [True, False, True, True]
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.response_lengths.tolist() == [2, 3, 1, 3]
    assert batch.response_mask[:, :3].sum() == 0
    assert batch.attention_mask.tolist() == [
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert batch.response_start_idx.tolist() == [3, 3, 3, 3]


def test_generation_config_overrides_every_sampling_knob(tiny_tokenizer):
    from deepspeed.runtime.rollout import SamplingConfig

    config = generation_config(SamplingConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=-1), tiny_tokenizer)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, 0.9, 0)
    greedy = generation_config(SamplingConfig(max_new_tokens=5, temperature=0.0), tiny_tokenizer)
    assert greedy.do_sample is False and greedy.eos_token_id == tiny_tokenizer.eos_token_id


def test_hybrid_engine_is_explicit_only_and_refuses_what_its_container_cannot_serve(tiny_tokenizer, caplog):
    from transformers import AutoModelForCausalLM

    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.errors import ConfigError
    from rlad_ds.rollout.hybrid import HybridRollout
    from rlad_ds.rollout.registry import choose_rollout
    from rlad_ds.tiny import tiny_config

    def model(arch, **size):
        return AutoModelForCausalLM.from_config(tiny_config(arch, len(tiny_tokenizer), hidden=16, layers=1, **size))

    qwen, llama, llama_gqa = model("qwen3"), model("llama", heads=4, kv_heads=4), model("llama", heads=4, kv_heads=2)
    reason = HybridRollout.unavailable_reason
    assert reason(llama, "cuda", None) is None
    assert "no inference policy for Qwen3ForCausalLM" in reason(qwen, "cuda", None)
    assert "no grouped-query attention (4 query heads, 2 key/value heads)" in reason(llama_gqa, "cuda", None)
    assert "no hybrid-engine inference kernels for the cpu" in reason(llama, "cpu", None)
    llama.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    assert "not 'llama3'" in reason(llama, "cuda", None)
    with pytest.raises(ConfigError, match="^--rollout hybrid_engine cannot run here: DeepSpeed has no hybrid-engine"):
        choose_rollout("hybrid_engine", llama_gqa, "cpu", RolloutConfig())
    with caplog.at_level("INFO", logger="rlad_ds"):  # auto never considers it
        assert choose_rollout("auto", llama_gqa, "cpu", RolloutConfig(), frozen=True).name == "gathered"
    assert "hybrid_engine" not in caplog.text and "student rollout: gathered (auto)" in caplog.text
