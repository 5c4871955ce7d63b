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
from conftest import ROOT, ReachedInit, free_port
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


class _EndOfRun:
    def __init__(self):
        self.ended = False

    def on_step_end(self, trainer, step, metrics):
        pass

    def on_train_end(self, trainer, history):
        self.ended = True


def test_a_short_run_whose_every_reward_call_fails_ends_with_an_error(tmp_path):
    """Fewer steps than --max_failed_reward_steps, every reward call failed in each: the run still exports (the
    end-of-run callbacks run), then ends with one error naming the verifier's error (exit 1), not a silent 0."""
    trainer = _fake_trainer(tmp_path, "--save_steps", "-1", "--max_failed_reward_steps", "3", "--max_steps", "2")

    def train_step(step):
        trainer.reward_error = "#0: RuntimeError: verifier bug on prompt 4"
        return _step_metrics(1.0)

    trainer.train_step, end = train_step, _EndOfRun()
    with pytest.raises(TrainingError) as error:
        trainer.fit([end])
    assert trainer.step == 2 and end.ended
    assert "every reward call failed in all 2 steps of this run" in str(error.value)
    assert "verifier bug on prompt 4" in str(error.value)
    # One step with rewards, or --max_failed_reward_steps 0 (never stop): the run ends normally.
    for flags, fractions in (
        (["--max_failed_reward_steps", "3"], [0.5, 1.0]),
        (["--max_failed_reward_steps", "0"], [1.0, 1.0]),
    ):
        trainer = _fake_trainer(tmp_path, "--save_steps", "-1", "--max_steps", "2", *flags)
        steps = iter(fractions)
        trainer.train_step = lambda step, steps=steps: _step_metrics(next(steps))
        trainer.fit([])


def _signal_metrics(zero_std_frac, reward_mean):
    return {**_step_metrics(), "zero_std_frac": zero_std_frac, "reward_mean": reward_mean}


@pytest.mark.parametrize(
    "pattern,warned_at,words",
    [
        # --lr 1000: reward 0 and every group alike from step 3 on
        (
            [(0.5, 0.4), (0.25, 0.5)] + [(1.0, 0.0)] * 8,
            7,
            "the reward fell from 0.450 (mean of the 2 steps that had signal): the policy collapsed, lower --lr",
        ),
        ([(0.5, 0.4)] + [(1.0, 1.0)] * 9, 6, "the reward rose from 0.400"),
        ([(1.0, 0.0)] * 10, 5, "too hard or too easy for this student"),
        ([(0.5, 0.4)] + [(1.0, 0.0)] * 4 + [(0.5, 0.4)] + [(1.0, 0.0)] * 4, None, ""),  # never 5 in a row
    ],
)
def test_a_vanished_learning_signal_is_warned_once_and_the_run_goes_on(tmp_path, caplog, pattern, warned_at, words):
    trainer = _fake_trainer(tmp_path, "--save_steps", "-1", "--max_steps", str(len(pattern)))
    steps = iter(pattern)
    trainer.train_step = lambda step: _signal_metrics(*next(steps))
    with caplog.at_level(logging.WARNING, logger="rlad_ds"):
        trainer.fit([])
    warned = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
    if warned_at is None:
        assert warned == [] and trainer.health.warnings() == []
        return
    assert len(warned) == 1 and warned[0].startswith(f"step {warned_at}: no learning signal for 5 steps"), warned
    assert words in warned[0]
    # Still vanished at the end: the run's last line repeats it, with the whole stretch.
    assert trainer.health.warnings() == [trainer.health.no_signal_line()]
    assert f"no learning signal for {len(pattern) - warned_at + 5} steps" in trainer.health.warnings()[0]


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


# ---- JIT builds: one build dir per environment, announced; a signal inside the process group's start ----------


