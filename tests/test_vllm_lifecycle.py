"""The vLLM rollout's lifecycle beside a ZeRO-3 student, on CPU: a fake `vllm.LLM` records every call it receives
(what it was built with, sleeps, wakes, weight syncs, generate calls, and whether torch's own F.linear was in place
at each), so that the CUDA-only paths (sleep mode, the wake order, the empty caches) run without a GPU. Also vLLM's
sizing from the run, its one-line refusals, and the order of its teardown at the process group's end."""

import math
import os
import sys
import types

import pytest
import torch
from deepspeed.runtime.rollout import RolloutRequest

from rlad_ds.errors import ConfigError

EVENTS: list[tuple] = []


def torch_linear_in_place() -> bool:
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    return torch.nn.functional.linear is not zero3_linear_wrap


class FakeLLM:
    """vllm.LLM as far as the rollout uses it; `capacity` is the KV cache's size in tokens it reports."""

    capacity = 16 * 10**5  # tokens
    rows = 1000.0  # requests of max_model_len
    start_error: Exception | None = None

    def __init__(self, **kwargs):
        EVENTS.append(("LLM", torch_linear_in_place()))
        if FakeLLM.start_error is not None:
            raise FakeLLM.start_error
        self.kwargs = kwargs
        config = types.SimpleNamespace(
            cache_config=types.SimpleNamespace(
                num_gpu_blocks=FakeLLM.capacity // 16, block_size=16, kv_cache_max_concurrency=FakeLLM.rows
            ),
            model_config=types.SimpleNamespace(max_model_len=kwargs.get("max_model_len", 4096)),
            scheduler_config=types.SimpleNamespace(max_num_seqs=kwargs.get("max_num_seqs", 256)),
        )
        core = types.SimpleNamespace(shutdown=lambda: EVENTS.append(("shutdown",)))
        self.llm_engine = types.SimpleNamespace(vllm_config=config, engine_core=core)

    def sleep(self, level):
        EVENTS.append(("sleep", level))

    def wake_up(self, tags=None):
        EVENTS.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs=None):
        names = [name for name, _ in kwargs["weights_iterator"]]
        EVENTS.append(("rpc", method, len(names), torch_linear_in_place()))

    def reset_prefix_cache(self):
        EVENTS.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False):
        EVENTS.append(("generate", len(prompts), torch_linear_in_place()))
        sample = types.SimpleNamespace(index=0, token_ids=[5, 6])
        return [types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[sample]) for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    """`import vllm` gives the fake; torch.cuda.empty_cache is recorded; ZeRO-3's F.linear is in place, as after
    zero.Init; vLLM's logging is left alone."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    module = types.ModuleType("vllm")
    module.LLM, module.__version__ = FakeLLM, "fake"
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: EVENTS.append(("empty_cache",)))
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "0")
    monkeypatch.setattr(Init, "linear_bk", getattr(Init, "linear_bk", torch.nn.functional.linear), raising=False)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    monkeypatch.setattr(FakeLLM, "capacity", 16 * 10**5)
    monkeypatch.setattr(FakeLLM, "rows", 1000.0)
    monkeypatch.setattr(FakeLLM, "start_error", None)
    EVENTS.clear()
    yield EVENTS
    from rlad_ds import distributed

    distributed._BEFORE_END.clear()


def student(tiny_models, device="cuda"):
    """What the rollout reads of DeepSpeed's engine: its device, its module, its optimizer-step count."""
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    return types.SimpleNamespace(device=torch.device(device), module=module, global_steps=0)


def rollout_for(tiny_models, tiny_tokenizer, device="cuda", **flags):
    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.rollout.registry import RolloutContext
    from rlad_ds.rollout.vllm import VLLMRollout

    context = RolloutContext(prompt_tokens=7, rows_per_call=24, group_rows=4, trust_remote_code=True)
    cfg = RolloutConfig(max_new_tokens=12, **flags)
    return VLLMRollout(student(tiny_models, device), tiny_tokenizer, tiny_models["student"], cfg, context=context)


