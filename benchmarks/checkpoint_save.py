"""What a checkpoint's verification costs: rlad_ds's save with `--checkpoint_verify size` and `sha256` beside
DeepSpeed's save alone, on the same ZeRO-3 engine, in one process, rounds interleaved.

    python -m benchmarks.checkpoint_save [--params 120e6] [--rounds 3] [--dir DIR] [--json FILE]

A stack of square Linear layers under the trainer's ZeRO-3 config (fp32 on CPU: 4 bytes of weights and 8 of Adam
states per parameter; one optimizer step makes the Adam states exist), so 85M parameters write about 1 GB. After
one untimed save with each method, each round saves once with each method (every other round in reverse order)
into DIR (a temporary dir on local disk by default); every checkpoint is deleted and the page cache written back
(`sync`, untimed) before the next save. Timed per method:

  deepspeed      engine.save_checkpoint alone (what DeepSpeed writes: model states and optimizer partitions)
  size           rlad_ds.checkpoint.protocol.save_checkpoint, --checkpoint_verify size (sizes in the manifest)
  sha256         the same, --checkpoint_verify sha256 (DeepSpeed's files hashed as they are written)
  sha256 after   DeepSpeed's save, then every file read back and hashed (hashing after the write)

and, on the last checkpoint, what a resume's verification costs in each mode (`manifest.verify`, one process).
The table gives, per method, the median over rounds of its time over DeepSpeed's in the same round (wall clock,
and CPU time of the process's threads), and the wall seconds of every round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

METHODS = ("deepspeed", "size", "sha256", "sha256 after")


def build_engine(params: float):
    """A ZeRO-3 engine of square Linear layers with about `params` parameters, after one optimizer step."""
    import deepspeed
    import torch

    from rlad_ds.distributed import init_process_group, single_process_env
    from rlad_ds.ds_config import CONFIG_DIR, fill_train_config

    single_process_env()
    init_process_group(600)
    width = 4096
    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    config = fill_train_config(
        CONFIG_DIR / "zero3.json",
        world_size=1,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        lr=1e-4,
        gradient_clipping=1.0,
        device="cpu",
    )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.backward(engine(torch.randn(2, width)).square().mean())
    engine.step()
    return engine, sum(p.ds_numel for p in model.parameters())


def timed_save(engine, method: str, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, every thread) of one save."""
    from rlad_ds.checkpoint import manifest, protocol

    state = {"step": 1, "world_size": 1, "controls": {}, "bad_steps": 0, "identity": {}}
    start, cpu = time.perf_counter(), time.process_time()
    if method in ("size", "sha256"):
        protocol.save_checkpoint(engine, out, 1, state, keep_last=1, verify_mode=method)
    else:
        engine.save_checkpoint(str(out), tag="step_00000001", save_latest=False)
        if method == "sha256 after":
            directory = out / "step_00000001"
            manifest.entries({p.name: p for p in directory.iterdir()}, "sha256")
    return time.perf_counter() - start, time.process_time() - cpu


def verify_seconds(directory: Path) -> dict:
    """Seconds a resume's verification of `directory` takes in each mode, for one process."""
    from rlad_ds.checkpoint import manifest

    marker = json.loads((directory / manifest.MARKER).read_text())
    seconds = {}
    for mode, digests in (("size", False), ("sha256", True)):
        start = time.perf_counter()
        assert manifest.verify(directory, digests=digests) is None
        seconds[mode] = time.perf_counter() - start
    return {**seconds, "checksum": marker["checksum"]}


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run(args) -> dict:
    engine, params = build_engine(args.params)
    base = Path(tempfile.mkdtemp(prefix="rlad_ds_ckpt_bench_", dir=args.dir))
    wall, cpu, size, resume = {m: [] for m in METHODS}, {m: [] for m in METHODS}, 0, {}
    try:
        for method in METHODS:  # untimed: the first saves pay for memory and files touched for the first time
            timed_save(engine, method, base / "warmup")
            shutil.rmtree(base / "warmup")
        hashed_while_written = sorted(getattr(engine.checkpoint_engine, "hashed", {}))
        os.sync()
        for round_ in range(args.rounds):
            # Every other round in reverse order: a drift in the machine's load does not favour one method.
            for method in METHODS if round_ % 2 == 0 else reversed(METHODS):
                out = base / method.replace(" ", "_")
                seconds, cpu_seconds = timed_save(engine, method, out)
                wall[method].append(seconds)
                cpu[method].append(cpu_seconds)
                if method == "deepspeed":
                    size = _bytes(out)
                if method == "sha256" and round_ == args.rounds - 1:
                    resume = verify_seconds(out / "checkpoints" / "step_00000001")
                shutil.rmtree(out)
                os.sync()  # untimed: the next save does not pay for this one's writeback
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def ratios(times: dict) -> dict:  # each round's save over DeepSpeed's of the same round, the median of them
        return {m: statistics.median(t / d for t, d in zip(times[m], times["deepspeed"])) for m in METHODS}

    return {
        "params": params,
        "checkpoint_bytes": size,
        "hashed_while_written": hashed_while_written,
        "rounds": args.rounds,
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_ratio": ratios(wall),
        "cpu_ratio": ratios(cpu),
        "resume_verify_s": resume,
        "load_average": os.getloadavg(),
    }


def table(result: dict) -> str:
    lines = [
        f"{result['params'] / 1e6:.0f}M parameters, {result['checkpoint_bytes'] / 1e9:.2f} GB per checkpoint, "
        f"{result['rounds']} rounds (ratios: the median over rounds of each save / DeepSpeed's save of that round)",
        "",
        "| save | wall / DeepSpeed alone | CPU / DeepSpeed alone | wall s, median | wall s, every round |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        rounds = ", ".join(f"{s:.2f}" for s in result["wall_s"][m])
        lines.append(
            f"| {m} | {result['wall_ratio'][m]:.3f} | {result['cpu_ratio'][m]:.3f} | "
            f"{statistics.median(result['wall_s'][m]):.2f} | {rounds} |"
        )
    verify = result["resume_verify_s"]
    lines += [
        "",
        f"Hashed as DeepSpeed wrote them (sha256): {', '.join(result['hashed_while_written']) or 'none'}.",
        f"A resume's verification of that checkpoint (one process): size {verify['size']:.3f} s, "
        f"sha256 {verify['sha256']:.2f} s. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'])}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=85e6, help="model parameters (12 bytes each on disk)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (local disk; removed after)")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = run(args)
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
