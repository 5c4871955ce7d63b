"""Shared fixtures: tiny models and tokenizers built on the spot, and the real deepspeed launcher."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_finish(session):
    # DeepSpeed JIT-compiles its CPU shared-memory comm op on first distributed init (once per environment, cached).
    # Build it here, outside every test's timeout, when a multi-rank test is about to run, into the dir every run
    # of this environment uses (the runs the tests start inherit TORCH_EXTENSIONS_DIR).
    if any(item.get_closest_marker("slow") for item in session.items):
        from deepspeed.accelerator import get_accelerator

        from rlad_ds.hygiene import use_environment_build_dir

        use_environment_build_dir()
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load(verbose=False)


@pytest.fixture(scope="session", autouse=True)
def remove_shared_memory_buffers():
    """Every rank removes its own 69 MB /dev/shm/deepspeed_allreduce_buffer_* at exit (rlad_ds.hygiene), but a rank
    the tests kill -9 cannot: remove what this session's runs left once they are over."""
    import time

    start = time.time()
    yield
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if path.stat().st_mtime >= start - 1:
                path.unlink()
        except OSError:  # gone already, or another user's
            pass


class ReachedInit(Exception):
    """Raised instead of initialising distributed: validation passed."""


@pytest.fixture
def no_init(monkeypatch):
    import deepspeed

    def refuse(*args, **kwargs):
        raise ReachedInit

    monkeypatch.setattr(deepspeed, "init_distributed", refuse)
    # train_main fills these for a plain single process; set here so that monkeypatch restores them.
    for key, value in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599"
    ).items():
        monkeypatch.setenv(key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_env(**overrides) -> dict:
    """The environment of a one-process distributed run started without the launcher: rank 0 of 1 on a free port,
    one thread, the repository and tests/ importable; `overrides` last."""
    return {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        **overrides,
    }


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlad_ds.tiny import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """HF dirs on disk: a tiny Qwen3 student, a larger Qwen3 teacher, and a tiny Llama."""
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        "student": save_tiny_model(root / "student", "qwen3", tiny_tokenizer, seed=0, hidden=32, layers=2),
        "teacher": save_tiny_model(root / "teacher", "qwen3", tiny_tokenizer, seed=1, hidden=64, layers=2),
        "llama": save_tiny_model(root / "llama", "llama", tiny_tokenizer, seed=2, hidden=32, layers=2),
    }


def run_deepspeed(args, nprocs=2, timeout=240, cwd=ROOT, env=None):
    """Run `deepspeed --hostfile <localhost slots=nprocs> ARGS` with a hard timeout; a hang fails the test."""
    hostfile = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"hostfile_{os.getpid()}_{nprocs}"
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
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        **(env or {}),
    }
    # Own session so that a hang kills the launcher *and* every rank it started.
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"deepspeed run hung for {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture
def deepspeed_run():
    return run_deepspeed
