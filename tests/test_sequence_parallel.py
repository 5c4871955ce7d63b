"""Sequence parallelism, tiled MLPs and activation offload (rlad_ds/sequence_parallel.py, rlad_ds/long_context.py).

The fast tests check the pieces in one process: shards and their targets, the micro-batches of a sharded run, the
tiled MLP's fixed tile count, the offload's wiring, the refusals. The slow ones run the real thing through the
deepspeed launcher: rlad, grpo and kdrl on 2 ranks with --sequence_parallel_size 2 against the same runs on 1 rank
(tests/dist/sequence_parallel_check.py, one launch each), and resuming with another N.
"""

import json
import math

import pytest
import torch
from conftest import ReachedInit, run_deepspeed
from test_reliability import base_args, expect_one_line

from rlad_ds.cli import train_main
from rlad_ds.config.parsing import parse_config
from rlad_ds.ds_config import student_ds_config
from rlad_ds.errors import ConfigError
from rlad_ds.logprobs import token_logprobs
from rlad_ds.long_context import LongContext, tile_mlps
from rlad_ds.sequence_parallel import SequenceGroup, check_heads, install_attention, shard_row, sharded_compute
from rlad_ds.step_metrics import SUM, TOKEN_MEAN, StepMetrics


def test_shards_cover_the_row_with_targets_shifted_before_the_split():
    ids, positions = torch.arange(10, 17)[None], torch.arange(7)[None]  # 7 tokens over 2 ranks: one pad
    shards = [shard_row(ids, positions, SequenceGroup(size=2, rank=r), pad_token_id=0) for r in range(2)]
    joined = [torch.cat(parts, dim=1) for parts in zip(*shards)]
    assert joined[0].tolist() == [[10, 11, 12, 13, 14, 15, 16, 0]]
    assert joined[1].tolist() == [list(range(8))]  # the pad continues the positions: after every real token
    assert joined[2].tolist() == [[11, 12, 13, 14, 15, 16, 0, 0]]  # shard 0's last target is shard 1's first token
    assert [s[0].shape[1] for s in shards] == [4, 4]


def test_sharded_micro_batches_hold_one_sequence_unless_packed():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    sharded = LongContext(SequenceGroup(size=2))
    slices = sharded.slices(mask, 1000, packed=False)
    assert sorted(len(s.rows) for s in slices) == [1, 1, 1]
    for piece in slices:  # trimmed to the row's real tokens
        ((start, length),) = piece.spans
        assert start == 0 and piece.cols.stop - piece.cols.start == length - 1
    assert len(sharded.slices(mask, 6, packed=True)) == 1  # packed: N x the per-rank budget to a row
    assert len(LongContext(SequenceGroup(size=1)).slices(mask, 6, packed=True)) == 2


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from rlad_ds.tiny import tiny_config

    def build(checkpointing=False, layers=2):
        torch.manual_seed(0)
        config = tiny_config("qwen3", len(tiny_tokenizer), hidden=32, layers=layers)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config).float()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    return build


