"""Issue 12: what signals, a dead launcher and a verifier that always fails do to a run, and what a run leaves
on the machine (processes, /dev/shm buffers, JIT-build locks).

The fast tests drive `rlad_ds.signals.StopRequest`, `Trainer.fit` and the clean-up helpers directly; one slow test
runs three real jobs side by side (DeepSpeed's launcher, 2 ranks each, and one plain single process) and checks
each stops the way docs/reliability.md promises, leaving no process and no buffer behind.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, free_port
from test_reliability import _script_env, base_args, expect_one_line

from rlad_ds import hygiene, signals
from rlad_ds import trainer as trainer_module
from rlad_ds.checkpoint.manifest import MARKER
from rlad_ds.config.parsing import parse_config
from rlad_ds.errors import ConfigError, Interrupted, TrainingError
from rlad_ds.methods import get_method
from rlad_ds.trainer import Trainer


@pytest.fixture
def stop(monkeypatch):
    """A fresh `signals.STOP` for the test."""
    fresh = signals.StopRequest()
    monkeypatch.setattr(signals, "STOP", fresh)
    return fresh


def test_a_signal_before_any_step_or_without_time_exits_at_once(stop):
    with pytest.raises(SystemExit) as exited:  # no step done: nothing to save yet
        stop.handle(signal.SIGTERM, None)
    assert exited.value.code == 143 and not stop.requested
    stop.seconds_needed, stop.grace_s = 45.0, 30.0  # a step + checkpoint would outlast the launcher's grace
    with pytest.raises(SystemExit) as exited:
        stop.handle(signal.SIGINT, None)
    assert exited.value.code == 130 and not stop.requested
    stop.seconds_needed, stop.save = 1.0, False  # --no-save_on_signal
    with pytest.raises(SystemExit):
        stop.handle(signal.SIGTERM, None)


def test_a_signal_with_time_is_recorded_and_a_later_second_one_forces_the_exit(stop):
    stop.seconds_needed = 2.0
    stop.handle(signal.SIGINT, None)
    assert stop.requested and stop.signal_name == "SIGINT" and stop.exit_code == 130
    stop.handle(signal.SIGTERM, None)  # the launcher's SIGTERM right after a Ctrl-C is the same request
    assert stop.exit_code == 130
    stop.requested_at -= 5.0
    with pytest.raises(SystemExit) as exited:
        stop.handle(signal.SIGTERM, None)
    assert exited.value.code == 143


def _fake_trainer(tmp_path, *flags):
    cfg, _ = parse_config(["--output_dir", str(tmp_path), "--max_steps", "50", *flags])
    models = SimpleNamespace(device="cpu", student=None)
    return Trainer(
        cfg,
        get_method("rlad"),
        models=models,
        tokenizer=None,
        task=None,
        rewards=None,
        train_examples=[],
        eval_examples=[],
    )


def _step_metrics(failed_frac=0.0):
    return {"loss": 0.1, "finite": True, "reward_failed_frac": failed_frac, "time/step": 0.5}


def test_a_recorded_signal_stops_every_rank_after_the_step_with_a_checkpoint(tmp_path, stop, monkeypatch):
    saved = []
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda engine, out, step, *a, **k: saved.append(step))
    trainer = _fake_trainer(tmp_path, "--save_steps", "0")

    def train_step(step):
        if step == 2:  # the signal arrives during the third step
            stop.handle(signal.SIGTERM, None)
        return _step_metrics()

    trainer.train_step = train_step
    with pytest.raises(Interrupted) as error:
        trainer.fit([])
    assert trainer.step == 3 and saved == [3] and error.value.exit_code == 143
    assert "stopped by SIGTERM after step 3: checkpoint step_00000003 saved" in str(error.value)


@pytest.mark.parametrize("flags", [["--no-save_on_signal"], ["--signal_grace_s", "0.1"]])
def test_the_signal_flags_reach_the_handler(tmp_path, stop, monkeypatch, flags):
    """--no-save_on_signal, or a grace shorter than a step (0.5 s here): the signal exits at once, nothing saved."""
    saved = []
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda engine, out, step, *a, **k: saved.append(step))
    trainer = _fake_trainer(tmp_path, "--save_steps", "0", *flags)

    def train_step(step):
        if step == 2:
            stop.handle(signal.SIGTERM, None)
        return _step_metrics()

    trainer.train_step = train_step
    with pytest.raises(SystemExit) as exited:
        trainer.fit([])
    assert exited.value.code == 143 and trainer.step == 2 and saved == []


def test_an_exit_at_once_names_where_a_rerun_resumes(tmp_path, stop, monkeypatch, caplog):
    """--signal_grace_s 0: a signal exits at once; before the run's first checkpoint the line says a rerun starts
    at step 0, after it names the checkpoint."""
    monkeypatch.setattr(
        trainer_module, "save_checkpoint", lambda engine, out, step, *a, **k: Path(out) / f"step_{step:08d}"
    )
    for signal_at, expected in ((1, "this run has no checkpoint yet: a rerun starts at step 0"), (3, "step_00000002")):
        stop.__init__()
        trainer = _fake_trainer(tmp_path, "--save_steps", "2", "--signal_grace_s", "0")

        def train_step(step, signal_at=signal_at):
            if step == signal_at:
                stop.handle(signal.SIGTERM, None)
            return _step_metrics()

        trainer.train_step = train_step
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rlad_ds"), pytest.raises(SystemExit):
            trainer.fit([])
        line = caplog.records[-1].getMessage()
        assert "over --signal_grace_s 0" in line and "last complete checkpoint" not in line, line
        assert line.endswith(expected if signal_at == 1 else f"a rerun resumes from {tmp_path}/{expected}"), line


def test_a_run_whose_every_reward_call_fails_stops_naming_the_error(tmp_path, caplog):
    trainer = _fake_trainer(tmp_path, "--save_steps", "-1", "--max_failed_reward_steps", "3")
    fractions = iter([1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.0])

    def train_step(step):
        trainer.reward_error = "#0: RuntimeError: verifier bug on prompt 4"
        return _step_metrics(next(fractions))

    trainer.train_step = train_step
    with pytest.raises(TrainingError) as error:
        trainer.fit([])
    assert trainer.step == 6  # a step with some rewards breaks the streak
    assert "every reward call failed in 3 consecutive steps" in str(error.value)
    assert "verifier bug on prompt 4" in str(error.value) and "--reward_timeout_s" in str(error.value)


def test_a_stale_jit_lock_is_named_and_a_held_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    hygiene.check_build_locks()  # no lock
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # how torch's FileBaton holds it while a build runs
    try:
        hygiene.check_build_locks()
    finally:
        os.close(fd)
    with pytest.raises(ConfigError, match=f"{lock} is the lock of a JIT build that was killed mid-way.*rm {lock}"):
        hygiene.check_build_locks()


def test_training_refuses_to_start_on_a_stale_jit_lock(tiny_models, tmp_path, no_init, monkeypatch, capsys):
    """The whole path: `train_main` stops with one line before DeepSpeed would wait on the lock forever."""
    from rlad_ds.cli import train_main

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    (tmp_path / "ext" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "ext" / "deepspeed_shm_comm" / "lock").write_text("")
    rc = train_main(base_args(tiny_models, tmp_path / "out", "--eval_size", "0"))
    expect_one_line(rc, capsys.readouterr(), "is the lock of a JIT build that was killed mid-way")


def test_stale_shm_buffers_are_removed_and_live_ones_kept(monkeypatch):
    import mmap

    prefix = f"{hygiene._shm_prefix()}127.0.0.1_"
    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    paths = {
        name: hygiene.SHM_DIR / f"{prefix}{tag}_0"
        for name, tag in [
            ("stale", f"t{os.getpid()}a"),
            ("young", f"t{os.getpid()}b"),
            ("mapped", f"t{os.getpid()}c"),
            ("this_job", port),
        ]
    }
    old = time.time() - 600
    for name, path in paths.items():
        path.write_bytes(b"\0" * 4096)
        if name != "young":
            os.utime(path, (old, old))
    with open(paths["mapped"], "r+b") as f, mmap.mmap(f.fileno(), 4096):
        try:
            assert hygiene.remove_stale_shm_buffers() >= 1
            assert not paths["stale"].exists()
            assert paths["young"].exists() and paths["mapped"].exists() and paths["this_job"].exists()
        finally:
            for path in paths.values():
                path.unlink(missing_ok=True)


def test_reward_workers_ignore_the_jobs_signals_and_die_with_their_owner(tmp_path):
    """A worker outlives a SIGTERM (the launcher sends it to every process) and dies with its owner's kill -9."""
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from rlad_ds.isolation import IsolatedWorker; "
            "w = IsolatedWorker('os:getpid'); w.start(); print(w.process.pid, flush=True); "
            "time.sleep(120)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(owner.stdout.readline())
    try:
        os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(worker, 0)  # still alive
    finally:
        owner.kill()
        owner.wait()
    deadline = time.time() + 10
    while (
        time.time() < deadline
        and Path(f"/proc/{worker}").exists()
        and Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z"
    ):
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or Path(f"/proc/{worker}/stat").read_text().split()[2] == "Z"