def sample(rollout, rows=2):
    ids = torch.tensor([[3, 4, 5]] * rows)
    return rollout.generate_raw(RolloutRequest(ids, torch.ones_like(ids)), params=None)


def test_on_cuda_vllm_is_sized_from_the_run_and_sleeps_at_level_two(fake_vllm, tiny_models, tiny_tokenizer):
    rollout = rollout_for(tiny_models, tiny_tokenizer)
    kwargs = rollout.llm.kwargs
    assert kwargs["max_model_len"] == 7 + 12  # the longest prompt + --max_new_tokens, not the model's context
    assert (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (24, 24 * 7)
    assert kwargs["enable_sleep_mode"] and kwargs["gpu_memory_utilization"] == 0.3
    assert kwargs["load_format"] == "dummy" and kwargs["trust_remote_code"] is True
    assert not kwargs["enforce_eager"]  # CUDA graphs and compilation: started with torch's own F.linear
    assert fake_vllm == [("LLM", True), ("sleep", 2)]
    assert not torch_linear_in_place()  # ZeRO-3's own is back for training


def test_after_a_step_the_weights_wake_and_sync_before_the_kv_cache(fake_vllm, tiny_models, tiny_tokenizer):
    rollout = rollout_for(tiny_models, tiny_tokenizer)
    fake_vllm.clear()
    rollout.engine.global_steps = 1
    sample(rollout)
    layers = len(list(rollout.engine.module.named_parameters()))
    assert fake_vllm == [
        ("empty_cache",),  # the training step's activation peak, out of torch's cache before vLLM maps memory
        ("wake_up", ["weights"]),
        ("rpc", "reload_weights", layers, True),
        ("empty_cache",),  # the sync's gathered copies
        ("wake_up", ["kv_cache"]),
        ("reset_prefix_cache",),
        ("generate", 2, True),
        ("sleep", 2),
    ]
    assert not torch_linear_in_place()


def test_level_two_reloads_after_every_sleep_level_one_only_after_a_step(fake_vllm, tiny_models, tiny_tokenizer):
    for level, reloads in ((2, 2), (1, 1)):
        rollout = rollout_for(tiny_models, tiny_tokenizer, vllm_sleep_level=level)
        fake_vllm.clear()
        rollout.engine.global_steps = 1
        sample(rollout)
        sample(rollout)  # no optimizer step since: level 2 dropped the weights anyway
        assert sum(event[0] == "rpc" for event in fake_vllm) == reloads, (level, fake_vllm)
        assert [e for e in fake_vllm if e[0] == "wake_up"] == [("wake_up", ["weights"]), ("wake_up", ["kv_cache"])] * 2
        assert fake_vllm[-1] == ("sleep", level)


def test_a_sync_hook_before_the_session_leaves_vllm_awake_once(fake_vllm, tiny_models, tiny_tokenizer):
    rollout = rollout_for(tiny_models, tiny_tokenizer)
    rollout.engine.global_steps = 3
    rollout.sync_weights(3)  # the trainer's hook, timed apart
    fake_vllm.clear()
    sample(rollout)
    assert fake_vllm == [("generate", 2, True), ("sleep", 2)]


def test_on_cpu_no_sleep_and_the_kv_cache_is_the_flag(fake_vllm, tiny_models, tiny_tokenizer):
    rollout = rollout_for(tiny_models, tiny_tokenizer, device="cpu", vllm_kv_cache_gb=0.5)
    assert rollout.llm.kwargs["kv_cache_memory_bytes"] == 2**29 and "enable_sleep_mode" not in rollout.llm.kwargs
    rollout.engine.global_steps = 1
    sample(rollout)
    assert [e[0] for e in fake_vllm] == ["LLM", "rpc", "reset_prefix_cache", "generate"]


def test_eval_model_dir_loads_the_real_weights_and_never_syncs_or_sleeps(fake_vllm, tiny_models, tiny_tokenizer):
    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.rollout.registry import RolloutContext
    from rlad_ds.rollout.vllm import VLLMRollout

    context = RolloutContext(prompt_tokens=9, rows_per_call=8, group_rows=8)
    rollout = VLLMRollout.from_model_dir(
        tiny_models["student"], tiny_tokenizer, RolloutConfig(), 0, context, device="cuda", dtype=torch.bfloat16
    )
    kwargs = rollout.llm.kwargs
    assert kwargs["load_format"] == "auto" and kwargs["dtype"] == torch.bfloat16
    assert not kwargs["enable_sleep_mode"] and kwargs["max_model_len"] == 9 + 2048
    sample(rollout)
    sample(rollout)
    assert fake_vllm == [("LLM", True), ("generate", 2, True), ("generate", 2, True)]


@pytest.mark.parametrize(
    "device, knob", [("cuda", "--vllm_gpu_memory_utilization (now 0.3)"), ("cpu", "--vllm_kv_cache_gb (now 1)")]
)
def test_a_kv_cache_smaller_than_one_group_is_refused_naming_the_knob(
    fake_vllm, tiny_models, tiny_tokenizer, device, knob
):
    from rlad_ds.distributed import end_process_group

    FakeLLM.capacity, FakeLLM.rows = 64, 3.37  # one group: 4 rows of max_model_len 7 + 12
    with pytest.raises(ConfigError) as error:
        rollout_for(tiny_models, tiny_tokenizer, device=device)
    assert str(error.value) == (
        f"vLLM's KV cache holds 64 tokens, 3.37 rows of max_model_len 19: fewer than one group of 4 rows; raise "
        f"{knob}, or lower --group_size / --max_new_tokens"
    )
    end_process_group(barrier=False)  # what the entry point does with a ConfigError: the engine is torn down first
    assert fake_vllm[-1] == ("shutdown",)


def test_vllms_own_sizing_errors_become_one_line_and_others_pass(fake_vllm, tiny_models, tiny_tokenizer):
    FakeLLM.start_error = ValueError(
        "To serve at least one request with the model's max seq len (19), (0.00 GiB KV cache is needed, which is "
        "larger than the available KV cache memory (0.00 GiB). Try increasing `gpu_memory_utilization`"
    )
    with pytest.raises(
        ConfigError,
        match=r"^vLLM cannot start in the memory it was given \(To serve at least one "
        r"request .*\); raise --vllm_gpu_memory_utilization \(now 0.3\)$",
    ):
        rollout_for(tiny_models, tiny_tokenizer)
    FakeLLM.start_error = ValueError("something else entirely")
    with pytest.raises(ValueError, match="something else entirely"):
        rollout_for(tiny_models, tiny_tokenizer)


def test_vllm_is_torn_down_after_the_last_barrier_and_before_the_group_ends(tmp_path, monkeypatch):
    import torch.distributed as dist

    from rlad_ds import distributed

    seen = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(dist, "barrier", lambda: seen.append("barrier"))
    distributed.before_end(lambda: seen.append(("teardown", dist.is_initialized())))
    distributed.end_process_group()
    assert seen == ["barrier", ("teardown", True)] and not dist.is_initialized()


# ---- sizing from the run --------------------------------------------------------------------------------------


def test_engine_sizing_follows_the_run_and_falls_back_on_the_model():
    from rlad_ds.rollout.registry import RolloutContext
    from rlad_ds.rollout.vllm_engine import BATCHED_TOKENS_CAP, MAX_SEQS_CAP, engine_sizing

    run = engine_sizing(RolloutContext(prompt_tokens=300, rows_per_call=64), 2048, 40960, group_rows=8)
    assert (run.max_model_len, run.max_num_seqs, run.max_num_batched_tokens) == (2348, 64, BATCHED_TOKENS_CAP)
    small = engine_sizing(RolloutContext(prompt_tokens=5, rows_per_call=3), 16, 4096, group_rows=3)
    assert (small.max_model_len, small.max_num_seqs, small.max_num_batched_tokens) == (21, 3, 15)
    huge = engine_sizing(RolloutContext(prompt_tokens=100, rows_per_call=50_000), 100, None, group_rows=1)
    assert huge.max_num_seqs == MAX_SEQS_CAP and huge.max_num_batched_tokens == BATCHED_TOKENS_CAP
    unknown = engine_sizing(None, 2048, 40960, group_rows=8)  # no data seen: the model's context, vLLM's batch defaults
    assert unknown.llm_kwargs() == {"max_model_len": 40960}
    assert engine_sizing(None, 16, None, group_rows=2).llm_kwargs() == {}


def test_rollout_context_counts_the_rows_of_one_generate_call_and_the_longest_prompt(monkeypatch, tiny_tokenizer):
    from rlad_ds import run_models
    from rlad_ds.config.parsing import parse_config

    monkeypatch.setattr(run_models, "world", lambda: (0, 2))
    records = [{"prompt_text": "ab"}, {"prompt_text": "abcdefg"}, {"prompt_text": ""}]
    longest = len(tiny_tokenizer("abcdefg", add_special_tokens=False)["input_ids"])  # as generation tokenizes it
    cfg, _ = parse_config(["--prompts_per_step", "8", "--group_size", "4", "--eval_samples", "3"])
    training = run_models.rollout_context(cfg, tiny_tokenizer, records)
    assert (training.rows_per_call, training.group_rows, training.prompt_tokens) == (4 * 4, 4, longest)  # 8 / 2 x G
    assert run_models.rollout_context(cfg, eval_problems=101).rows_per_call == math.ceil(101 / 2) * 3
    evaluation = run_models.rollout_context(cfg, tiny_tokenizer, records, 101, evaluation_only=True)
    assert (evaluation.rows_per_call, evaluation.group_rows, evaluation.prompt_tokens) == (51 * 3, 3, longest)
    assert run_models.rollout_context(cfg, tiny_tokenizer, []).prompt_tokens is None  # not known: the model's context
    cfg, _ = parse_config(["--prompts_per_step", "8", "--group_size", "4", "--rollout_batch_size", "1"])
    assert run_models.rollout_context(cfg).rows_per_call == 4


def test_vllms_log_keeps_what_a_user_acts_on(tmp_path, monkeypatch):
    import json
    import logging

    from rlad_ds.rollout.vllm_engine import QuietStartup, quiet_vllm_logging

    def passes(message):
        return QuietStartup().filter(logging.LogRecord("vllm.x", logging.WARNING, "", 0, message, None, None))

    assert not passes("RotaryEmbedding: Failed to load weights")  # no weights to load; vLLM keeps its cache
    assert not passes("Llama3RotaryEmbedding: Failed to load weights")
    assert not passes("libtcmalloc is not found in LD_PRELOAD. For best performance, ...")
    assert passes("QKVParallelLinear: Failed to load weights")  # a layer the sync missed: the user must know
    assert passes("To serve at least one request with the model's max seq len (4096), ...")
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "")  # none set (and restored after the test)
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "1")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")
    vllm_logger = logging.getLogger("vllm")
    for name, value in (("handlers", []), ("level", vllm_logger.level), ("propagate", vllm_logger.propagate)):
        monkeypatch.setattr(vllm_logger, name, value)
    quiet_vllm_logging()
    config = json.loads(open(os.environ["VLLM_LOGGING_CONFIG_PATH"]).read())
    assert config["handlers"]["vllm"]["filters"] == ["quiet"] and config["loggers"]["vllm"]["level"] == "ERROR"
    mine = tmp_path / "mine.json"
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", str(mine))  # the user's own config is left alone
    quiet_vllm_logging()
    assert os.environ["VLLM_LOGGING_CONFIG_PATH"] == str(mine)
