"""Reliability round two, checkpoints: a manifest in every marker, resume that verifies and falls back, never resumes
another run or a finished one, agreed failures on write, no non-finite checkpoint, resume on another world size.

The fast tests drive `rlad_ds.checkpoint` with fake engines that write files as DeepSpeed names them, and the
up-front refusals through `train_main` with distributed init replaced by a sentinel. One slow test runs the real
launcher: 2 ranks save, the newest checkpoint is damaged, 1 rank resumes from the older one through DeepSpeed's
universal checkpoint, a check script compares the loaded parameters, and an --overwrite_output_dir run after
changing --group_size starts afresh with the old run moved aside.
"""

import errno
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, ReachedInit, run_deepspeed
from test_reliability import DS_CONFIG, _script_env, base_args, expect_one_line

from rlad_ds import rng
from rlad_ds.checkpoint import manifest, protocol, run_dir
from rlad_ds.cli import train_main
from rlad_ds.config.parsing import parse_config
from rlad_ds.errors import ConfigError, TrainingError
from rlad_ds.methods import get_method
from rlad_ds.trainer import Trainer

IDENTITY = {"rollout": {"group_size": 4}, "loss": {"method": "rlad"}, "deepspeed": "zero3.json"}


class FakeEngine:
    """Writes what DeepSpeed's ZeRO-3 save writes on rank 0 of 1; `fail` is raised after the first file."""

    def __init__(self, fail=None, params=(), load_error=None):
        self.fail, self.load_error = fail, load_error
        self.module = torch.nn.ParameterList(params)
        self._config = SimpleNamespace(load_universal_checkpoint=False)

    def save_checkpoint(self, root, tag, save_latest):
        directory = Path(root) / tag
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"model" * 300)
        if self.fail:
            raise self.fail
        (directory / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim" * 3000)

    def load_checkpoint(self, load_dir, tag, **kwargs):
        if self.load_error:
            raise self.load_error
        return f"{load_dir}/{tag}", {}


def save(out, step, engine=None, identity=IDENTITY, keep_last=3):
    return protocol.save_checkpoint(
        engine or FakeEngine(),
        out,
        step,
        {"step": step, "world_size": 1, "controls": {}, "bad_steps": 0, "identity": identity},
        keep_last,
    )


def test_the_marker_is_a_manifest_of_every_file(tmp_path):
    directory = save(tmp_path, 1)
    marker = json.loads((directory / manifest.MARKER).read_text())
    assert marker["step"] == 1 and marker["world_size"] == 1 and marker["identity"] == IDENTITY
    on_disk = {p.name for p in directory.iterdir()} - {manifest.MARKER}
    assert set(marker["files"]) == on_disk and "trainer_state.json" in on_disk and "rng_rank0.safetensors" in on_disk
    for name, (size, digest) in marker["files"].items():
        assert size == (directory / name).stat().st_size and digest == manifest.file_digest(directory / name)
    assert manifest.verify(directory) is None
    optim = directory / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[7] ^= 1  # one flipped bit, same size
    optim.write_bytes(bytes(data))
    assert manifest.verify(directory) == f"file {optim.name}: sha256 differs"
    optim.write_bytes(bytes(data[:-10]))
    assert manifest.verify(directory) == f"file {optim.name}: size {len(data) - 10} != {len(data)}"
    optim.write_bytes(bytes(data))
    (directory / "rng_rank0.json").unlink()
    assert manifest.verify(directory) == "file rng_rank0.json: missing"


def test_each_rank_hashes_the_files_it_wrote(tmp_path):
    for name in (
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank1.json",
        "rng_rank1.safetensors",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "rng_rank0.json",
        "trainer_state.json",
    ):
        (tmp_path / name).write_text(name)
    assert set(manifest.hash_own(tmp_path, 1)) == {
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "rng_rank1.json",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank1.safetensors",
    }
    assert set(manifest.hash_own(tmp_path, 0)) == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "rng_rank0.json",
        "trainer_state.json",
    }


