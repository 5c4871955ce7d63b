"""GPU check: one prepared run that measures, on a GPU lent for minutes, what the CPU suite cannot, and survives
itself: every section runs in its own Python process under its own time budget, and its JSON row is appended to
`OUT/gpu_check.jsonl` the moment it ends, so that a crash, a hang or an out-of-memory loses nothing before it.

On the device machine (one H200; the command runs in the repository root; the image has torch but not deepspeed,
and no package index is reachable there), first, here, once:

    python -m benchmarks.gpu_check --fetch_wheels .whl     # deepspeed + what it imports, for CPython 3.12

then one call of the device tool with carry [".whl"] and timeout_s 600 (the run ends by itself within 8 minutes,
installs included: the sections share --total_s, 465 s by default):

    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT

and anywhere, every section on CPU at tiny sizes, GPU-only parts recorded as skipped with the reason (the test
suite runs it, so the script cannot rot between GPU windows):

    python -m benchmarks.gpu_check --cpu-smoke --out DIR

Sections, in order (docs/gpu.md says what each measures): install (carried wheels; vLLM and flash-attn only as
prebuilt wheels), env (versions, device, a bf16 matmul rate), auto (what `auto` picks for a tiny Llama and a tiny
Qwen3), attention (8K + 3K + 200 tokens: padded sdpa, packed sdpa, packed flex_attention, packed flash-attn varlen;
log-probs against an fp32 reference, and times), train (a bf16 RLAD step at 8K on a Qwen3-0.6B-shaped student,
tokens/s and MFU with causal attention counted as half the square), teacher (a Qwen3-1.7B-shaped teacher scoring
8K tokens with parameter offload: time and GB/s), rollout (one optimizer step, then 16 prompts x 8 samples x 1K
tokens from the gathered engine and from vLLM at utilization 0.5; greedy tokens and log-probs compared). Each row:
`section`, `status` (ok / timeout / error: <one line> / skipped: <why>), `seconds`, `budget_s`, `peak` memory,
the numbers, `skipped` parts with reasons, and a `summary`; the same table is printed last and written to
OUT/gpu_check.md, and each section's log tail to OUT/gpu_check.log.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu_check_base import Check, SectionSkipped, settings_for

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 465.0  # 8 minutes less 15 s for the runner (its torch import first, the last section ending at its deadline)
MIN_SECTION_S = 10.0  # with less of the run's time left, the remaining sections are skipped
EXIT_GRACE_S = 10.0  # a section that has written its row but cannot exit (a library's thread) is ended after this
LOG_TAIL_BYTES = 256 * 1024  # per section, into OUT/gpu_check.log
# --cpu-smoke checks that every section runs, not how fast: each starts a fresh interpreter that imports torch,
# transformers and deepspeed, and a section took up to 87 s on a busy 2-core machine; the budgets are the GPU's.
SMOKE_BUDGET_SCALE = 4.0


@dataclass(frozen=True)
class Section:
    name: str
    target: str  # "module:function" taking a gpu_check_base.Check
    budget_s: float


SECTIONS = (
    Section("install", "benchmarks.gpu_check_setup:install", 90),
    Section("env", "benchmarks.gpu_check_setup:environment", 45),
    Section("auto", "benchmarks.gpu_check_setup:auto_choice", 60),
    Section("attention", "benchmarks.gpu_check_train:attention", 120),
    Section("train", "benchmarks.gpu_check_train:train_step", 100),
    Section("teacher", "benchmarks.gpu_check_train:teacher_offload", 120),
    Section("rollout", "benchmarks.gpu_check_rollout:rollout", 240),
)


class UsageError(ValueError):
    """A flag the run cannot start with; one line, exit 2."""


# ---- one section, in its own process ------------------------------------------------------------------------------


def child_env(smoke: bool, site_dirs: list[str]) -> dict:
    """The sections' environment: installed folders and the repository first on the path; on a smoke run the CPU
    even where a GPU is visible."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([*site_dirs, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if smoke:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def _end(process: subprocess.Popen) -> None:
    """Stop the section's process and everything it started (its own process group), politely first."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is None:
            _signal_group(process.pid, sig)
            try:
                process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
    _signal_group(process.pid, signal.SIGKILL)  # what it left behind (compile workers, ...)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's ended children (a section's process and what it started)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_section(section: Section, budget_s: float, settings_path: Path, work: Path, env: dict) -> dict:
    """Run one section in a fresh interpreter for at most `budget_s`; its row, whatever happened."""
    result, log = work / f"{section.name}.json", work / f"{section.name}.log"
    result.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--section",
        section.name,
        "--target",
        section.target,
        "--settings",
        str(settings_path),
        "--result",
        str(result),
    ]
    start, timed_out, cpu_before = time.monotonic(), False, _children_cpu_s()
    with log.open("w") as sink:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _end(process)
    found = json.loads(result.read_text()) if result.is_file() else {}
    status = found.pop("status", None)
    if status is None:
        status = "timeout" if timed_out else f"error: {_exit_text(process.returncode)}: {_last_line(log)}"
    elif timed_out or process.returncode:  # the row was written; the process did not end cleanly after it
        found["exit"] = "ended at its deadline after writing its row" if timed_out else _exit_text(process.returncode)
    seconds, cpu = round(time.monotonic() - start, 1), round(_children_cpu_s() - cpu_before, 1)
    return {
        "section": section.name,
        "status": status,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "budget_s": round(budget_s, 1),
        **found,
    }


def section_main(target: str, settings_path: str, result_path: str) -> int:
    """Inside a section's process: run `target` on a Check; the row's status says how it ended."""
    from rlad_ds.errors import error_line
    from rlad_ds.hygiene import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)  # the runner killed: nothing of this section outlives it
    settings = json.loads(Path(settings_path).read_text())
    check = Check(settings, Path(result_path))
    check.save()
    try:
        module, _, name = target.partition(":")
        getattr(importlib.import_module(module), name)(check)
        status = "ok"
    except SectionSkipped as reason:
        status = f"skipped: {reason}"
    except (Exception, SystemExit) as error:
        traceback.print_exc()
        status = f"error: {error_line(error, 300)}"
    check.record(status=status)
    sys.stdout.flush()
    exit_timer = threading.Timer(settings.get("exit_grace_s", EXIT_GRACE_S), os._exit, args=(0,))
    exit_timer.daemon = True  # ends an exit that hangs (a library's thread or atexit hook) once the row is safe
    exit_timer.start()
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """End the section's process group as a run does (NCCL's would otherwise be torn down at interpreter exit)."""
    if "torch.distributed" in sys.modules:
        from rlad_ds.distributed import end_process_group

        try:
            end_process_group(barrier=False)
        except Exception:  # the row is written; how the group ends changes nothing in it
            traceback.print_exc()


# ---- the run ----------------------------------------------------------------------------------------------------


def _append(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _log_tail(log: Path) -> str:
    if not log.is_file():
        return ""
    data = log.read_bytes()
    cut = len(data) > LOG_TAIL_BYTES
    return ("[... earlier output cut ...]\n" if cut else "") + data[-LOG_TAIL_BYTES:].decode(errors="replace")


def run_sections(sections, settings: dict, out: Path, work: Path, total_s: float, budgets: dict) -> list[dict]:
    """Every section in order, within `total_s` altogether; each row appended to OUT/gpu_check.jsonl at once."""
    deadline = time.monotonic() + total_s
    settings_path = work / "settings.json"
    settings_path.write_text(json.dumps(settings))
    rows_path, log_path = out / "gpu_check.jsonl", out / "gpu_check.log"
    rows_path.write_text("")
    log_path.write_text("")
    site_dirs: list[str] = []
    rows = []
    for section in sections:
        left = deadline - time.monotonic()
        budget = min(budgets.get(section.name, section.budget_s), left)
        if left < MIN_SECTION_S:
            row = {"section": section.name, "status": f"skipped: the run's {total_s:g} s were spent before it"}
        else:
            row = run_section(section, budget, settings_path, work, child_env(settings["smoke"], site_dirs))
        site_dirs += row.get("site_dirs", [])
        rows.append(row)
        _append(rows_path, json.dumps(row, default=str) + "\n")
        header = f"===== {section.name}: {row['status']} ({row.get('seconds', 0)} s)\n"
        _append(log_path, header + _log_tail(work / f"{section.name}.log") + "\n")
        print(f"gpu_check: {section.name}: {row['status']} ({row.get('seconds', 0)} s)", flush=True)
    return rows


def _peak_text(peak: dict | None) -> str:
    peak = peak or {}
    for key in ("device_used_gib", "torch_allocated_gib", "host_rss_gib"):
        if key in peak:
            return f"{peak[key]:.2f} ({key.rsplit('_', 1)[0]})"
    return ""


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table: section, status, seconds (of the budget), peak memory, summary."""
    lines = ["| section | status | seconds | peak GiB | result |", "|---|---|---|---|---|"]
    for row in rows:
        status = row["status"] if len(row["status"]) <= 120 else row["status"][:117] + "..."
        seconds = f"{row.get('seconds', 0):g} / {row.get('budget_s', 0):g}"
        summary = row.get("summary", "")
        if row.get("skipped"):
            summary += f" [skipped: {', '.join(row['skipped'])}]"
        lines.append(f"| {row['section']} | {status} | {seconds} | {_peak_text(row.get('peak'))} | {summary} |")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.jsonl, gpu_check.md and gpu_check.log")
    parser.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true", help="every section on CPU, tiny")
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(s.name for s in SECTIONS)}")
    parser.add_argument("--peak_tflops", type=float, help="peak dense bf16 TFLOP/s (default: by device name)")
    parser.add_argument("--total_s", type=float, help=f"seconds for the whole run (default {TOTAL_S:g})")
    parser.add_argument("--budget", action="append", default=[], help="NAME=SECONDS: one section's time budget")
    parser.add_argument("--wheels", help="folder of wheels to install first (default: .whl in the repository, GPU)")
    parser.add_argument("--work", help="folder for model dirs and logs (default: a temporary one, removed)")
    parser.add_argument("--fetch_wheels", metavar="DIR", help="download / build the wheels to carry, then exit")
    parser.add_argument("--wheel_python", default="3.12", help="CPython version of the device (--fetch_wheels)")
    for hidden in ("--section", "--target", "--settings", "--result"):  # a section's own process
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[Section], dict]:
    """The sections to run and their budgets; a UsageError (one line) for any flag that cannot work."""
    if not args.out:
        raise UsageError("--out DIR is required (where gpu_check.jsonl goes)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a folder")
    by_name = {s.name: s for s in SECTIONS}
    names = args.sections.split(",") if args.sections else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"--sections: unknown {unknown[0]!r}; choose from {', '.join(by_name)}")
    budgets = {}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise UsageError(f"--budget {item!r}: write NAME=SECONDS, e.g. rollout=300") from None
        if name not in by_name or budgets[name] <= 0:
            raise UsageError(f"--budget {item!r}: NAME is one of {', '.join(by_name)} and SECONDS > 0")
    for flag in ("peak_tflops", "total_s"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.wheels and not Path(args.wheels).is_dir():
        raise UsageError(f"--wheels {args.wheels} is not a folder; pass the folder --fetch_wheels filled")
    return [s for s in SECTIONS if s.name in names], budgets


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:
        return section_main(args.target, args.settings, args.result)
    if args.fetch_wheels:
        from benchmarks.gpu_check_setup import fetch_wheels

        print("\n".join(fetch_wheels(Path(args.fetch_wheels), args.wheel_python)))
        return 0
    try:
        sections, budgets = check_args(args)
    except UsageError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    if not args.cpu_smoke and not _cuda_visible():
        print("gpu_check: no CUDA device is visible; pass --cpu-smoke to run every section on CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    # The carried wheels are the device's (CPython 3.12, CUDA image): a smoke run uses only those it is given.
    carried = ROOT / ".whl"
    wheels = args.wheels or (str(carried) if carried.is_dir() and not args.cpu_smoke else None)
    settings = {**settings_for(args.cpu_smoke, work, args.peak_tflops, wheels), "out": str(out)}
    scale = SMOKE_BUDGET_SCALE if args.cpu_smoke else 1.0
    budgets = {s.name: budgets.get(s.name, s.budget_s * scale) for s in sections}
    try:
        rows = run_sections(sections, settings, out, work, args.total_s or TOTAL_S * scale, budgets)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    table = format_table(rows)
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return 1 if any(row["status"].startswith(("error", "timeout")) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
