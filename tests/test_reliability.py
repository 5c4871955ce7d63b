"""Issue 6: bad input fails fast in one line, crashes and stalls end the job, faults inside a step are contained.

Bad input is checked in-process through `rlad_ds.cli.train_main` with `deepspeed.init_distributed`
replaced by a sentinel: a check that returns 2 has provably run before any process group or model. A few
real `python launchers/train.py` runs and one 2-rank launcher run prove what reaches the terminal.
"""

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, ReachedInit, free_port, one_rank_env, run_deepspeed

from rlad_ds import trainer as trainer_module
from rlad_ds.callbacks import Callback
from rlad_ds.checkpoint import manifest, protocol, run_dir
from rlad_ds.checkpoint.run_dir import run_identity
from rlad_ds.cli import train_main
from rlad_ds.config.parsing import parse_config
from rlad_ds.errors import ConfigError, TrainingError
from rlad_ds.methods import get_method
from rlad_ds.trainer import Trainer

DS_CONFIG = str(ROOT / "ds_configs" / "zero3.json")


def base_args(models, out, *extra):
    return [
        "--student",
        str(models["student"]),
        "--teacher",
        str(models["teacher"]),
        "--deepspeed",
        DS_CONFIG,
        "--task",
        "toy_task:task",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_new_tokens",
        "12",
        "--group_size",
        "4",
        "--prompts_per_step",
        "4",
        "--eval_size",
        "4",
        "--param_persistence_threshold",
        "0",
        *map(str, extra),
    ]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def bad_inputs(tiny_models, tmp_path_factory):
    """Files and dirs that are each wrong in one way."""
    from rlad_ds.tiny import char_tokenizer

    root = tmp_path_factory.mktemp("bad")
    no_weights = root / "no_weights"
    shutil.copytree(tiny_models["student"], no_weights)
    (no_weights / "model.safetensors").unlink()
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(tiny_models["student"], no_tokenizer)
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    other_tokenizer = root / "other_tokenizer"
    shutil.copytree(tiny_models["teacher"], other_tokenizer)
    char_tokenizer(alphabet="0123456789+=:").save_pretrained(other_tokenizer)
    (root / "not_json.json").write_text('{"zero_optimization": {"stage": 3},')
    (root / "stage2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    (root / "empty.jsonl").write_text("")
    good = [{"prompt": f"digits {i}:"} for i in range(4)]
    write_jsonl(root / "malformed.jsonl", good[:1] + ['{"prompt": "digits 9:"'] + good[1:])
    write_jsonl(root / "one_row.jsonl", good[:1])
    return root


# (extra flags, a piece of the one expected line); "{bad}" is the bad_inputs dir, "{models}" the models dir.
BAD_INPUTS = {
    "alpha_above_1": (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    "alpha_below_0": (["--alpha", "-0.1"], "--alpha must be in [0, 1]"),
    "clip_low_zero": (["--clip_low", "0"], "--clip_low and --clip_high must be > 0"),
    "clip_high_negative": (["--clip_high", "-0.1"], "--clip_low and --clip_high must be > 0"),
    "group_size_1": (["--group_size", "1"], "--group_size must be >= 2"),
    "max_new_tokens_0": (["--max_new_tokens", "0"], "--max_new_tokens must be > 0"),
    "unknown_method": (["--method", "ppo"], "--method 'ppo' is unknown"),
    "adaptive_alpha_with_grpo": (
        ["--method", "grpo", "--adaptive_alpha"],
        "--adaptive_alpha does nothing with --method grpo; it is read by --method rlad",
    ),
    "beta_kd_with_rlad": (["--beta_kd", "0.5"], "--beta_kd does nothing with --method rlad"),
    "teacher_with_grpo": (["--method", "grpo"], "--method grpo uses no teacher: drop --teacher"),
    "dynamic_sampling_with_kd": (
        ["--method", "kd", "--dynamic_sampling"],
        "--dynamic_sampling does nothing with --method kd: it acts on the reward's group-advantage signal",
    ),
    "rollout_correction_without_sampler_logprobs": (
        ["--rollout", "gathered", "--rollout_correction", "icepop"],
        "--rollout_correction icepop needs the sampler's log-probs, which --rollout gathered does not return",
    ),
    "yaml_type": (["--max_steps", "1.5"], "--max_steps must be int, got '1.5'"),
    "unknown_task": (["--task", "nope"], "unknown task 'nope'; choose one of"),
    "unknown_task_module": (["--task", "no_such_module_xyz:task"], "cannot import module 'no_such_module_xyz'"),
    "reward_timeout_0": (["--reward_timeout_s", "0"], "--reward_timeout_s must be > 0"),
    "missing_student": (["--student", "{bad}/nowhere"], "student dir {bad}/nowhere does not exist"),
    "student_without_weights": (["--student", "{bad}/no_weights"], "has no weights"),
    "student_without_tokenizer": (
        ["--student", "{bad}/no_tokenizer"],
        "student dir {bad}/no_tokenizer has no tokenizer files",
    ),
    "tokenizers_differ": (["--teacher", "{bad}/other_tokenizer"], "teacher tokenizer has"),
    "ds_config_missing": (["--deepspeed", "{bad}/nowhere.json"], "DeepSpeed config {bad}/nowhere.json does not exist"),
    "ds_config_not_json": (["--deepspeed", "{bad}/not_json.json"], "is not valid JSON"),
    "ds_config_stage_2": (["--deepspeed", "{bad}/stage2.json"], "uses ZeRO stage 2; set zero_optimization.stage to 3"),
    "dataset_missing": (["--dataset", "{bad}/nowhere.jsonl"], "{bad}/nowhere.jsonl: no such file"),
    "dataset_empty": (["--dataset", "{bad}/empty.jsonl"], "empty.jsonl: the file is empty"),
    "dataset_malformed_row": (["--dataset", "{bad}/malformed.jsonl"], "malformed.jsonl:2: invalid JSON"),
    "fewer_prompts_than_a_step": (["--dataset", "{bad}/one_row.jsonl"], "1 training prompts are fewer than"),
}


def expect_one_line(rc, captured, piece):
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlad_ds: error: "), captured.err
    assert piece in lines[0], (piece, lines[0])
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_before_any_model(case, tiny_models, bad_inputs, tmp_path, no_init, capsys):
    flags, piece = BAD_INPUTS[case]
    flags = [f.replace("{bad}", str(bad_inputs)) for f in flags]
    expect_one_line(
        train_main(base_args(tiny_models, tmp_path / "out", *flags)),
        capsys.readouterr(),
        piece.replace("{bad}", str(bad_inputs)),
    )


def test_batch_that_does_not_divide_by_world_size(tiny_models, tmp_path, no_init, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc = train_main(base_args(tiny_models, tmp_path / "out"))
    expect_one_line(rc, capsys.readouterr(), "--prompts_per_step 4 does not divide by the 3 ranks")


def test_good_input_reaches_init_and_skipped_rows_are_counted(tiny_models, bad_inputs, tmp_path, no_init, caplog):
    # The control for every bad-input case: the same flags, unbroken, get through to distributed init.
    with pytest.raises(ReachedInit):
        train_main(base_args(tiny_models, tmp_path / "out"))
    with caplog.at_level(logging.INFO, logger="rlad_ds"), pytest.raises(ReachedInit):
        train_main(
            base_args(tiny_models, tmp_path / "out", "--dataset", bad_inputs / "malformed.jsonl", "--skip_bad_rows")
        )
    assert "skipped 1 bad dataset rows" in caplog.text and "malformed.jsonl:2" in caplog.text


def test_output_dir_of_another_run(tiny_models, tmp_path, no_init, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = run_identity(parse_config(base_args(tiny_models, out, "--group_size", "8", "--lr", "3e-6"))[0])
    (out / "run_config.json").write_text(json.dumps(other))
    expect_one_line(
        train_main(base_args(tiny_models, out)),
        capsys.readouterr(),
        f"--output_dir {out} holds a different run (it differs in rollout.group_size: 8 there, 4 now; train.lr: "
        f"3e-06 there, 1e-06 now); choose another --output_dir or pass --overwrite_output_dir",
    )
    (out / "run_config.json").write_text(json.dumps({"some": "other run"}))
    expect_one_line(
        train_main(base_args(tiny_models, out)), capsys.readouterr(), "holds a different run (it differs in "
    )
    with pytest.raises(ReachedInit):  # told to overwrite
        train_main(base_args(tiny_models, out, "--overwrite_output_dir"))
    (out / "run_config.json").write_text('{"model": {"stud')  # a truncated record is no traceback either
    expect_one_line(train_main(base_args(tiny_models, out)), capsys.readouterr(), "unreadable run_config.json")

    # The same run with checkpoints: --resume none would silently start over; auto resumes it.
    args = base_args(tiny_models, out)
    (out / "run_config.json").write_text(json.dumps(run_identity(parse_config(args)[0])))
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    (out / "checkpoints" / "step_00000001" / manifest.MARKER).write_text('{"step": 1, "files": {}}')
    expect_one_line(train_main(args + ["--resume", "none"]), capsys.readouterr(), "already has checkpoints")
    with pytest.raises(ReachedInit):
        train_main(args + ["--resume", "auto"])


def test_debug_shows_the_traceback(tiny_models, tmp_path, no_init):
    with pytest.raises(ConfigError, match="--alpha must be in"):
        train_main(base_args(tiny_models, tmp_path / "out", "--alpha", "2", "--debug"))


def _script_env():
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }


@pytest.mark.slow
def test_launcher_script_prints_one_line_and_no_traceback(tiny_models, bad_inputs, tmp_path):
    """`python launchers/train.py` as a user runs it: nothing but the line reaches the terminal, in seconds."""
    cases = {
        name: BAD_INPUTS[name]
        for name in ("alpha_above_1", "ds_config_not_json", "dataset_malformed_row", "tokenizers_differ")
    }
    cases["debug"] = (["--alpha", "2", "--debug"], "--alpha must be in")
    procs, start = {}, time.perf_counter()
    for name, (flags, _) in cases.items():  # concurrently: each pays the torch import
        flags = [f.replace("{bad}", str(bad_inputs)) for f in flags]
        procs[name] = subprocess.Popen(
            [sys.executable, "launchers/train.py", *base_args(tiny_models, tmp_path / name, *flags)],
            cwd=ROOT,
            env=_script_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {name: proc.communicate(timeout=120) for name, proc in procs.items()}
    assert time.perf_counter() - start < 60
    for name, (out, err) in results.items():
        piece = cases[name][1].replace("{bad}", str(bad_inputs))
        if name == "debug":
            assert procs[name].returncode != 0 and "Traceback" in err and piece in err
            continue
        assert procs[name].returncode == 2, (name, err)
        assert err.strip().splitlines() == [err.strip()] and piece in err and "Traceback" not in out + err, (name, err)
        assert not (tmp_path / name).exists()  # nothing written for a run that never started


@pytest.mark.slow
def test_two_ranks_report_bad_input_once(tiny_models, bad_inputs, tmp_path):
    # A dataset error (checked after the tokenizers, before distributed init) under the real launcher.
    start = time.perf_counter()
    proc = run_deepspeed(
        ["launchers/train.py", *base_args(tiny_models, tmp_path / "out", "--dataset", bad_inputs / "malformed.jsonl")],
        nprocs=2,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stdout.count("malformed.jsonl:2: invalid JSON") == 1, proc.stdout[-4000:]
    assert proc.stdout.count("rlad_ds: error:") == 1 and "Traceback" not in proc.stdout
    assert time.perf_counter() - start < 90


# A rank other than 0 that meets an error first (here: the script's rank 1) waits for rank 0 to report it; rank 0's
# exit makes the launcher end it with SIGTERM, silently. An error rank 0 never meets is reported by the rank after
# its wait; a stop that was asked for is rank 0's alone to report.
RANK1_ERROR = """
import sys
import rlad_ds.cli as cli
from rlad_ds.errors import ConfigError, Interrupted
cli.RANK0_REPORT_GRACE_S = float(sys.argv[1])
def main(argv):
    print("failing", flush=True)
    raise ConfigError("bad input") if argv[0] == "config" else Interrupted("stopped", 143)
sys.exit(cli.run_main(main, sys.argv[2:]))
"""


def _rank1(grace_s: float, error: str, **popen):
    env = {**os.environ, "RANK": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", RANK1_ERROR, str(grace_s), error], env=env, **popen)


def test_a_rank_other_than_0_gives_rank_0_time_to_report_an_error():
    start = time.perf_counter()
    _, err = _rank1(0.5, "config", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).communicate(timeout=60)
    assert err.strip() == "rlad_ds: error: bad input" and time.perf_counter() - start >= 0.5  # rank 0 never did
    waiting = _rank1(60, "config", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert waiting.stdout.readline() == b"failing\n"
    time.sleep(1.0)
    waiting.send_signal(signal.SIGTERM)  # the launcher's, once rank 0 has reported and exited
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == -signal.SIGTERM and err == b"", err


def test_a_stop_that_was_asked_for_is_rank_0s_to_report_and_ends_other_ranks_at_once():
    start = time.perf_counter()
    proc = _rank1(60, "stop", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err == "" and time.perf_counter() - start < 30


# ---- crashes and stalls of one rank -------------------------------------------------------------------------------


def _launch(args, log, nprocs=2):
    hostfile = log.with_suffix(".hosts")
    hostfile.write_text(f"localhost slots={nprocs}\n")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--no_ssh_check",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *map(str, args),
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_script_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_for_steps(proc, out, log, steps, timeout=240):
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for line in metrics.open() if '"loss"' in line) >= steps:
            return [json.loads(line) for line in metrics.read_text().splitlines()]
        time.sleep(0.2)
    _kill_group(proc)
    pytest.fail(f"no {steps} steps within {timeout}s (exit {proc.poll()}):\n{log.read_text()[-4000:]}")


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rank_process(launcher_pid, rank):
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        if f"--local_rank={rank}" in child.cmdline():
            return child
    raise AssertionError(f"no process for rank {rank}")


def _wait_exit(proc, limit):
    start = time.perf_counter()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        _kill_group(proc)  # whatever is left (reward workers of a killed rank)
    return rc, time.perf_counter() - start


@pytest.mark.slow
def test_faulty_rewards_score_zero_then_kill_9_of_one_rank_ends_the_job(tiny_models, tmp_path):
    """One run, two proofs. Rewards that raise, hang or return NaN score 0, are counted and never stop the run;
    then kill -9 of rank 1 alone makes the whole job exit non-zero within seconds (the launcher polls its ranks)."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"digits {i}:"} for i in range(4)] + ['["bad"]'])
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = _launch(
        [
            "launchers/train.py",
            *base_args(
                tiny_models,
                out,
                "--task",
                "flaky_task:task",
                "--dataset",
                data,
                "--skip_bad_rows",
                "--reward_timeout_s",
                "0.5",
                "--eval_size",
                "0",
                "--max_steps",
                "500",
                "--save_steps",
                "0",
            ),
        ],
        log,
    )
    records = _wait_for_steps(proc, out, log, 2)
    victim = _rank_process(proc.pid, 1)
    victim.kill()
    rc, seconds = _wait_exit(proc, 60)
    text = log.read_text()
    assert rc not in (None, 0), text[-4000:]
    assert seconds < 30
    for record in records[:2]:
        # Every step sees prompts 0..3 (4 rows, 4 per step): 3 of them fault on all 4 samples each.
        assert record["reward_errors"] == 12 and math.isfinite(record["loss"]) and record["finite"], record
    assert text.count("skipped 1 bad dataset rows") == 1, text[-4000:]
    assert "reward calls raised" in text and "timed out" in text


@pytest.mark.slow
def test_stalled_rank_ends_the_job_after_the_collective_timeout(tiny_models, tmp_path):
    """A rank that stops responding (SIGSTOP, as a hang would) is caught by --collective_timeout_s: the healthy
    rank's next collective fails and it exits, which makes the launcher tear the job down.

    The launcher SIGTERMs the stopped rank and waits 30 s before SIGKILL (DeepSpeed's fixed grace); the test
    resumes the rank once the healthy one has exited so that the grace is not spent here."""
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    timeout_s = 10  # well above any honest wait between collectives of this tiny run
    proc = _launch(
        [
            "launchers/train.py",
            *base_args(
                tiny_models,
                out,
                "--eval_size",
                "0",
                "--max_steps",
                "500",
                "--save_steps",
                "0",
                "--collective_timeout_s",
                timeout_s,
            ),
        ],
        log,
    )
    _wait_for_steps(proc, out, log, 1)
    healthy, stalled = _rank_process(proc.pid, 0), _rank_process(proc.pid, 1)
    stalled.suspend()
    start = time.perf_counter()
    try:
        healthy.wait(timeout=timeout_s + 30)
    except Exception:  # psutil.TimeoutExpired: the healthy rank hangs, the failure this test exists for
        _kill_group(proc)
        pytest.fail(f"rank 0 still running {timeout_s + 30}s after rank 1 stalled:\n{log.read_text()[-4000:]}")
    healthy_exit = time.perf_counter() - start
    stalled.resume()
    rc, _ = _wait_exit(proc, 30)
    text = log.read_text()
    assert rc not in (None, 0), text[-4000:]
    assert timeout_s - 3 < healthy_exit < timeout_s + 20, text[-4000:]
    assert "timed out" in text.lower()


# ---- partial checkpoints ------------------------------------------------------------------------------------------


class FakeEngine:
    """What save_checkpoint needs of a DeepSpeed engine: it writes files under root/tag."""

    def save_checkpoint(self, root, tag, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def test_partial_checkpoint_is_never_resumed_and_is_cleaned_up(tmp_path):
    engine, root = FakeEngine(), manifest.checkpoint_root(tmp_path)
    assert run_dir.resolve_resume("auto", tmp_path) is None
    first = protocol.save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep_last=2)
    assert (first / manifest.MARKER).is_file() and (first / "rng_rank0.safetensors").is_file()

    # A kill during the save of step 2: DeepSpeed's files and the state are there, the marker is not.
    partial = root / "step_00000002"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (partial / "trainer_state.json").write_text('{"step": 2}')
    assert run_dir.resolve_resume("auto", tmp_path) == first
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        run_dir.resolve_resume(str(partial), tmp_path)

    # The next save of the same step replaces the leftover; a later save removes other leftovers.
    (partial / "stale").write_text("x")
    second = protocol.save_checkpoint(engine, tmp_path, 2, {"step": 2}, keep_last=2)
    assert not (second / "stale").exists() and run_dir.resolve_resume("auto", tmp_path) == second
    (root / "step_00000007").mkdir()  # an older crash of a step beyond this one
    protocol.save_checkpoint(engine, tmp_path, 3, {"step": 3}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]
    assert run_dir.resolve_resume("auto", tmp_path).name == "step_00000003"


# ---- non-finite steps ---------------------------------------------------------------------------------------------


class ListLogger(Callback):
    def __init__(self):
        self.records = []

    def on_step_end(self, trainer, step, metrics):
        self.records.append((step, dict(metrics)))


def test_fit_skips_non_finite_steps_and_stops_after_max_bad_steps(tmp_path, monkeypatch, caplog):
    cfg, _ = parse_config(
        ["--output_dir", str(tmp_path), "--max_steps", "50", "--save_steps", "0", "--max_bad_steps", "3"]
    )
    trainer = Trainer(
        cfg,
        get_method("rlad"),
        models=SimpleNamespace(device="cpu"),
        tokenizer=None,
        task=None,
        rewards=None,
        train_examples=[],
        eval_examples=[],
    )
    pattern = iter([False, True, False, False, True, False, False, False, True])
    trainer.train_step = lambda step: {
        "loss": float("nan"),
        "finite": next(pattern),
        "reward_failed_frac": 0.0,
        "time/step": 0.1,
    }
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda *a, **k: pytest.fail("no checkpoint expected"))
    metrics = ListLogger()
    with caplog.at_level(logging.WARNING, logger="rlad_ds"), pytest.raises(TrainingError) as error:
        trainer.fit([metrics])
    assert "3 consecutive non-finite steps" in str(error.value) and "--lr" in str(error.value)
    # The failing step is logged too: its numbers are what the user debugs from.
    assert [(step, m["skipped_steps"]) for step, m in metrics.records] == [
        (1, 1),
        (2, 0),
        (3, 1),
        (4, 2),
        (5, 0),
        (6, 1),
        (7, 2),
        (8, 3),
    ]
    assert trainer.step == 8
    skipped = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(skipped) == 6 and skipped[0].startswith("step 1: non-finite") and "skipped" in skipped[0]


@pytest.mark.parametrize(
    "method,where",
    [
        (m, w)
        for m in ("rlad", "kdrl", "grpo")
        for w in ("teacher_logp", "old_logp", "ref_logp")
        if not (m == "grpo" and w == "teacher_logp")
    ],
)  # GRPO reads no teacher
def test_non_finite_inputs_reach_the_loss_and_the_gradient(method, where):
    """A NaN in a response token's teacher / old / reference log-prob makes the loss and its gradient non-finite,
    so train_on reports the step as not finite and ZeRO-3 discards its update (see the next test)."""
    from rlad_ds.losses import grpo_loss, kdrl_loss, trrd_loss

    torch.manual_seed(0)
    logp = (-torch.rand(2, 5)).requires_grad_()
    inputs = {"teacher_logp": -torch.rand(2, 5), "old_logp": logp.detach().clone(), "ref_logp": -torch.rand(2, 5)}
    inputs[where][1, 3] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    policy = dict(ref_logp=inputs["ref_logp"], beta_ref=0.1)
    if method == "rlad":
        loss, _ = trrd_loss(logp, inputs["old_logp"], inputs["teacher_logp"], adv, mask, alpha=0.5, **policy)
    elif method == "kdrl":
        loss, _ = kdrl_loss(logp, inputs["old_logp"], inputs["teacher_logp"], adv, mask, beta_kd=0.1, **policy)
    else:
        loss, _ = grpo_loss(logp, inputs["old_logp"], adv, mask, **policy)
    assert not math.isfinite(loss.item())
    loss.backward()
    assert not torch.isfinite(logp.grad).all()


@pytest.mark.slow
def test_zero3_discards_a_step_with_non_finite_gradients(tmp_path):
    env = one_rank_env(DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "tests/dist/nan_step_check.py", str(tmp_path / "out.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert not result["nan_step"]["loss_finite"]
    assert result["nan_step"]["params_unchanged"]
    assert result["nan_step"]["grad_norm"] is not None and not math.isfinite(result["nan_step"]["grad_norm"])
    # And the engine is not stuck: the next finite step updates the parameters.
    assert not result["finite_step"]["params_unchanged"] and result["finite_step"]["params_finite"]
    assert math.isfinite(result["finite_step"]["grad_norm"])


# ---- security -----------------------------------------------------------------------------------------------------


def _package_sources():
    return sorted((ROOT / "rlad_ds").rglob("*.py")) + sorted((ROOT / "launchers").glob("*.py"))


def test_no_unsafe_loading_in_the_package():
    for path in _package_sources():
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", match.start()) + 1]
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"\bpickle\.loads?\(|\bimport dill\b", text), path
    from rlad_ds.config.schema import ModelConfig

    assert ModelConfig().trust_remote_code is False
    cfg, _ = parse_config(["--student", "s", "--teacher", "t"])
    assert cfg.model.trust_remote_code is False


def test_builtin_task_never_imports_user_modules(tmp_path, monkeypatch):
    """`get_task("kk")` imports rlad_ds.tasks.kk only, even with same-named files first on sys.path."""
    from rlad_ds.tasks import get_task

    for name in ("kk", "tasks", "toy_task_planted"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('user module imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("kk", "tasks", "toy_task_planted"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    get_task.cache_clear()
    try:
        task = get_task("kk")
    finally:
        get_task.cache_clear()
    assert task.name == "kk"
    assert not {"kk", "tasks", "toy_task_planted"} & set(sys.modules)