def test_auto_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    first, second, third = save(tmp_path, 1), save(tmp_path, 2), save(tmp_path, 3)
    (third / "trainer_state.json").write_text("{}")
    (second / "rng_rank0.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="rlad_ds"):
        assert run_dir.resolve_resume("auto", tmp_path, IDENTITY, max_steps=10) == first
    size = (third / "trainer_state.json").stat().st_size
    warnings = [r.getMessage() for r in caplog.records]
    assert any(
        w.startswith("step_00000003 fails verification (file trainer_state.json: size 2 != ")
        and w.endswith("resuming from step_00000001")
        for w in warnings
    ), warnings
    assert any("step_00000002 fails verification (file rng_rank0.safetensors: missing)" in w for w in warnings)
    assert size == 2
    with pytest.raises(ConfigError, match=r"--resume .*step_00000003 fails verification \(file trainer_state"):
        run_dir.resolve_resume(str(third), tmp_path, IDENTITY)
    (first / "trainer_state.json").unlink()
    with pytest.raises(ConfigError, match="no checkpoint in .* verifies .*--overwrite_output_dir"):
        run_dir.resolve_resume("auto", tmp_path, IDENTITY)


def test_a_marker_without_a_manifest_is_refused_like_a_damaged_one(tmp_path):
    """A resumed checkpoint is a verified one: a marker that lists no files (rlad_ds before manifests) is refused,
    by --resume PATH in one line naming what to do, and passed over by --resume auto for an older one."""
    older, directory = save(tmp_path, 3), save(tmp_path, 4)
    (directory / manifest.MARKER).write_text('{"step": 4}')
    with pytest.raises(
        ConfigError,
        match="its COMPLETE marker lists no files .* so it cannot be verified; resume it "
        "with the rlad_ds version that wrote it, or start afresh",
    ):
        run_dir.resolve_resume(str(directory), tmp_path, IDENTITY)
    assert run_dir.resolve_resume("auto", tmp_path, IDENTITY, max_steps=5) == older
    shutil.rmtree(older)
    with pytest.raises(ConfigError, match="no checkpoint in .* verifies \\(step_00000004: its COMPLETE marker lists"):
        run_dir.resolve_resume("auto", tmp_path, IDENTITY)
    (directory / manifest.MARKER).write_text("{not json")
    with pytest.raises(ConfigError, match="step_00000004: its COMPLETE marker is not JSON"):
        run_dir.resolve_resume("auto", tmp_path, IDENTITY)


def test_another_runs_checkpoint_is_never_resumed(tmp_path):
    save(tmp_path, 1)
    other = {**IDENTITY, "rollout": {"group_size": 8}}
    for resume in ("auto", str(tmp_path / "checkpoints" / "step_00000001")):
        with pytest.raises(ConfigError, match=r"belongs to a different run \(it differs in rollout.group_size\)"):
            run_dir.resolve_resume(resume, tmp_path, other)
    assert run_dir.resolve_resume("auto", tmp_path, IDENTITY).name == "step_00000001"


@pytest.mark.parametrize(
    "error,piece",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "x/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
            "No space left on device: x/zero_pp_rank_0",
        ),
        (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
            "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0",
        ),
    ],
)
def test_a_failed_write_removes_the_partial_checkpoint_and_keeps_the_last_good(tmp_path, error, piece):
    first = save(tmp_path, 1)
    with pytest.raises(TrainingError) as failed:
        save(tmp_path, 2, FakeEngine(fail=error))
    message = str(failed.value)
    assert "\n" not in message and piece in message and "GiB free on that filesystem" in message, message
    assert f"the last complete one is step_00000001 ({first})" in message and "free space or fix permissions" in message
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    assert manifest.verify(first) is None and run_dir.resolve_resume("auto", tmp_path, IDENTITY) == first


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    first = save(tmp_path, 1, FakeEngine(params=[torch.nn.Parameter(torch.ones(3))]))
    # Under ZeRO-3 a parameter's own data is empty; this rank's partition is its ds_tensor.
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_tensor = torch.tensor([1.0, float("inf")])
    for params in ([torch.nn.Parameter(torch.tensor([0.0, float("nan")]))], [partitioned]):
        with pytest.raises(TrainingError) as failed:
            save(tmp_path, 2, FakeEngine(params=params))
        assert str(failed.value).startswith(
            "parameters are not finite after step 2: checkpoint not written, the last "
            f"good one is step_00000001 ({first}); lower --lr"
        )
        assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def test_overwrite_moves_the_old_run_aside(tmp_path, caplog):
    out = tmp_path / "run"
    assert run_dir.move_aside(out) is None  # nothing there: nothing to move
    out.mkdir()
    assert run_dir.move_aside(out) is None and out.is_dir()  # empty: nothing to keep
    (out / "metrics.jsonl").write_text("old\n")
    with caplog.at_level(logging.INFO, logger="rlad_ds"):
        moved = run_dir.move_aside(out)
    assert not out.exists() and (moved / "metrics.jsonl").read_text() == "old\n"
    assert moved.name.startswith("run.old-") and str(moved) in caplog.text
    out.mkdir()
    (out / "metrics.jsonl").write_text("newer\n")
    again = run_dir.move_aside(out)  # within the same second: a distinct name, nothing overwritten
    assert again != moved and (again / "metrics.jsonl").read_text() == "newer\n" and moved.is_dir()