def _loss_and_grads(model, ids):
    out = token_logprobs(model, ids, torch.ones_like(ids), with_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    return out.logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("length", [5, 13])
def test_tiled_mlp_matches_untiled_with_the_same_tile_count_at_every_length(tiny_lm, length, monkeypatch):
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (1, length))
    reference = _loss_and_grads(tiny_lm(), ids)
    model, calls = tiny_lm(), []
    mlp_class = type(model.model.layers[0].mlp)
    forward = mlp_class.forward
    monkeypatch.setattr(mlp_class, "forward", lambda self, x: (calls.append(x.shape[-2]), forward(self, x))[1])
    tile_mlps(model, 4)
    with sharded_compute():
        tiled = _loss_and_grads(model, ids)
    # ZeRO-3 gathers the MLP's weights on each tile's call, a collective: 4 tiles in forward and 4 in backward per
    # layer at every length, or ranks with other lengths would wait for each other forever.
    assert len(calls) == 2 * 4 * len(model.model.layers), calls
    torch.testing.assert_close(tiled[0], reference[0], rtol=1e-5, atol=1e-6)
    for name, grad in reference[1].items():
        torch.testing.assert_close(tiled[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    _loss_and_grads(model, ids)  # outside sharded_compute (generation, say) the MLP runs whole
    assert calls == [length] * len(model.model.layers)


def test_activation_offload_takes_each_checkpointed_layer_input(tiny_lm):
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    reference = _loss_and_grads(tiny_lm(checkpointing=True), ids)
    context, model = LongContext(SequenceGroup(), offload_activations=True), tiny_lm(checkpointing=True)
    with context.activation_offload():
        offloaded = _loss_and_grads(model, ids)
    stats = context.offload_stats
    assert stats.marked_tensors == len(model.model.layers)  # every checkpointed layer's hidden-states input
    # On a CPU DeepSpeed keeps them where they are (they are in host memory already): nothing moves.
    assert stats.skipped_marked_tensors == stats.marked_tensors and stats.offloaded_bytes == 0
    torch.testing.assert_close(offloaded[0], reference[0])
    assert not LongContext(SequenceGroup()).offload_activations


def test_offloaded_inputs_come_back_one_at_a_time(tiny_lm, monkeypatch):
    """With DeepSpeed's offload made to move CPU tensors as it moves GPU ones, each layer input restored in backward
    is handed over once. DeepSpeed's own context caches them until it exits: by the last layer's backward every
    input is back on the device, the peak that offloading was to remove."""
    from deepspeed.runtime.activation_checkpointing import offload_activations as offload
    from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload

    from rlad_ds.long_context import SingleUseOffload

    monkeypatch.setattr(offload._ActivationOffloadEngine, "_should_skip", lambda self, t: False)
    held, restore = [], offload._ActivationOffloadEngine._restore_tensor

    def counting(self, tensor_id, cache=True):
        tensor = restore(self, tensor_id, cache)
        held.append(len(self._restored))  # restored inputs still referenced by the context
        return tensor

    monkeypatch.setattr(offload._ActivationOffloadEngine, "_restore_tensor", counting)
    ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(4))
    reference = _loss_and_grads(tiny_lm(checkpointing=True, layers=4), ids)
    for kind, expected in ((CheckpointHiddenStatesOffload, [1, 2, 3, 4]), (SingleUseOffload, [0, 0, 0, 0])):
        held.clear()
        context = kind(use_pin_memory=False)
        with context:
            result = _loss_and_grads(tiny_lm(checkpointing=True, layers=4), ids)
        assert held == expected and context.stats.offloaded_tensors == 3, (kind, held, context.stats)
        torch.testing.assert_close(result[0], reference[0])
        for name, grad in reference[1].items():
            torch.testing.assert_close(result[1][name], grad, msg=name)


def test_wrapped_attention_is_the_core_outside_sharded_compute(tiny_lm, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {})
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    model = tiny_lm()
    reference = token_logprobs(model, ids, torch.ones_like(ids)).logprobs
    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    install_attention("sdpa", SequenceGroup(size=2))
    install_attention("sdpa", SequenceGroup(size=2))  # once per process: not wrapped twice
    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert wrapped is not core and wrapped.rlad_core_attention is core
    torch.testing.assert_close(token_logprobs(model, ids, torch.ones_like(ids)).logprobs, reference)


def test_sums_of_a_group_count_once():
    totals = StepMetrics("cpu", world_size=1, copies=2)
    totals.add("samples", 8.0, SUM)
    totals.add("kl", 0.5, TOKEN_MEAN, weight=10)
    assert totals.reduce() == {"samples": 4.0, "kl": 0.5}


# ---- refusals and the DeepSpeed JSON -----------------------------------------------------------------------------


def test_heads_that_do_not_divide_are_refused_naming_the_divisors():
    check_heads({"num_attention_heads": 8, "num_key_value_heads": 4}, 4, "teacher")
    with pytest.raises(ConfigError, match=r"the student's 4 attention heads and 2 KV heads .*: use 2$"):
        check_heads({"num_attention_heads": 4, "num_key_value_heads": 2}, 4, "student")
    with pytest.raises(ConfigError, match="KV heads"):
        check_heads({"text_config": {"num_attention_heads": 6, "num_key_value_heads": 1}}, 3, "student")


@pytest.mark.parametrize(
    "world, flags, piece",
    [
        (4, ["--sequence_parallel_size", "4"], "must divide the student's 4 attention heads and 2 KV heads"),
        (3, ["--sequence_parallel_size", "2", "--prompts_per_step", "6"], "does not divide the 3 ranks"),
        (2, ["--sequence_parallel_size", "2", "--attn_implementation", "eager"], "runs with sdpa or flash_attention_2"),
        (2, ["--sequence_parallel_size", "2", "--pack_sequences", "on"], "needs --attn_implementation flash_attention"),
        (1, ["--offload_activations"], "add --gradient_checkpointing"),
        (
            2,
            ["--sequence_parallel_size", "2", "--deepspeed", "{no_reduce_scatter}"],
            "zero_optimization.reduce_scatter",
        ),
        (1, ["--tiled_mlp_shards", "0"], "--tiled_mlp_shards must be >= 1"),
    ],
)
def test_sequence_parallel_refusals_are_one_line_before_any_model(
    world, flags, piece, tiny_models, tmp_path, no_init, monkeypatch, capsys
):
    no_reduce_scatter = tmp_path / "no_reduce_scatter.json"
    no_reduce_scatter.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    flags = [f.replace("{no_reduce_scatter}", str(no_reduce_scatter)) for f in flags]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    expect_one_line(train_main(base_args(tiny_models, tmp_path / "out", *flags)), capsys.readouterr(), piece)


def test_teacher_heads_are_checked_too_and_a_good_setting_passes(tiny_models, tmp_path, no_init, monkeypatch, capsys):
    from tiny_models import save_tiny_model

    teacher = save_tiny_model(tmp_path / "teacher", "qwen3", hidden=48, layers=1, heads=6, kv_heads=3)
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = base_args(tiny_models, tmp_path / "out", "--sequence_parallel_size", "2")
    with pytest.raises(ReachedInit):
        train_main(args)
    args[args.index("--teacher") + 1] = str(teacher)
    expect_one_line(train_main(args), capsys.readouterr(), "the teacher's 6 attention heads and 3 KV heads")


def test_deepspeed_json_counts_data_parallel_ranks_and_keeps_reduce_scatter(tmp_path):
    cfg, _ = parse_config(["--sequence_parallel_size", "2", "--output_dir", str(tmp_path)])
    config = student_ds_config(cfg, world_size=4, device="cpu")
    assert config["sequence_parallel_size"] == 2 and config["train_batch_size"] == 2  # 4 ranks, 2 per sequence
    assert config["zero_optimization"]["reduce_scatter"] is True
    plain, _ = parse_config(["--output_dir", str(tmp_path)])
    assert "sequence_parallel_size" not in student_ds_config(plain, world_size=4, device="cpu")
    path = tmp_path / "no_reduce_scatter.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    cfg, _ = parse_config(["--sequence_parallel_size", "2", "--deepspeed", str(path), "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="zero_optimization.reduce_scatter=False"):
        student_ds_config(cfg, world_size=2, device="cpu")


