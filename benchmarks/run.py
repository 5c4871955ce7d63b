"""rlad_ds's benchmarks side by side: one command, one table, one JSON list of records.

    python -m benchmarks.run [--quick] [--json FILE] [--markdown FILE] [--only P1,P3]

P1  rollout tokens/s on 2 ranks (1 thread each): vLLM vs gathered ZeRO-3 rollout vs DeepSpeed's per-layer fallback
P2  per-token log-prob peak memory and time, forward + backward, T=8192, V=151936: chunked vs full logits
P3  cost of distillation: (RLAD step - GRPO step) / teacher scoring pass alone, same batch and models
P4  training-step peak memory, 8K vs 2K response tokens, through a ZeRO-3 student engine
P5  the demo recipe end to end on 2 ranks, --rollout vllm vs gathered: step time, weight-sync share, accuracy
P8  per-rank peak memory of one RLAD update at 4K-32K response tokens on 2 ranks, sequence parallelism N = 2 vs 1

Each benchmark runs in its own worker process (benchmarks/*.py; P1 under the real deepspeed launcher), so
memory is measured in fresh processes and no process group leaks between them. Every record is
{"name", "value", "unit", "goal", "meets"} with `meets` computed from the value (benchmarks.common).
The table and the method of each measurement also go to a markdown file (default docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import (
    MEMORY_ENV,
    ROOT,
    available_memory_bytes,
    count_params,
    deepspeed_cmd,
    machine_info,
    markdown_table,
    run_worker,
    save_model_dir,
    write_json,
)
from benchmarks.engine_e2e import p5_records
from benchmarks.engine_e2e import run_p5 as run_p5_worker
from benchmarks.report import failed_record, p1_records, p2_records, p3_records, p4_records, p8_records, render_markdown


@dataclass
class Settings:
    """Sizes and repeats; `--quick` must finish P1-P5 in under 10 minutes on 2 CPU cores (P8's four lengths up to 32K
    tokens on 2 ranks took 3 more on an idle machine, 17 at a load average of 14)."""

    p1_model: dict = field(default_factory=lambda: dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=1024))
    p1_prompts: int = 4  # per rank
    p1_samples: int = 2
    p1_max_new_tokens: int = 64
    p1_repeats: int = 2
    p1_rl_prompts: int = 8  # per rank: vLLM vs gathered at an RL batch, 16 prompts x G=8 over the 2 ranks
    p1_rl_samples: int = 8
    p2_tokens: int = 8192
    p2_vocab: int = 151936
    p2_hidden: int = 256
    p2_chunks: tuple = (0, 1024)  # 0: the trainer's default (--logprob_chunk_size 0, about 2^26 logits a chunk)
    p2_repeats: int = 0  # further timed passes after the measured one (0: time the measured pass)
    p3_steps: int = 5
    p4_model: dict = field(
        default_factory=lambda: dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, max_positions=8448)
    )
    p4_vocab: int = 32768
    p4_lengths: tuple = (2048, 8192)
    p4_checkpointing: tuple = (False,)
    p5_steps: int = 10
    p5_seeds: int = 1
    p8_student: dict = field(default_factory=lambda: dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256))
    p8_teacher: dict = field(default_factory=lambda: dict(hidden=128, layers=2, heads=8, kv_heads=4, intermediate=512))
    p8_lengths: tuple = (4096, 8192, 16384, 32768)
    p8_variants: tuple = ("tiled@16384", "checkpointing@16384", "offload@16384")  # N = 2 only


def settings(quick: bool) -> Settings:
    if quick:
        return Settings()
    return Settings(
        p1_model=dict(hidden=512, layers=12, heads=8, kv_heads=4, intermediate=2048),
        p1_max_new_tokens=128,
        p1_repeats=3,
        p2_hidden=1024,
        p2_repeats=2,
        p3_steps=10,
        p4_checkpointing=(False, True),
        p5_steps=60,
        p5_seeds=3,
        p8_student=dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512),
        p8_teacher=dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=1024),
    )


# ---- the runs -----------------------------------------------------------------------------------------------


def run_p1(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    from rlad_ds.tiny import char_tokenizer

    model = save_model_dir(work / "p1_model", char_tokenizer(), never_eos=True, seed=0, **s.p1_model)
    runs = {}
    for name, engines, prompts, samples in (
        ("small", "gathered,per_layer", s.p1_prompts, s.p1_samples),
        ("rl", "gathered,vllm", s.p1_rl_prompts, s.p1_rl_samples),
    ):
        out = work / f"p1_{name}.json"
        cmd = deepspeed_cmd(
            "benchmarks.rollout_bench",
            [
                "--model",
                model,
                "--out",
                out,
                "--prompts",
                prompts,
                "--samples",
                samples,
                "--engines",
                engines,
                "--max_new_tokens",
                s.p1_max_new_tokens,
                "--repeats",
                s.p1_repeats,
            ],
            2,
            work,
        )
        runs[name] = run_worker(cmd, out, timeout=1800, env={"OMP_NUM_THREADS": "1"})
    records, details = p1_records(runs["small"], count_params(model), runs["rl"])
    return records, details, runs


def run_p5(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    m = run_p5_worker(s.p5_steps, s.p5_seeds, work)
    records, details = p5_records(m)
    return records, details, m


def p2_tokens(s: Settings) -> int:
    """T = s.p2_tokens, halved while the full-logits variant would not fit in 90% of the memory available now
    (measured here: its peak growth is 2.9 fp32 [T, V] blocks); the record's name carries the T used."""
    tokens = s.p2_tokens
    while (
        tokens > 1024
        and 3.0 * tokens * s.p2_vocab * 4 + 2 * s.p2_vocab * s.p2_hidden * 4 > 0.9 * available_memory_bytes()
    ):
        tokens //= 2
    return tokens


