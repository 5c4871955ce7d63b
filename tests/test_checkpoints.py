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
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, ReachedInit, run_deepspeed
from safetensors.torch import load_file
from test_reliability import DS_CONFIG, _kill_group, _script_env, _wait_for_steps, base_args, expect_one_line

from rlad_ds import rng
from rlad_ds.checkpoint import export, manifest, protocol, run_dir, universal
from rlad_ds.cli import export_main, train_main
from rlad_ds.config.parsing import parse_config
from rlad_ds.errors import ConfigError, TrainingError
from rlad_ds.methods import get_method
from rlad_ds.trainer import Trainer

IDENTITY = {"rollout": {"group_size": 4}, "loss": {"method": "rlad"}, "deepspeed": "zero3.json"}


class FakeEngine:
    """Writes what DeepSpeed's ZeRO-3 save writes on rank 0 of 1; `fail` is raised after the first file. With
    `torch_saver`, through DeepSpeed's own torch checkpoint engine, as DeepSpeed does (a 2 MiB optimizer file)."""

    def __init__(self, fail=None, params=(), load_error=None, torch_saver=False):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
        from deepspeed.runtime.model_checkpointing import CHECKPOINT_SERIALIZATION

        self.fail, self.load_error = fail, load_error
        self.module = torch.nn.ParameterList(params)
        self._config = SimpleNamespace(load_universal_checkpoint=False)
        if torch_saver:
            self.checkpoint_engine = TorchCheckpointEngine(
                SimpleNamespace(checkpoint_config={CHECKPOINT_SERIALIZATION: True})
            )

    def _write(self, path: Path, data: bytes) -> None:
        if hasattr(self, "checkpoint_engine"):
            self.checkpoint_engine.save({"data": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, str(path))
        else:
            path.write_bytes(data)

    def save_checkpoint(self, root, tag, save_latest):
        directory = Path(root) / tag
        directory.mkdir(parents=True, exist_ok=True)
        self._write(directory / "zero_pp_rank_0_mp_rank_00_model_states.pt", b"model" * 300)
        if self.fail:
            raise self.fail
        big = hasattr(self, "checkpoint_engine")  # above the size hashed on the writer's second thread
        self._write(
            directory / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", b"optim" * (3000 if not big else 420000)
        )

    def load_checkpoint(self, load_dir, tag, **kwargs):
        if self.load_error:
            raise self.load_error
        return f"{load_dir}/{tag}", {}


def save(out, step, engine=None, identity=IDENTITY, keep_last=3, verify_mode="sha256"):
    return protocol.save_checkpoint(
        engine or FakeEngine(),
        out,
        step,
        {"step": step, "world_size": 1, "controls": {}, "bad_steps": 0, "identity": identity},
        keep_last,
        verify_mode,
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


def test_sha256_is_taken_while_deepspeed_writes_and_size_records_sizes(tmp_path, monkeypatch):
    """--checkpoint_verify sha256: DeepSpeed's files are hashed as torch.save writes them (no read-back), and the
    checksums are those of the bytes on disk. size: the manifest holds sizes only; a cut file is found, a changed
    byte is not (what sha256 is for)."""
    read_back, real_digest = [], manifest.file_digest
    monkeypatch.setattr(manifest, "file_digest", lambda path, *a: read_back.append(path.name) or real_digest(path, *a))
    directory = save(tmp_path / "sha256", 1, FakeEngine(torch_saver=True))
    assert sorted(read_back) == ["rng_rank0.json", "rng_rank0.safetensors", "trainer_state.json"]
    marker = json.loads((directory / manifest.MARKER).read_text())
    optim = directory / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert marker["checksum"] == "sha256" and optim.stat().st_size > 2 << 20
    for name, (size, digest) in marker["files"].items():
        assert size == (directory / name).stat().st_size and digest == real_digest(directory / name), name
    assert torch.load(optim)["data"].numel() == 5 * 420000  # what DeepSpeed's loader reads back
    read_back.clear()
    directory = save(tmp_path / "size", 1, FakeEngine(torch_saver=True), verify_mode="size")
    marker = json.loads((directory / manifest.MARKER).read_text())
    assert read_back == [] and marker["checksum"] == "size" and all(d is None for _, d in marker["files"].values())
    optim = directory / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[-100] ^= 1
    optim.write_bytes(bytes(data))
    assert manifest.verify(directory) is None
    optim.write_bytes(bytes(data[:-1]))
    assert manifest.verify(directory) == f"file {optim.name}: size {len(data) - 1} != {len(data)}"


def test_a_resume_checks_sizes_before_the_process_group_and_shares_the_checksums_after(tmp_path, monkeypatch, caplog):
    """Before the process group every rank checks sizes only (a stat per file); after it, the checksums are cut
    into one share per rank, every file in exactly one, the largest first to the least loaded."""
    args = ["--output_dir", str(tmp_path), "--max_steps", "9"]
    cfg, _ = parse_config(args)
    first, second = (save(tmp_path, step, identity=run_dir.run_identity(cfg)) for step in (1, 2))
    files = json.loads((second / manifest.MARKER).read_text())["files"]
    largest = max(size for size, _ in files.values())
    for world_size in (1, 2, 3, 8):
        parts = manifest.shares(files, world_size)
        assert len(parts) == world_size and sorted(sum(parts, [])) == sorted(files)
        loads = [sum(files[name][0] for name in part) for part in parts]
        assert parts[0][0] == "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" and max(loads) - min(loads) <= largest
    hashed, real_digest = [], manifest.file_digest
    monkeypatch.setattr(manifest, "file_digest", lambda path, *a: hashed.append(path.name) or real_digest(path, *a))
    for rank in (0, 1):
        assert manifest.verify(second, share=(rank, 2)) is None
    assert sorted(hashed) == sorted(files)
    optim = second / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[7] ^= 1
    optim.write_bytes(bytes(data))
    hashed.clear()
    assert run_dir.resume_point(cfg) == second and hashed == []  # before the process group: sizes only
    with caplog.at_level(logging.WARNING, logger="rlad_ds"):
        assert run_dir.resume_point(cfg, together=True) == first
    assert f"step_00000002 fails verification (file {optim.name}: sha256 differs); resuming from step_00000001" in (
        caplog.text
    )
    size_only, _ = parse_config([*args, "--checkpoint_verify", "size"])
    assert run_dir.resume_point(size_only, together=True) == second


def test_a_marker_whose_step_is_not_a_number_is_a_damaged_checkpoint(tmp_path):
    older, newest = save(tmp_path, 1), save(tmp_path, 2)
    marker = json.loads((newest / manifest.MARKER).read_text())
    for step in ("2", "two", None, True, -1, 2.5):
        (newest / manifest.MARKER).write_text(json.dumps({**marker, "step": step}))
        assert manifest.marker_step(newest) == 2  # no exception: the dir's name
        assert run_dir.resolve_resume("auto", tmp_path, IDENTITY, max_steps=5) == older, step
        with pytest.raises(ConfigError, match=r"fails verification \(its COMPLETE marker's step .* is not a number\)"):
            run_dir.resolve_resume(str(newest), tmp_path, IDENTITY, max_steps=5)


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
    differs = r"belongs to a different run \(it differs in rollout.group_size: 4 there, 8 now\); "
    with pytest.raises(ConfigError, match=differs + "choose another --output_dir, or pass --overwrite_output_dir"):
        run_dir.resolve_resume("auto", tmp_path, other)
    # --resume PATH cannot be combined with --overwrite_output_dir: the advice is what can be done with the path
    with pytest.raises(ConfigError, match=differs + "pass the flags of the run that wrote it, or --resume a ") as error:
        run_dir.resolve_resume(str(tmp_path / "checkpoints" / "step_00000001"), tmp_path, other)
    assert "--overwrite_output_dir" not in str(error.value)
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
    # The check sums first: a sum that overflows is no verdict, the elements are looked at then.
    assert protocol._finite(torch.tensor([3e38, 3e38])) and not protocol._finite(torch.tensor([float("inf"), -1e38]))
    assert not protocol._finite(torch.tensor([1.0, float("nan")])) and protocol._finite(
        torch.ones(3, dtype=torch.bfloat16)
    )


def test_overwrite_moves_the_old_run_aside(tmp_path, caplog):
    out = tmp_path / "run"
    assert run_dir.move_aside(out) is None  # nothing there: nothing to move
    out.mkdir()
    (out / ".rlad_ds.lock").write_text("")
    assert run_dir.move_aside(out) is None and out.is_dir()  # empty but for the lock: nothing to keep
    (out / "run_config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("old\n")
    with caplog.at_level(logging.INFO, logger="rlad_ds"):
        moved = run_dir.move_aside(out)
    assert not out.exists() and (moved / "metrics.jsonl").read_text() == "old\n"
    assert moved.name.startswith("run.old-") and str(moved) in caplog.text
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("newer\n")
    again = run_dir.move_aside(out)  # within the same second: a distinct name, nothing overwritten
    assert again != moved and (again / "metrics.jsonl").read_text() == "newer\n" and moved.is_dir()


def test_only_a_run_is_ever_moved_aside(tiny_models, tmp_path, no_init, capsys, monkeypatch):
    """A directory of the user's files (no run_config.json) and the current directory are refused in one line
    before anything loads, and move_aside itself refuses them: nothing is renamed."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("notes.txt", "a.py", "b.py", "data.csv"):
        (mine / name).write_text(name)
    expect_one_line(
        train_main(base_args(tiny_models, mine, "--overwrite_output_dir")),
        capsys.readouterr(),
        f"--output_dir {mine} holds files but no run (no run_config.json: a.py, b.py, data.csv and 1 more); "
        f"--overwrite_output_dir moves aside only a run's dir",
    )
    with pytest.raises(ConfigError, match="holds files but no run"):
        run_dir.move_aside(mine)
    monkeypatch.chdir(mine)
    (mine / "run_config.json").write_text("{}")  # even a run: the current directory is never renamed
    expect_one_line(
        train_main(base_args(tiny_models, ".", "--overwrite_output_dir")),
        capsys.readouterr(),
        "--output_dir . is the current directory or holds it",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert sorted(p.name for p in mine.iterdir()) == ["a.py", "b.py", "data.csv", "notes.txt", "run_config.json"]


def test_a_damaged_universal_conversion_is_converted_again(tmp_path, monkeypatch, caplog):
    """The universal checkpoint written for another number of ranks has its own manifest and is verified before
    every load: a converted file overwritten with 1000s (same size) is found under sha256 and converted again from
    the original; under size a cut file is."""
    directory = save(tmp_path, 1)
    state = json.loads((directory / "trainer_state.json").read_text())
    (directory / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))  # as if 2 ranks wrote it
    conversions = []

    def convert(source, tmp):  # what ds_to_universal writes, per parameter
        conversions.append(source)
        (tmp / "zero" / "w").mkdir(parents=True)
        torch.save({"param": torch.ones(64)}, tmp / "zero" / "w" / "fp32.pt")

    monkeypatch.setattr(universal, "_convert", convert)
    fp32 = directory / "universal" / "zero" / "w" / "fp32.pt"
    protocol.load_checkpoint(FakeEngine(), directory)
    marker = json.loads((directory / "universal" / manifest.MARKER).read_text())
    assert len(conversions) == 1 and marker["files"]["zero/w/fp32.pt"][1] == manifest.file_digest(fp32)
    protocol.load_checkpoint(FakeEngine(), directory)
    assert len(conversions) == 1  # verified: used as it is
    size = fp32.stat().st_size
    torch.save({"param": torch.full((64,), 1000.0)}, fp32)
    assert fp32.stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="rlad_ds"):
        protocol.load_checkpoint(FakeEngine(), directory)
    assert len(conversions) == 2 and torch.equal(torch.load(fp32)["param"], torch.ones(64))
    assert "fails verification (file zero/w/fp32.pt: sha256 differs): converting the checkpoint again" in caplog.text
    torch.save({"param": torch.full((64,), 1000.0)}, fp32)
    protocol.load_checkpoint(FakeEngine(), directory, verify_mode="size")
    assert len(conversions) == 2  # size verification reads no contents
    fp32.write_bytes(fp32.read_bytes()[:-8])
    protocol.load_checkpoint(FakeEngine(), directory, verify_mode="size")
    assert len(conversions) == 3 and not (directory / "universal.tmp").exists()
    assert json.loads((directory / "universal" / manifest.MARKER).read_text())["checksum"] == "size"


def test_a_failed_export_keeps_nothing_half_written_and_names_the_way_to_export(
    tiny_models, tiny_tokenizer, tmp_path, monkeypatch
):
    """A full disk during the export at a run's end: one line naming the free space and the checkpoint to export
    later with launchers/export.py; no student_hf.tmp, and an earlier export stays as it was."""
    import transformers.modeling_utils
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    engine = SimpleNamespace(module=module, _zero3_consolidated_16bit_state_dict=module.state_dict)
    out = tmp_path / "student_hf"
    assert export.export_hf(engine, tiny_tokenizer, out, step=3) == out
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    for step, fix in (
        (
            3,
            "checkpoint step_00000003 holds the trained student: free space, then run the same command with "
            "launchers/export.py to export it",
        ),
        (None, "no checkpoint holds the trained student (--save_steps -1)"),
    ):
        with pytest.raises(TrainingError) as failed:
            export.export_hf(engine, tiny_tokenizer, out, step=step)
        message = str(failed.value)
        assert message.startswith(f"cannot write the exported student to {out} (No space left on device; ") and (
            message.endswith(f"GiB free there): nothing of it is kept; {fix}")
        ), message
        assert "\n" not in message and sorted(p.name for p in tmp_path.iterdir()) == ["student_hf"]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


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
        f"run in {out} already finished step 2 (--max_steps 2); raise --max_steps to continue it, export it (no "
        f"student_hf/ there) by running the same command with launchers/export.py, pass --overwrite_output_dir to "
        f"run it again from step 0",
    )
    (out / "student_hf").mkdir()
    expect_one_line(
        train_main(base_args(tiny_models, out, "--max_steps", "2")),
        capsys.readouterr(),
        "raise --max_steps to continue it, pass --overwrite_output_dir",
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
        "belongs to a different run (it differs in rollout.group_size: 4 there, 2 now)",
    )


def test_one_run_per_output_dir(tiny_models, tmp_path, no_init, capsys):
    """While a process holds the output dir's lock, a run there stops in one line naming its pid and host, before
    anything loads, and leaves the dir as it was; once the holder is killed (-9) a run goes on."""
    out = tmp_path / "out"
    holder = _python(
        "-c",
        "import sys, time; from rlad_ds.checkpoint.lock import OutputDirLock; OutputDirLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(300)",
        out,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.perf_counter()
        expect_one_line(
            train_main(base_args(tiny_models, out)),
            capsys.readouterr(),
            f"--output_dir {out} is in use by another run (pid {holder.pid} on {socket.gethostname()}, since ",
        )
        assert time.perf_counter() - start < 10 and [p.name for p in out.iterdir()] == [".rlad_ds.lock"]
    finally:
        holder.kill()
        holder.communicate()
    for _ in range(2):  # the kernel released the killed holder's lock; the run releases its own when it ends
        with pytest.raises(ReachedInit):
            train_main(base_args(tiny_models, out))


def test_a_run_refused_after_taking_the_lock_leaves_no_output_dir(tiny_models, tmp_path, no_init, capsys):
    out, data = tmp_path / "new" / "out", tmp_path / "malformed.jsonl"
    data.write_text('{"prompt": "digits 1:"}\n{"prompt": "digits 9:"\n')
    rc = train_main(base_args(tiny_models, out, "--dataset", data))
    expect_one_line(rc, capsys.readouterr(), "malformed.jsonl:2: invalid JSON")
    assert not out.exists()


def test_export_refusals_are_one_line(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    expect_one_line(
        export_main(base_args(tiny_models, out)), capsys.readouterr(), f"--output_dir {out} holds no run (no run_"
    )
    _checkpointed_run(tiny_models, out)
    expect_one_line(
        export_main(base_args(tiny_models, out, "--group_size", "2")),
        capsys.readouterr(),
        f"--output_dir {out} holds a run of other flags (it differs in rollout.group_size: 4 there, 2 now); export "
        f"it with the flags it was trained with",
    )
    shutil.rmtree(out / "checkpoints")
    expect_one_line(
        export_main(base_args(tiny_models, out)), capsys.readouterr(), f"no checkpoint in {out}/checkpoints to export"
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
    checkpoint to step 3 with the loaded parameters exactly the saved ones (the conversion kept, with its manifest);
    a converted file overwritten with 1000s is found and converted again before the next load; launchers/export.py
    exports the finished run's student exactly as its end did; then --overwrite_output_dir after changing
    --group_size starts at step 0 with the old run moved aside, whole."""
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
    assert manifest.verify(root / "step_00000001" / "universal") is None  # the conversion has its own manifest
    copy = tmp_path / "copy" / "step_00000001"
    shutil.copytree(root / "step_00000001", copy)  # the overwrite moves `out`
    fp32 = sorted((copy / "universal" / "zero").glob("*/fp32.pt"))[0]
    size, converted = fp32.stat().st_size, torch.load(fp32, weights_only=True)
    converted.detach().fill_(1000.0)  # the same storage filled with 1000s: the same size, other bytes
    torch.save(converted, fp32)
    assert fp32.stat().st_size == size
    (out / "student_hf").rename(tmp_path / "trainer_export")
    exporting = _python("launchers/export.py", *base_args(tiny_models, out, *common, "--max_steps", "3"))
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
    text = _finish(check)
    assert f"fails verification (file {fp32.relative_to(copy / 'universal')}: sha256 differs): converting" in text
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["step"] == 1 and result["names"] and result["global_steps"] == 1, result
    assert result["loaded_vs_saved"] == 0.0 and result["initial_vs_saved"] > 0, result
    assert f"exported {root / 'step_00000003'} to {out / 'student_hf'}" in _finish(exporting)
    exported, trained = (load_file(d / "model.safetensors") for d in (out / "student_hf", tmp_path / "trainer_export"))
    assert sorted(exported) == sorted(trained) and all(torch.equal(exported[k], trained[k]) for k in trained)
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
    text = _finish(fresh)
    (old,) = tmp_path.glob("out.old-*")
    assert f"moved the previous run in {out} aside to {old}" in text, text[-4000:]
    assert [json.loads(line)["step"] for line in (old / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (old / "checkpoints").glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3)]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "run_config.json").read_text())["rollout"]["group_size"] == 2
    assert not (out / "checkpoints").exists()
    assert time.perf_counter() - start < 200


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


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_lives_and_resumes_after_its_kill_9(
    tiny_models, tmp_path, no_init, capsys
):
    """A run trains and checkpoints; a second run on its dir (here, in this process) is refused in one line naming
    the first's pid and host, before anything loads, and writes nothing; kill -9 of the first, then the same
    command resumes from its newest complete checkpoint."""
    out, log = tmp_path / "out", tmp_path / "first.log"
    args = base_args(tiny_models, out, "--eval_size", "0", "--save_steps", "1", "--keep_last", "2")
    first = subprocess.Popen(
        [sys.executable, "launchers/train.py", *args, "--max_steps", "500"],
        cwd=ROOT,
        env=_script_env(),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_steps(first, out, log, 2)
        rc = train_main([*args, "--max_steps", "500"])
        lines = (out / "metrics.jsonl").read_text().split("\n")[:-1]  # whole lines: the first run is writing
        steps = [json.loads(line)["step"] for line in lines]
    finally:
        _kill_group(first)  # kill -9
        first.wait()
    expect_one_line(
        rc,
        capsys.readouterr(),
        f"--output_dir {out} is in use by another run (pid {first.pid} on {socket.gethostname()}",
    )
    assert steps == sorted(set(steps)) and steps[0] == 1, steps  # no step logged twice: the second wrote nothing
    newest = manifest.complete_checkpoints(out)[-1]
    step = manifest.marker_step(newest)
    text = _finish(_python("launchers/train.py", *args, "--max_steps", step + 1), timeout=150)
    assert f"resumed from {newest} at step {step}" in text, text[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == step + 1 and math.isfinite(records[-1]["loss"])