# ---- through the launcher ----------------------------------------------------------------------------------------


def _check_run(out, nprocs, models, size, *flags):
    script = "tests/dist/sequence_parallel_check.py"
    proc = run_deepspeed([script, out, models["student"], models["sp_teacher"], size, *flags], nprocs, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return {m: json.loads((out / f"{m}.json").read_text()) for m in ("rlad", "grpo", "kdrl")}


@pytest.fixture(scope="module")
def sp_models(tiny_models, tmp_path_factory):
    from tiny_models import save_tiny_model

    teacher = tmp_path_factory.mktemp("sp") / "teacher"  # other head counts than the student's 4 / 2
    return {**tiny_models, "sp_teacher": save_tiny_model(teacher, "qwen3", seed=1, hidden=64, heads=8, kv_heads=4)}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two launches of three methods each
def test_two_ranks_sharing_sequences_train_as_one_rank(sp_models, tmp_path):
    """fp32, 2 steps each: every logged number and the final weights agree within 1e-4. The sharded run also tiles
    its MLPs and offloads checkpointed activations, which must change nothing either."""
    from safetensors.torch import load_file

    extra = ["--tiled_mlp_shards", "3", "--gradient_checkpointing", "--offload_activations"]
    sharded = _check_run(tmp_path / "sp2", 2, sp_models, 2, *extra)
    whole = _check_run(tmp_path / "sp1", 1, sp_models, 1)
    for method, run in sharded.items():
        assert len(run["steps"]) == len(whole[method]["steps"]) == 2
        for step, (a, b) in enumerate(zip(run["steps"], whole[method]["steps"])):
            assert a.keys() == b.keys()
            for key, value in b.items():
                if isinstance(value, float) and math.isfinite(value):
                    assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (method, step, key)
        assert run["tiled_mlp_calls"] > 0 and run["offload_marked"] > 0 and whole[method]["tiled_mlp_calls"] == 0
        a = load_file(str(tmp_path / "sp2" / method / "student_hf" / "model.safetensors"))
        b = load_file(str(tmp_path / "sp1" / method / "student_hf" / "model.safetensors"))
        for name, weight in b.items():
            torch.testing.assert_close(a[name], weight, rtol=1e-4, atol=1e-6, msg=f"{method} {name}")
    # The teacher, with 8 heads, got its own Ulysses wrapper next to the student's 4.
    assert sharded["rlad"]["ulysses_head_shapes"] == [[4, 2, 8], [8, 4, 8]]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two launches
def test_resume_with_another_sequence_parallel_size(tiny_models, tmp_path):
    """launchers/train.py: step 1 on 2 data-parallel ranks with tiled MLPs (the ranks' lengths differ, the tile count
    does not), step 2 resumed on the same 2 ranks sharing sequences (N = 2: ZeRO-3 partitions over all ranks alike,
    so the checkpoint loads as it is). Another number of ranks goes through DeepSpeed's universal checkpoint like
    any resume (tests/test_checkpoints.py)."""
    from test_train import check_ok, read_metrics, train_args

    out = tmp_path / "run"
    common = ["--save_steps", "1", "--eval_size", "0", "--max_new_tokens", "20"]
    for steps, flags in ((1, ["--tiled_mlp_shards", "3"]), (2, ["--sequence_parallel_size", "2"])):
        proc = run_deepspeed(train_args(tiny_models, out, *common, "--max_steps", steps, *flags), 2, timeout=900)
        check_ok(proc)
    assert "universal checkpoint" not in proc.stdout
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())["world_size"] == 2