def test_a_checkpoint_deepspeed_cannot_load_is_one_line(tmp_path):
    directory = save(tmp_path, 1)
    bad = FakeEngine(
        load_error=RuntimeError(
            "PytorchStreamReader failed reading zip archive: failed finding central directory\nmore"
        )
    )
    with pytest.raises(ConfigError) as failed:
        protocol.load_checkpoint(bad, directory)
    assert str(failed.value) == (
        f"cannot load checkpoint {directory} on rank 0 (RuntimeError: PytorchStreamReader "
        f"failed reading zip archive: failed finding central directory); --resume an older "
        f"checkpoints/step_N dir, or start again with --overwrite_output_dir"
    )
    with pytest.raises(ConfigError, match=r"on rank 0 \(AssertionError: \)"):
        protocol.load_checkpoint(FakeEngine(load_error=AssertionError()), directory)
    torch.manual_seed(123)  # the same world size: the saved RNG state comes back
    expected = torch.rand(3)
    torch.manual_seed(123)
    directory = save(tmp_path, 2)
    torch.rand(5)
    assert protocol.load_checkpoint(FakeEngine(), directory)["step"] == 2 and torch.equal(torch.rand(3), expected)


def test_another_world_size_converts_or_says_why(tmp_path):
    directory = save(tmp_path, 1)
    state = json.loads((directory / "trainer_state.json").read_text())
    (directory / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    (directory / manifest.MARKER).write_text(json.dumps({"step": 1, "world_size": 2}))
    with pytest.raises(
        ConfigError,
        match=r"cannot convert checkpoint .*step_00000001 to DeepSpeed's universal "
        r"format .*; resume with the 2 ranks that wrote it",
    ):
        protocol.load_checkpoint(FakeEngine(), directory)  # the fake files are no DeepSpeed checkpoint
    assert not (directory / "universal").exists() and not (directory / "universal.tmp").exists()
    assert rng.seed_rng(0, 5, 1) == rng.seed_rng(0, 5, 1) != rng.seed_rng(0, 5, 0)


def test_every_world_size_trains_on_the_same_prompts_each_step():
    """The set of prompts of a step over all ranks is one slice of the epoch's permutation, whatever the world
    size: a run resumed on another number of ranks goes on with the data order it had."""
    examples = [{"i": i} for i in range(37)]  # not a multiple of anything: drop_last matters
    cfg, _ = parse_config(["--prompts_per_step", "8", "--seed", "3"])
    trainer = Trainer(cfg, get_method("rlad"), None, None, None, None, examples, [])

    def step_set(world_size, step):
        trainer.world_size, seen = world_size, []
        for rank in range(world_size):
            trainer.rank = rank
            seen += [e["i"] for e in trainer.prompts_for_step(step)]
        assert len(seen) == len(set(seen)) == 8
        return set(seen)

    for step in range(12):  # 4 steps per epoch: three epochs
        assert step_set(1, step) == step_set(2, step) == step_set(4, step) == step_set(8, step), step
    assert step_set(1, 0) != step_set(1, 4)  # a new epoch, a new order


# ---- refused before any model, through the entry point -------------------------------------------------------------


def _checkpointed_run(models, out, *flags, step=2):
    """OUTPUT_DIR as a run of these flags leaves it, with one complete checkpoint of `step` (fake files)."""
    cfg, _ = parse_config(base_args(models, out, *flags))
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(run_dir.run_identity(cfg)))
    return save(out, step, identity=run_dir.run_identity(cfg))


def test_refusals_are_one_line_before_any_model(tiny_models, tmp_path, no_init, capsys):
    out = tmp_path / "out"
    directory = _checkpointed_run(tiny_models, out)
    expect_one_line(
        train_main(base_args(tiny_models, out, "--max_steps", "2")),
        capsys.readouterr(),
        f"run in {out} already finished step 2 (--max_steps 2); raise --max_steps to continue it, pass "
        f"--overwrite_output_dir to run it again from step 0",
    )
    with pytest.raises(ReachedInit):  # raised: it goes on
        train_main(base_args(tiny_models, out, "--max_steps", "3"))
    expect_one_line(
        train_main(base_args(tiny_models, out, "--resume", directory, "--overwrite_output_dir")),
        capsys.readouterr(),
        f"--resume {directory} contradicts --overwrite_output_dir",
    )
    with pytest.raises(ReachedInit):  # another run, overwritten: no refusal, no resume (moved aside after init)
        train_main(base_args(tiny_models, out, "--group_size", "2", "--overwrite_output_dir"))
    # The old version rewrote run_config.json on --overwrite_output_dir and kept the old checkpoints: the record
    # matches, the checkpoint's identity does not.
    cfg, _ = parse_config(base_args(tiny_models, out, "--group_size", "2"))
    (out / "run_config.json").write_text(json.dumps(run_dir.run_identity(cfg)))
    expect_one_line(
        train_main(base_args(tiny_models, out, "--group_size", "2", "--max_steps", "5")),
        capsys.readouterr(),
        "belongs to a different run (it differs in rollout.group_size)",
    )