def run_p2(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    tokens = p2_tokens(s)

    def variant(name: str, chunk: int) -> dict:
        out = work / f"p2_{name}_{chunk}.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.logprob_memory",
            "--variant",
            name,
            "--tokens",
            str(tokens),
            "--hidden",
            str(s.p2_hidden),
            "--vocab",
            str(s.p2_vocab),
            "--chunk_size",
            str(chunk),
            "--repeats",
            str(s.p2_repeats),
            "--out",
            str(out),
        ]
        return run_worker(cmd, out, timeout=1800, env=MEMORY_ENV)

    full = variant("full", 0)  # the full variant has no chunks
    records, details, raw = [], {}, {"full": full}
    for chunk in s.p2_chunks:
        chunked = variant("chunked", chunk)
        raw[f"chunked_{chunk}"] = chunked
        r, d = p2_records(chunked, full)
        records += r
        details.update(d)
    return records, details, raw


def run_p3(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    from rlad_ds.demo.recipe import DEFAULT_RECIPE, demo_tokenizer

    tokenizer = demo_tokenizer()
    student = save_model_dir(
        work / "p3_student", tokenizer, seed=0, max_positions=256, **asdict(DEFAULT_RECIPE.student)
    )
    teacher = save_model_dir(
        work / "p3_teacher", tokenizer, seed=1, max_positions=256, **asdict(DEFAULT_RECIPE.teacher)
    )
    out = work / "p3.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.distill_cost",
        "--student",
        str(student),
        "--teacher",
        str(teacher),
        "--steps",
        str(s.p3_steps),
        "--out",
        str(out),
    ]
    m = run_worker(cmd, out, timeout=900)
    records, details = p3_records(m)
    return records, details, m


def run_p4(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    model = save_model_dir(work / "p4_model", vocab_size=s.p4_vocab, seed=0, **s.p4_model)
    records, details, raw = [], {}, {}
    for checkpointing in s.p4_checkpointing:
        runs = []
        for tokens in s.p4_lengths:
            out = work / f"p4_{tokens}_{int(checkpointing)}.json"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.step_memory",
                "--model",
                str(model),
                "--tokens",
                str(tokens),
                "--out",
                str(out),
            ] + (["--gradient_checkpointing"] if checkpointing else [])
            runs.append(run_worker(cmd, out, timeout=900, env=MEMORY_ENV))
        raw[f"checkpointing={checkpointing}"] = runs
        r, d = p4_records(*runs)
        records += r
        details.update(d)
    return records, details, raw