# ---- P8's records and the memory model of docs/long_context.md ----------------------------------------------------


def _fake_p8(per_token: float, fixed: float, variants=()) -> dict:
    lengths = (4096, 8192, 16384, 32768)
    rank = [{"variant": "plain", "length": n, "peak_growth_bytes": fixed + per_token * n} for n in lengths]
    rank += [{"variant": v, "length": 16384, "peak_growth_bytes": fixed + 0.5 * per_token * 16384} for v in variants]
    return {"ranks": [rank, [dict(r, peak_growth_bytes=r["peak_growth_bytes"] - 1) for r in rank]]}


def test_p8_records_from_fake_measurements():
    from benchmarks.report import fitted_length, p8_records

    records, details = p8_records(_fake_p8(16e3, 1e6), _fake_p8(8.2e3, 1e6, ["tiled"]))
    ratio, reach = records
    assert ratio["value"] == pytest.approx((1e6 + 8.2e3 * 32768) / (1e6 + 16e3 * 32768)) and ratio["meets"]
    budget = 1e6 + 16e3 * 16384  # N = 1's peak at the second-longest length
    assert reach["value"] == pytest.approx(((budget - 1e6) / 8.2e3) / 16384) and reach["meets"]
    assert fitted_length({1: 3.0, 2: 5.0, 3: 7.0}, 9.0) == pytest.approx(4.0)
    assert "tiled at 16K, N = 2: 0.5" in details[ratio["name"]]