def test_jit_builds_are_kept_per_environment(tmp_path, monkeypatch):
    """Two environments (sys.prefix) sharing torch's default build root get a dir each, named by Python, torch and
    DeepSpeed; the same environment gets the same dir; a TORCH_EXTENSIONS_DIR the user set wins."""
    from importlib.metadata import version

    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    dirs = {}
    for prefix in ("/envs/a", "/envs/b", "/envs/a"):
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setattr(sys, "prefix", prefix)
        path = hygiene.use_environment_build_dir()
        assert os.environ["TORCH_EXTENSIONS_DIR"] == str(path) and path.parent == tmp_path
        assert f"torch{version('torch')}" in path.name and f"deepspeed{version('deepspeed')}" in path.name
        assert dirs.setdefault(prefix, path) == path
    assert dirs["/envs/a"] != dirs["/envs/b"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert hygiene.use_environment_build_dir() == tmp_path / "mine"


def test_training_builds_ops_in_its_environments_dir_and_says_so_once(
    tiny_models, tmp_path, no_init, monkeypatch, caplog
):
    """Before DeepSpeed starts the process group (where it compiles its CPU comm op), the build dir is this
    environment's and, when the op is not built there yet, one line says what is compiled, why and where."""
    import torch.utils.cpp_extension

    from rlad_ds.cli import train_main

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "get_default_build_root", lambda: str(tmp_path / "ext"))
    with caplog.at_level(logging.INFO, logger="rlad_ds"), pytest.raises(ReachedInit):
        train_main(base_args(tiny_models, tmp_path / "out", "--eval_size", "0"))
    build_dir = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert build_dir.parent == tmp_path / "ext"
    said = [r.getMessage() for r in caplog.records if "compiling DeepSpeed's" in r.getMessage()]
    assert len(said) == 1 and "deepspeed_shm_comm" in said[0] and str(build_dir / "deepspeed_shm_comm") in said[0]
    caplog.clear()
    (build_dir / "deepspeed_shm_comm").mkdir(parents=True)
    (build_dir / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")  # built: nothing to say
    with caplog.at_level(logging.INFO, logger="rlad_ds"), pytest.raises(ReachedInit):
        train_main(base_args(tiny_models, tmp_path / "out", "--eval_size", "0"))
    assert not [r for r in caplog.records if "compiling DeepSpeed's" in r.getMessage()]


def test_the_offloaded_optimizers_build_is_announced(tmp_path, monkeypatch, caplog):
    """zero3_offload.json makes DeepSpeed compile cpu_adam in deepspeed.initialize: said before, like the comm op."""
    from rlad_ds.ds_config import jit_built_ops, student_ds_config

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def ops_of(ds_config, device: str = "cpu"):
        cfg, _ = parse_config(["--deepspeed", str(ROOT / "ds_configs" / ds_config)])
        return jit_built_ops(student_ds_config(cfg, 1, device))

    assert ops_of("zero3.json") == ops_of("zero3.json", "cuda") == []  # torch's AdamW (fused on CUDA): no build
    fused = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    fused["optimizer"].setdefault("params", {})["torch_adam"] = False  # DeepSpeed's own FusedAdam, asked for
    (tmp_path / "fused.json").write_text(json.dumps(fused))
    assert [builder for builder, _ in ops_of(tmp_path / "fused.json", "cuda")] == ["FusedAdamBuilder"]
    ops = ops_of("zero3_offload.json")
    assert [builder for builder, _ in ops] == ["CPUAdamBuilder"]
    with caplog.at_level(logging.INFO, logger="rlad_ds"):
        assert hygiene.announce_op_build(*ops[0])
    assert "compiling DeepSpeed's cpu_adam op" in caplog.text and str(tmp_path / "cpu_adam") in caplog.text


def test_a_signal_while_the_process_group_starts_leaves_no_shm_buffer(tmp_path):
    """Ctrl-C while DeepSpeed builds its comm op or the ranks map each other's buffers exits from inside
    init_distributed, after the op may have created this rank's 69 MB buffer: it is removed at exit all the same."""
    port = str(free_port())
    buffer = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    code = (
        "import os, signal, time, deepspeed\n"
        "from rlad_ds import distributed, signals\n"
        "signals.guard_signals()\n"
        "def init_distributed(**kwargs):\n"
        f"    open({str(buffer)!r}, 'wb').close()  # what the comm op's initialize does first\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "deepspeed.init_distributed = init_distributed\n"
        "distributed.init_process_group(60)\n"
    )
    env = {
        **_script_env(),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
    }
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert not buffer.exists()
    finally:
        buffer.unlink(missing_ok=True)


def test_a_signal_during_a_build_leaves_no_compiler_running(tmp_path):
    """A signal during a JIT build exits the rank inside `subprocess.run`, which SIGKILLs ninja; the compiler ninja
    started in its own process group is orphaned. The rank adopts it and ends it at exit."""
    import psutil

    pid_file = tmp_path / "compiler.pid"
    ninja = (
        "import subprocess, sys, time; p = subprocess.Popen(['sleep', '300'], process_group=0); "
        "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(300)"
    )
    code = (
        "import os, signal, subprocess, sys, threading, time, deepspeed\n"
        "from rlad_ds import distributed, signals\n"
        "signals.guard_signals()\n"
        "def interrupt():\n"
        f"    while not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "def init_distributed(**kwargs):  # where DeepSpeed compiles its comm op: ninja, which starts the compiler\n"
        "    threading.Thread(target=interrupt, daemon=True).start()\n"
        f"    subprocess.run([sys.executable, '-c', {ninja!r}, {str(pid_file)!r}])\n"
        "deepspeed.init_distributed = init_distributed\n"
        "distributed.init_process_group(60)\n"
    )
    env = {**_script_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(free_port()), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    with open(tmp_path / "stderr", "w") as stderr:  # not a pipe: an orphaned compiler would hold it open
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=120
        )
    compiler = int(pid_file.read_text())
    try:
        assert proc.returncode == 130, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.5)  # init reaps it
        assert not psutil.pid_exists(compiler) or psutil.Process(compiler).status() == psutil.STATUS_ZOMBIE
    finally:
        if psutil.pid_exists(compiler):
            os.kill(compiler, signal.SIGKILL)


