"""Shared pieces of the benchmarks: records and their goals, the table, memory probes, workers, model dirs.

Every record is `{"name", "value", "unit", "goal", "meets"}`; `meets` is always computed from `value` and
`goal` by `make_record`, never written by hand. A goal is `"<op> <number>"` with op one of >=, <=, ==, >, <.
"""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from rlad_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = ("name", "value", "unit", "goal", "meets")
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}


def parse_goal(goal: str) -> tuple[str, float]:
    """'>= 5' -> ('>=', 5.0); anything else raises ValueError."""
    parts = goal.split()
    if len(parts) != 2 or parts[0] not in _OPS:
        raise ValueError(f"goal {goal!r} is not '<op> <number>' with op in {sorted(_OPS)}")
    return parts[0], float(parts[1])


def meets_goal(value: float, goal: str) -> bool:
    """Whether a measured value meets its goal; a missing (NaN / inf) measurement never does."""
    op, threshold = parse_goal(goal)
    if value is None or not math.isfinite(value):
        return False
    return bool(_OPS[op](value, threshold))


def make_record(name: str, value: float, unit: str, goal: str) -> dict:
    value = float("nan") if value is None else float(value)
    return {"name": name, "value": value, "unit": unit, "goal": goal, "meets": meets_goal(value, goal)}


def format_value(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "failed"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown_table(records: list[dict], details: dict[str, str] | None = None) -> str:
    """The records as a markdown table; `details` (name -> text) adds the raw measurements behind each value."""
    details = details or {}
    lines = ["| benchmark | value | unit | goal | meets | measured |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['name']} | {format_value(r['value'])} | {r['unit']} | {r['goal']} | "
            f"{'yes' if r['meets'] else 'NO'} | {details.get(r['name'], '')} |"
        )
    return "\n".join(lines)


def write_json(records: list[dict], path: str | Path) -> None:
    clean = [{key: r[key] for key in RECORD_KEYS} for r in records]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean, indent=1) + "\n")


# ---- memory -----------------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# Memory workers: glibc's dynamic mmap threshold lets freed blocks up to 32 MiB stay in the heap, so a later
# allocation can reuse them without raising RSS; a fixed threshold returns every large block to the OS on free,
# so the peak RSS growth over the baseline is the peak of live memory (within one page per block).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ---- machine ----------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import deepspeed
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg(),
    }


# ---- subprocess workers -----------------------------------------------------------------------------------------


def worker_env(extra: dict | None = None) -> dict:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_worker(cmd: list[str], out_json: Path, timeout: float, env: dict | None = None) -> dict:
    """Run a worker command that writes its result to `out_json`; return that result or raise with its log."""
    out_json = Path(out_json)
    out_json.unlink(missing_ok=True)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=worker_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n{log[-3000:]}") from None
    if proc.returncode != 0 or not out_json.is_file():
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{log[-3000:]}")
    return json.loads(out_json.read_text())


def deepspeed_cmd(module: str, args: list[str], nprocs: int, workdir: Path) -> list[str]:
    """The real deepspeed launcher on localhost with `nprocs` ranks running `python -m module`, or the script
    `module` if it ends in .py (as tests run it)."""
    hostfile = Path(workdir) / f"hostfile_{nprocs}"
    hostfile.write_text(f"localhost slots={nprocs}\n")
    target = [module] if module.endswith(".py") else ["--module", module]
    return [
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
        *target,
        *map(str, args),
    ]


# ---- models -----------------------------------------------------------------------------------------------------


def save_model_dir(
    path: str | Path, tokenizer=None, *, vocab_size: int | None = None, seed: int = 0, never_eos: bool = False, **size
) -> Path:
    """A random tiny Qwen3 HF dir (see rlad_ds.tiny.tiny_config); `never_eos` zeroes the lm-head row of EOS.

    With random weights the other logits of a step are spread around 0 and the largest is far above it, so an
    EOS logit of exactly 0 is never the greedy choice: every response runs to max_new_tokens, which makes
    rollout throughput comparable between engines.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlad_ds.tiny import tiny_config

    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", vocab, **size))
    if never_eos:
        with torch.no_grad():
            model.get_output_embeddings().weight[model.config.eos_token_id].zero_()
    if tokenizer is not None:
        model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def count_params(path: str | Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