def test_the_memory_model_checks_p8_against_the_models_p8_built(tmp_path, capsys):
    """`benchmarks.memory_model --p8 DIR` predicts from the config of the models in DIR: the full sizes as well as
    --quick's; a DIR that is not a P8 workdir is refused in one line naming what it lacks."""
    from benchmarks.memory_model import Arch, _arch_of, main
    from rlad_ds.tiny import tiny_config

    tiny_config("qwen3", 101, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512).save_pretrained(tmp_path)
    assert _arch_of(tmp_path) == Arch(
        hidden=128, intermediate=512, layers=4, heads=4, kv_heads=2, head_dim=32, vocab=101, tied=False
    )
    with pytest.raises(SystemExit) as stopped:
        main(["--p8", str(tmp_path)])
    assert stopped.value.code == 2
    assert "lacks p8_sp1.json, p8_sp2.json, p8_student/config.json, p8_teacher/config.json" in capsys.readouterr().err


def test_saved_activations_per_token_match_the_model(tiny_tokenizer):
    """The per-layer counts of benchmarks/memory_model.py are what autograd saves in transformers' Qwen3, in fp32
    and bf16 (the difference between a 2-layer and a 1-layer model, each storage counted once)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from benchmarks.memory_model import Arch, layer_saved, layer_saved_bytes

    def saved_bytes(arch, layers, dtype, tokens=64):
        config = Qwen3Config(
            vocab_size=len(tiny_tokenizer),
            hidden_size=arch.hidden,
            intermediate_size=arch.intermediate,
            num_hidden_layers=layers,
            num_attention_heads=arch.heads,
            num_key_value_heads=arch.kv_heads,
            head_dim=arch.head_dim,
        )
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config).to(dtype).train()
        weights, storages = {p.data_ptr() for p in model.parameters()}, {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        ids = torch.randint(3, 90, (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            token_logprobs(model, ids, torch.ones_like(ids), with_entropy=True)
        return sum(storages.values()) / tokens

    for arch in (Arch(64, 256, 1, 4, 2, 16, 101), Arch(64, 160, 1, 4, 4, 32, 101)):
        fp32 = saved_bytes(arch, 2, torch.float32) - saved_bytes(arch, 1, torch.float32)
        assert fp32 == pytest.approx(4 * layer_saved(arch))
        bf16 = saved_bytes(arch, 2, torch.bfloat16) - saved_bytes(arch, 1, torch.bfloat16)
        assert bf16 == pytest.approx(layer_saved_bytes(arch, 2), rel=0.01)


def test_longest_responses_grow_with_sequence_parallelism_and_offload():
    from benchmarks.memory_model import QWEN3, Setup, device_peak, longest_response

    student, teacher, memory = QWEN3["Qwen3-8B"], QWEN3["Qwen3-32B"], 126 * 2**30
    plain, phase = longest_response(student, teacher, Setup(), memory)
    assert phase == "train" and longest_response(student, teacher, Setup(offload=True), memory)[0] > plain
    sharded, phase = longest_response(student, teacher, Setup(sequence_parallel=8), memory)
    assert sharded > plain and phase == "rollout"  # generation is not sharded: one response's KV cache is the limit
    phases = device_peak(student, teacher, 1024 + sharded, Setup(sequence_parallel=8))
    assert max(v for k, v in phases.items() if k != "states") <= memory
    assert QWEN3["Qwen3-8B"].params == pytest.approx(8.19e9, rel=0.01)