# ---- every run's last line --------------------------------------------------------------------------------------


def test_every_run_ends_with_a_line_of_what_it_reached_and_where_its_model_is(tmp_path):
    """Not only the demo: the last line names the step, the held-out accuracy before and after (a resumed run's
    "before" from its metrics.jsonl), the last training reward, the model and metrics paths, and what the run's
    health still warns about."""
    from rlad_ds.cli import _final_line

    trainer = _fake_trainer(tmp_path, "--save_steps", "-1", "--max_steps", "3", "--eval_size", "0")
    trainer.train_step = lambda step: _signal_metrics(0.5, 0.25)
    history = trainer.fit([])
    assert _final_line(trainer.cfg, trainer, history) == (
        f"rlad_ds: done: step 3 of 3, --method rlad; held-out accuracy not measured (--eval_size 0); training "
        f"reward 0.250 at the last step; model {tmp_path / 'student_hf'}, metrics {tmp_path / 'metrics.jsonl'}"
    )
    # Resumed at step 3 of a run that evaluated at step 0, to step 10 with the signal gone from step 5.
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_accuracy": 0.545}) + "\n")
    trainer = _fake_trainer(tmp_path, "--save_steps", "-1", "--max_steps", "10", "--max_failed_reward_steps", "0")
    trainer.step, trainer.eval_examples = 3, [{}] * 200
    steps = iter([(0.5, 0.5)] + [(1.0, 0.0)] * 6)
    trainer.train_step = lambda step: _signal_metrics(*next(steps))
    trainer.evaluate = lambda: {"overall": {"mean@1": 0.9}, "ks": [1], "score_errors": 0, "score_messages": []}
    trainer._evaluate = lambda step, metrics: 0.9
    history = trainer.fit([])
    line = _final_line(trainer.cfg, trainer, history)
    assert line.startswith(
        "rlad_ds: done: step 10 of 10, --method rlad (resumed at step 3); held-out accuracy 0.545 -> 0.900 "
        "(200 prompts); training reward 0.000 at the last step; model "
    )
    assert line.endswith("; warning: " + trainer.health.no_signal_line()) and "for 6 steps" in line