# ---- real jobs ----------------------------------------------------------------------------------------------------


def _job(models, tmp_path, name, nprocs, *extra):
    """Start `launchers/train.py` on tiny models: under DeepSpeed's launcher with `nprocs` ranks, or (0) alone."""
    out, log = tmp_path / name, tmp_path / f"{name}.log"
    port = free_port()
    args = ["launchers/train.py", *base_args(models, out, "--eval_size", "0", *extra)]
    if nprocs:
        (tmp_path / f"{name}.hosts").write_text(f"localhost slots={nprocs}\n")
        args = [
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(tmp_path / f"{name}.hosts"),
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *args,
        ]
    env = {**_script_env(), "MASTER_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return SimpleNamespace(proc=proc, out=out, log=log, port=port)


def _steps_done(job) -> int:
    metrics = job.out / "metrics.jsonl"
    return sum('"loss"' in line for line in metrics.open()) if metrics.is_file() else 0


def _session_processes(sid):
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _wait_until(condition, limit, what, jobs):
    deadline = time.time() + limit
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    for job in jobs:
        os.killpg(job.proc.pid, signal.SIGKILL)
    pytest.fail(f"not {what} within {limit}s:\n" + "\n".join(j.log.read_text()[-3000:] for j in jobs))


@pytest.mark.slow
def test_launcher_sigterm_launch_kill_9_and_failing_rewards_end_cleanly(tiny_models, tmp_path):
    """Three jobs at once: SIGTERM to the `deepspeed` process alone, kill -9 of DeepSpeed's per-node `launch`
    process, and a run whose verifier raises on every sample. Each stops within 60 s of the cause, the first two
    after a complete checkpoint of the step in progress; none leaves a process or a /dev/shm buffer."""
    data = tmp_path / "all_fail.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"digits {4 * i}:"}) + "\n" for i in range(4)))
    jobs = {
        "runner": _job(tiny_models, tmp_path, "runner", 2, "--max_steps", "500", "--save_steps", "0"),
        "launch": _job(tiny_models, tmp_path, "launch", 2, "--max_steps", "500", "--save_steps", "0"),
        "rewards": _job(
            tiny_models,
            tmp_path,
            "rewards",
            0,
            "--task",
            "flaky_task:task",
            "--dataset",
            data,
            "--max_steps",
            "50",
            "--save_steps",
            "-1",
        ),
    }
    both = [jobs["runner"], jobs["launch"]]
    _wait_until(lambda: all(_steps_done(j) >= 2 for j in both), 240, "2 steps in both 2-rank jobs", both)
    start = time.time()
    jobs["runner"].proc.send_signal(signal.SIGTERM)  # the `deepspeed` process only
    import psutil

    launch_proc = next(
        c
        for c in psutil.Process(jobs["launch"].proc.pid).children()
        if "deepspeed.launcher.launch" in " ".join(c.cmdline())
    )
    launch_proc.kill()
    sids = {name: job.proc.pid for name, job in jobs.items()}  # each job is its own session
    _wait_until(
        lambda: not any(_session_processes(sid) for sid in sids.values()), 60, "every process gone", list(jobs.values())
    )
    assert time.time() - start < 60
    for name in ("runner", "launch"):
        job, text = jobs[name], jobs[name].log.read_text()
        assert text.count("rlad_ds: stopped by SIGTERM after step") == 1, text[-3000:]
        step = int(text.split("rlad_ds: stopped by SIGTERM after step ")[1].split(":")[0])
        marker = job.out / "checkpoints" / f"step_{step:08d}" / MARKER
        assert marker.is_file() and _steps_done(job) == step, text[-3000:]
        assert "Traceback" not in text
    rewards = jobs["rewards"]
    assert rewards.proc.wait() == 1
    text = rewards.log.read_text()
    assert "rlad_ds: error: every reward call failed in 3 consecutive steps" in text and "verifier bug" in text
    assert "Traceback" not in text and _steps_done(rewards) == 3
    leftovers = [
        p.name
        for p in hygiene.SHM_DIR.glob(f"{hygiene._shm_prefix()}*")
        if any(f"_{job.port}_" in p.name for job in jobs.values())
    ]
    assert not leftovers
