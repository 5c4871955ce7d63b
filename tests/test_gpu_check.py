"""The GPU check (benchmarks.gpu_check) without a GPU: its runner under sections that hang, raise, die or cannot
exit (tests/gpu_check_fakes.py), its flags, its FLOP count and comparisons, its installs from carried wheels, and
(slow) the whole `--cpu-smoke` run, every real section at tiny sizes."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import SECTIONS, Section, format_table, run_sections
from benchmarks.gpu_check_base import (
    Check,
    attention_flops_per_token,
    matmul_params,
    mfu,
    peak_tflops,
    settings_for,
    train_flops_per_token,
)
from benchmarks.gpu_check_rollout import greedy_agreement
from benchmarks.gpu_check_setup import index_unreachable, install

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(("name", "fake_function", budget_s), ...) -> {name: row}; the rows on disk must equal those returned."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))

    def go(*sections, total_s=120.0, grace_s=1.0):
        out, work = tmp_path / "out", tmp_path / "work"
        out.mkdir()
        work.mkdir()
        settings = {**settings_for(True, work, None, None), "out": str(out), "exit_grace_s": grace_s}
        specs = [Section(name, f"gpu_check_fakes:{function}", budget) for name, function, budget in sections]
        rows = run_sections(specs, settings, out, work, total_s, {})
        assert [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()] == rows
        return {row["section"]: row for row in rows}

    return go


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_a_hanging_section_times_out_with_its_numbers_and_its_processes_end(run):
    rows = run(("hang", "hangs_after_a_number", 4), ("after", "reads_rows", 60))
    hang = rows["hang"]
    assert hang["status"] == "timeout" and hang["measured"] == 1.5
    assert 4 <= hang["seconds"] < 20 and hang["budget_s"] == 4
    assert not alive(hang["grandchild"]), "a process the section started outlived it"
    # The row was on disk before the next section started.
    assert rows["after"]["status"] == "ok" and rows["after"]["rows_before"] == ["hang"]


def test_errors_are_one_line_rows_and_the_run_goes_on(run):
    rows = run(("raise", "raises", 60), ("die", "dies", 60), ("skip", "skips", 60), ("fine", "fine", 60))
    assert rows["raise"]["status"] == "error: ValueError: boom" and rows["raise"]["before"] == 1
    assert rows["die"]["status"] == "error: exit code 3: about to die"
    assert rows["skip"]["status"] == "skipped: nothing to do here"
    assert rows["fine"]["status"] == "ok" and rows["fine"]["answer"] == 42
    assert all("host_rss_gib" in row["peak"] for name, row in rows.items() if name != "die")


def test_a_section_that_cannot_exit_keeps_its_row_and_not_its_budget(run):
    row = run(("stuck", "hangs_at_exit", 60), grace_s=1.0)["stuck"]
    assert row["status"] == "ok" and row["done"] is True
    assert row["seconds"] < 20


def test_sections_past_the_total_budget_are_skipped(run, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_SECTION_S", 1.0)
    rows = run(("hang", "hangs_after_a_number", 60), ("fine", "fine", 60), total_s=3.0)
    assert rows["hang"]["status"] == "timeout" and rows["hang"]["budget_s"] <= 3.0
    assert rows["fine"]["status"] == "skipped: the run's 3 s were spent before it"


@pytest.mark.parametrize(
    "argv, fix",
    [
        (["--cpu-smoke"], "--out DIR is required"),
        (["--sections", "env,nope"], "unknown 'nope'; choose from install, env"),
        (["--budget", "rollout"], "write NAME=SECONDS"),
        (["--budget", "nope=3"], "NAME is one of"),
        (["--peak_tflops", "0"], "--peak_tflops must be > 0"),
        (["--wheels", "/nonexistent/wheels"], "is not a folder"),
        (["--out", "FILE"], "is a file; pass a folder"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, fix, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = [str(afile) if a == "FILE" else a for a in argv]
    if "--out" not in argv and argv != ["--cpu-smoke"]:
        argv += ["--out", str(tmp_path / "out"), "--cpu-smoke"]
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fix in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_without_cuda_the_gpu_run_says_so(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device is visible; pass --cpu-smoke" in capsys.readouterr().err


def test_flops_count_causal_attention_once():
    # One sequence of T alone: 6 * layers * T * attn_dim per token, half of the 12 L T d that counts every pair.
    assert attention_flops_per_token(28, 2048, [8192]) == 6 * 28 * 8192 * 2048
    assert train_flops_per_token(100, 2, 8, [16]) == 6 * 100 + 6 * 2 * 16 * 8
    # A packed micro-batch costs what its sequences cost alone: no attention across them.
    lengths = [8192, 3072, 200]
    alone = sum(attention_flops_per_token(28, 2048, [t]) * t for t in lengths)
    assert attention_flops_per_token(28, 2048, lengths) * sum(lengths) == pytest.approx(alone)
    assert matmul_params(1000, vocab=10, hidden=20, tied=True) == 1000
    assert matmul_params(1000, vocab=10, hidden=20, tied=False) == 800
    flops = train_flops_per_token(596_049_920, 28, 16 * 128, [8192])
    assert mfu(10_000, flops, 989.0) == pytest.approx(10_000 * flops / 989e12)
    assert mfu(10_000, flops, None) is None


def test_peak_lookup():
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some GPU") is None and peak_tflops("Some GPU", 123) == 123.0


def test_table_rows_say_status_time_memory_and_what_was_skipped():
    rows = [
        {
            "section": "train",
            "status": "ok",
            "seconds": 12.5,
            "budget_s": 100,
            "peak": {"device_used_gib": 30.25},
            "summary": "9,000 tok/s",
            "skipped": {"mfu": "no peak"},
        },
        {"section": "rollout", "status": "timeout", "seconds": 240, "budget_s": 240},
    ]
    lines = format_table(rows).splitlines()
    assert lines[2] == "| train | ok | 12.5 / 100 | 30.25 (device_used) | 9,000 tok/s [skipped: mfu] |"
    assert lines[3] == "| rollout | timeout | 240 / 240 |  |  |"


def test_greedy_agreement_counts_rows_and_first_divergences():
    ours = [[1, 2, 3], [1, 2, 3, 4], [5, 6]]
    theirs = [[1, 2, 3], [1, 9, 3, 4], [5, 6, 7]]
    stats = greedy_agreement(ours, theirs)
    assert stats["greedy_rows"] == 3 and stats["greedy_equal_rows"] == 1
    assert stats["greedy_first_divergence_median"] == 1.5  # at 1, and at 2 where one response is longer
    assert stats["greedy_shared_prefix_frac"] == pytest.approx((3 + 1 + 2) / (3 + 4 + 3))


def _wheel(folder: Path, name: str = "gpucheckdemo") -> Path:
    """A minimal pure-Python wheel holding `name` with VALUE = 7."""
    folder.mkdir()
    path = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 7\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


def test_carried_wheels_install_offline_into_their_own_folder(tmp_path):
    wheel = _wheel(tmp_path / "whl")
    work = tmp_path / "work"
    work.mkdir()
    check = Check(settings_for(True, work, None, str(wheel.parent)), work / "install.json")
    install(check)
    site = check.results["site_dirs"]
    assert check.results["carried"] == [wheel.name] and site == [str(work / "site")]
    assert check.results["skipped"]["flash-attn"] == "not installed: --cpu-smoke installs nothing"
    env = {**os.environ, "PYTHONPATH": site[0]}
    out = subprocess.run(
        [sys.executable, "-c", "import gpucheckdemo; print(gpucheckdemo.VALUE)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "7", out.stderr


def test_an_unreachable_index_is_told_apart_quickly(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    assert index_unreachable(2.0).startswith(f"no package index reachable (127.0.0.1:{port}: ConnectionRefused")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cpu_smoke_runs_every_section(tmp_path):
    """The command the issue names: every section on CPU at tiny sizes, one row each, none an error."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1450,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {
        json.loads(line)["section"]: json.loads(line)
        for line in (out / "gpu_check.jsonl").read_text().split("\n")
        if line
    }
    assert list(rows) == [s.name for s in SECTIONS]
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(rows, "ok")
    attention = rows["attention"]
    assert set(attention["variants"]) == {"padded_sdpa", "packed_sdpa"}
    assert all(v["max_abs_diff"] <= attention["tolerance"] for v in attention["variants"].values())
    assert "GPU only" in attention["skipped"]["packed_flex_attention"]
    assert rows["train"]["tokens_per_s"] > 0 and rows["train"]["grad_norm"] > 0 and "mfu" in rows["train"]["skipped"]
    assert rows["teacher"]["score_seconds"] > 0
    rollout = rows["rollout"]
    assert rollout["optimizer_steps"] == 1 and rollout["gathered_tokens"] > 0
    if importlib.util.find_spec("vllm") is None:
        assert "vLLM is not installed" in rollout["skipped"]["vllm"]
    else:  # vLLM's CPU build: its log-probs of its own greedy tokens are the trainer's, up to bf16 rounding
        assert rollout["vllm_tokens"] > 0 and rollout["greedy_rows"] == 2
        assert 0 < rollout["logprob_tokens"] <= 2 * 8 and rollout["logprob_max_abs_diff"] < 0.1
    expected = "gathered" if importlib.util.find_spec("vllm") is None else "vllm"
    assert {c["rollout"] for c in rows["auto"]["choices"].values()} == {expected}
    assert "| section | status |" in run.stdout and (out / "gpu_check.md").is_file()
    assert "===== rollout: ok" in (out / "gpu_check.log").read_text()