def run_p8(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    from rlad_ds.tiny import char_tokenizer

    tokenizer, positions = char_tokenizer(), max(s.p8_lengths) + 1024
    student = save_model_dir(work / "p8_student", tokenizer, seed=0, max_positions=positions, **s.p8_student)
    teacher = save_model_dir(work / "p8_teacher", tokenizer, seed=1, max_positions=positions, **s.p8_teacher)
    runs = {}
    for size in (1, 2):
        out = work / f"p8_sp{size}.json"
        args = ["--student", student, "--teacher", teacher, "--sequence_parallel_size", size, "--out", out]
        args += ["--lengths", ",".join(map(str, s.p8_lengths)), "--workdir", work / f"p8_run{size}"]
        args += ["--variants", ",".join(s.p8_variants)] if size == 2 else []
        cmd = deepspeed_cmd("benchmarks.sequence_memory", args, 2, work)
        runs[size] = run_worker(cmd, out, timeout=3600, env={**MEMORY_ENV, "OMP_NUM_THREADS": "1"})
    records, details = p8_records(runs[1], runs[2])
    return records, details, runs


BENCHMARKS = {
    "P1": (run_p1, [("P1 rollout tokens/s, gathered / per-layer ZeRO-3", "x", ">= 5")]),
    "P2": (
        run_p2,
        [
            ("P2 log-prob peak memory, chunked / full logits", "x", "<= 0.10"),
            ("P2 log-prob fwd+bwd time, chunked / full logits", "x", "<= 1.0"),
        ],
    ),
    "P3": (run_p3, [("P3 distillation cost, (RLAD - GRPO step) / teacher pass", "x", "<= 1.10")]),
    "P4": (run_p4, [("P4 training-step peak memory, 8K / 2K response tokens", "x", "<= 4.5")]),
    "P5": (run_p5, [("P5 step time, vLLM / gathered", "x", "<= 1.0")]),
    "P8": (
        run_p8,
        [
            ("P8 per-rank peak memory of an RLAD update at the longest length, N = 2 / N = 1", "x", "<= 0.6"),
            ("P8 longest response within a per-rank budget, N = 2 / N = 1", "x", ">= 1.8"),
        ],
    ),
}


def run_benchmarks(chosen: list[str], s: Settings, workdir: str | None) -> tuple[list[dict], dict, list[str]]:
    """Each chosen benchmark in turn: (records, details, errors); one that fails leaves the others' numbers."""
    records, details, errors = [], {}, []
    with tempfile.TemporaryDirectory(prefix="rlad_bench_") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in chosen:
            run, fallbacks = BENCHMARKS[name]
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", flush=True)
            try:
                r, d, _ = run(s, work)
            except Exception as error:
                r, d = [failed_record(*f) for f in fallbacks], {}
                errors.append(f"{name}: {str(error).splitlines()[0]}")
                print(f"[bench] {name} failed: {error}", file=sys.stderr, flush=True)
            records += r
            details.update(d)
            print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return records, details, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller models and fewer repeats (P1-P5 < 10 min on 2 cores, P8 3-17 more)",
    )
    parser.add_argument("--json", help="write the records here")
    parser.add_argument(
        "--markdown", default=str(ROOT / "docs" / "benchmarks.md"), help="write the table and methods here ('' to skip)"
    )
    parser.add_argument("--only", default="P1,P2,P3,P4,P5,P8", help="comma-separated subset, e.g. P2,P4")
    parser.add_argument("--workdir", help="keep model dirs and raw worker results here (default: a temp dir)")
    args = parser.parse_args(argv)

    command = "python -m benchmarks.run" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
    s = settings(args.quick)
    chosen = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    machine_start = machine_info()
    start = time.perf_counter()
    records, details, errors = run_benchmarks(chosen, s, args.workdir)
    seconds = time.perf_counter() - start
    table = markdown_table(records, details)
    print(table)
    if args.json:
        write_json(records, args.json)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(
            render_markdown(records, details, command, machine_start, machine_info(), seconds, s, errors)
        )
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