# ---- real runs -----------------------------------------------------------------------------------------------------


def _python(*args, **popen):
    """`python ARGS` as a user runs it: one process, no launcher (rank 0 of 1)."""
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=_script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _finish(proc, timeout=180):
    text = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.mark.slow
def test_damaged_checkpoint_resumed_on_one_rank_then_overwritten(tiny_models, tmp_path):
    """2 ranks save steps 1 and 2; a bit of step 2 flips; 1 rank resumes from step 1 through DeepSpeed's universal
    checkpoint to step 3 with the loaded parameters exactly the saved ones; then --overwrite_output_dir after
    changing --group_size starts at step 0 with the old run moved aside, whole."""
    start, out = time.perf_counter(), tmp_path / "out"
    common = ["--eval_size", "0", "--save_steps", "1", "--keep_last", "3"]
    first = run_deepspeed(
        ["launchers/train.py", *base_args(tiny_models, out, *common, "--max_steps", "2")], timeout=180
    )
    assert first.returncode == 0, first.stdout[-4000:]
    root = out / "checkpoints"
    for step in (1, 2):
        marker = json.loads((root / f"step_{step:08d}" / manifest.MARKER).read_text())
        assert marker["world_size"] == 2 and len(marker["files"]) == 9, marker["files"]  # 2 x (2 DeepSpeed + 2 RNG) + 1
    damaged = root / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    text = _finish(_python("launchers/train.py", *base_args(tiny_models, out, *common, "--max_steps", "3")))
    assert (
        "step_00000002 fails verification (file zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 differs); "
        "resuming from step_00000001"
    ) in text, text[-4000:]
    assert "written by 2 ranks, this run has 1: loaded through DeepSpeed's universal checkpoint" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records), records
    for step in (2, 3):  # saved again by the one rank, verified
        directory = root / f"step_{step:08d}"
        assert json.loads((directory / manifest.MARKER).read_text())["world_size"] == 1
        assert manifest.verify(directory) is None
    shutil.copytree(root / "step_00000001", tmp_path / "copy" / "step_00000001")  # the overwrite moves `out`
    check = _python(
        "tests/dist/universal_load_check.py",
        tmp_path / "copy" / "step_00000001",
        tmp_path / "check.json",
        "--student",
        tiny_models["student"],
        "--method",
        "grpo",
        "--deepspeed",
        DS_CONFIG,
        "--task",
        "toy_task:task",
        "--param_persistence_threshold",
        "0",
        "--group_size",
        "4",
        "--prompts_per_step",
        "4",
    )
    fresh = _python(
        "launchers/train.py",
        *base_args(
            tiny_models,
            out,
            "--eval_size",
            "0",
            "--max_steps",
            "1",
            "--save_steps",
            "-1",
            "--group_size",
            "2",
            "--overwrite_output_dir",
        ),
    )
    _finish(check)
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["step"] == 1 and result["names"] and result["global_steps"] == 1, result
    assert result["loaded_vs_saved"] == 0.0 and result["initial_vs_saved"] > 0, result
    text = _finish(fresh)
    (old,) = tmp_path.glob("out.old-*")
    assert f"moved the previous run in {out} aside to {old}" in text, text[-4000:]
    assert [json.loads(line)["step"] for line in (old / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (old / "checkpoints").glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3)]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "run_config.json").read_text())["rollout"]["group_size"] == 2
    assert not (out / "checkpoints").exists()
    assert time.perf_counter() - start < 150


@pytest.mark.slow
def test_a_write_or_load_failing_on_one_rank_stops_both_ranks_together(tmp_path):
    """Rank 1's model file, then its optimizer file, hit ENOSPC; then its load fails: each time both ranks raise the
    same one line (rank 1's), the partial dirs are gone, and the next save of the same job works."""
    proc = run_deepspeed(["tests/dist/checkpoint_failure_check.py", tmp_path], timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["persistent"] > 0  # a collective at the end of DeepSpeed's save/load
    saves = ranks[0]["saves"]
    for step, file in (("2", "model_states"), ("3", "optim_states")):
        assert (
            saves[step].startswith(
                f"cannot write checkpoint {tmp_path}/checkpoints/step_0000000{step} on rank 1 "
                f"(No space left on device: "
            )
            and f"_{file}.pt; " in saves[step]
        ), saves[step]
        assert "the last complete one is step_00000001" in saves[step]
    assert saves["4"] == "ok" and ranks[0]["dirs"] == ranks[0]["complete"] == ["step_00000001", "step_00000004"]
    assert ranks[0]["load"].startswith(
        f"cannot load checkpoint {tmp_path}/checkpoints/step_00000004 on rank 1 "
        "(RuntimeError: PytorchStreamReader failed"
    )
