"""rlad_ds's benchmarks P1-P4 side by side: one command, one table, one JSON list of records.

    python -m benchmarks.run [--quick] [--json FILE] [--markdown FILE] [--only P1,P3]

P1  rollout tokens/s on 2 ranks (1 thread each): vLLM vs gathered ZeRO-3 rollout vs DeepSpeed's per-layer fallback
P2  per-token log-prob peak memory and time, forward + backward, T=8192, V=151936: chunked vs full logits
P3  cost of distillation: (RLAD step - GRPO step) / teacher scoring pass alone, same batch and models
P4  training-step peak memory, 8K vs 2K response tokens, through a ZeRO-3 student engine
P5  the demo recipe end to end on 2 ranks, --rollout vllm vs gathered: step time, weight-sync share, accuracy

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

from benchmarks.engine_e2e import p5_records, run_p5 as run_p5_worker
from benchmarks.common import (MEMORY_ENV, ROOT, available_memory_bytes, count_params, deepspeed_cmd,
                               machine_info, make_record, markdown_table, run_worker, save_model_dir, write_json)

GIB = 2**30


@dataclass
class Settings:
    """Sizes and repeats; `--quick` must finish in under 10 minutes on 2 CPU cores."""

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
    p4_model: dict = field(default_factory=lambda: dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024,
                                                        max_positions=8448))
    p4_vocab: int = 32768
    p4_lengths: tuple = (2048, 8192)
    p4_checkpointing: tuple = (False, )
    p5_steps: int = 10
    p5_seeds: int = 1


def settings(quick: bool) -> Settings:
    if quick:
        return Settings()
    return Settings(p1_model=dict(hidden=512, layers=12, heads=8, kv_heads=4, intermediate=2048),
                    p1_max_new_tokens=128, p1_repeats=3, p2_hidden=1024, p2_repeats=2, p3_steps=10,
                    p4_checkpointing=(False, True), p5_steps=60, p5_seeds=3)


# ---- records from measurements (pure: unit-tested with fake measurements) -----------------------------------

def p1_records(m: dict, model_params: int, rl: dict | None = None) -> tuple[list[dict], dict]:
    """Records of the small-batch run `m` (gathered vs per-layer) and of the RL-batch run `rl` (vLLM vs gathered)."""
    size = f"{model_params / 1e6:.1f}M Qwen3, {m['world_size']} ranks x {m['threads']} thread"
    speedup = make_record(f"P1 rollout tokens/s, gathered / per-layer ZeRO-3 ({size})",
                          m["gathered"]["tokens_per_s"] / m["per_layer"]["tokens_per_s"], "x", ">= 5")
    identical = m["identical_to_gathered"]["per_layer"]
    same = make_record("P1 rollout tokens identical, gathered vs per-layer (greedy)", float(identical), "bool", "== 1")
    details = {speedup["name"]: f"gathered {m['gathered']['tokens_per_s']:.0f} tok/s, per-layer "
                                f"{m['per_layer']['tokens_per_s']:.0f} tok/s ({m['gathered']['tokens']:.0f} tokens; "
                                f"partitioned={m['partitioned']})",
               same["name"]: "identical" if identical else "DIFFERENT"}
    records = [speedup, same]
    if rl is not None and "vllm" in rl:
        batch = f"{rl['world_size']} x {rl['rows_per_rank']} rows x {rl['max_new_tokens']} tokens"
        vllm = make_record(f"P1 rollout tokens/s, vLLM / gathered ({size}, {batch})",
                           rl["vllm"]["tokens_per_s"] / rl["gathered"]["tokens_per_s"], "x", ">= 4")
        v, agree = rl["vllm"], "identical to" if rl["identical_to_gathered"]["vllm"] else "differ from"
        details[vllm["name"]] = (f"vLLM {v['tokens_per_s']:.0f} tok/s, gathered {rl['gathered']['tokens_per_s']:.0f} "
                                 f"tok/s; weight sync {v['sync_seconds']:.2f} s, engine start "
                                 f"{v['startup_seconds']:.0f} s; greedy tokens {agree} gathered's")
        records.append(vllm)
    elif rl is not None:
        details[speedup["name"]] += f"; vLLM not run: {rl.get('vllm_skipped')}"
    return records, details


def p2_records(chunked: dict, full: dict) -> tuple[list[dict], dict]:
    chunk = chunked["chunk_size"] or f"auto {max(1, 2 ** 26 // full['vocab'])}"
    shape = f"T={full['tokens']}, V={full['vocab']}, H={full['hidden']}, chunk {chunk}"
    memory = make_record(f"P2 log-prob peak memory, chunked / full logits ({shape})",
                         chunked["peak_growth_bytes"] / full["peak_growth_bytes"], "x", "<= 0.10")
    speed = make_record(f"P2 log-prob fwd+bwd time, chunked / full logits ({shape})",
                        chunked["median_seconds"] / full["median_seconds"], "x", "<= 1.0")
    details = {memory["name"]: f"{chunked['peak_growth_bytes'] / GIB:.2f} GiB vs {full['peak_growth_bytes'] / GIB:.2f} GiB",
               speed["name"]: f"{chunked['median_seconds']:.1f} s vs {full['median_seconds']:.1f} s "
                              f"({chunked['threads']} threads)"}
    return [memory, speed], details


def p3_records(m: dict) -> tuple[list[dict], dict]:
    ratio = m["teacher_params"] / m["student_params"]
    cost = make_record(f"P3 distillation cost, (RLAD - GRPO step) / teacher pass (teacher {ratio:.0f}x student)",
                       m["cost"], "x", "<= 1.10")
    details = {cost["name"]: f"RLAD {m['rlad_median_s']:.2f} s, GRPO {m['grpo_median_s']:.2f} s, teacher pass "
                             f"{m['teacher_median_s']:.2f} s per step (medians); RLAD/GRPO step ratio "
                             f"{m['step_ratio']:.2f}x (info); same rollouts={m['same_rollouts']}"}
    return [cost], details


def p4_records(short: dict, long: dict) -> tuple[list[dict], dict]:
    gc = ", gradient checkpointing" if long["gradient_checkpointing"] else ""
    record = make_record(f"P4 training-step peak memory, {long['tokens'] // 1024}K / {short['tokens'] // 1024}K "
                         f"response tokens (ZeRO-3 student{gc})",
                         long["peak_growth_bytes"] / short["peak_growth_bytes"], "x", "<= 4.5")
    details = {record["name"]: f"{long['peak_growth_bytes'] / GIB:.2f} GiB vs {short['peak_growth_bytes'] / GIB:.2f} "
                               f"GiB; {long['seconds']:.0f} s vs {short['seconds']:.0f} s"}
    return [record], details


def failed_record(name: str, unit: str, goal: str) -> dict:
    return make_record(name, float("nan"), unit, goal)


# ---- the runs -----------------------------------------------------------------------------------------------

def run_p1(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    from rlad_ds.tiny import char_tokenizer

    model = save_model_dir(work / "p1_model", char_tokenizer(), never_eos=True, seed=0, **s.p1_model)
    runs = {}
    for name, engines, prompts, samples in (("small", "gathered,per_layer", s.p1_prompts, s.p1_samples),
                                            ("rl", "gathered,vllm", s.p1_rl_prompts, s.p1_rl_samples)):
        out = work / f"p1_{name}.json"
        cmd = deepspeed_cmd("benchmarks.rollout_bench",
                            ["--model", model, "--out", out, "--prompts", prompts, "--samples", samples, "--engines",
                             engines, "--max_new_tokens", s.p1_max_new_tokens, "--repeats", s.p1_repeats], 2, work)
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
    while tokens > 1024 and 3.0 * tokens * s.p2_vocab * 4 + 2 * s.p2_vocab * s.p2_hidden * 4 > \
            0.9 * available_memory_bytes():
        tokens //= 2
    return tokens


def run_p2(s: Settings, work: Path) -> tuple[list[dict], dict, dict]:
    tokens = p2_tokens(s)

    def variant(name: str, chunk: int) -> dict:
        out = work / f"p2_{name}_{chunk}.json"
        cmd = [sys.executable, "-m", "benchmarks.logprob_memory", "--variant", name, "--tokens", str(tokens),
               "--hidden", str(s.p2_hidden), "--vocab", str(s.p2_vocab), "--chunk_size", str(chunk),
               "--repeats", str(s.p2_repeats), "--out", str(out)]
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
    student = save_model_dir(work / "p3_student", tokenizer, seed=0, max_positions=256,
                             **asdict(DEFAULT_RECIPE.student))
    teacher = save_model_dir(work / "p3_teacher", tokenizer, seed=1, max_positions=256,
                             **asdict(DEFAULT_RECIPE.teacher))
    out = work / "p3.json"
    cmd = [sys.executable, "-m", "benchmarks.distill_cost", "--student", str(student), "--teacher", str(teacher),
           "--steps", str(s.p3_steps), "--out", str(out)]
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
            cmd = [sys.executable, "-m", "benchmarks.step_memory", "--model", str(model), "--tokens", str(tokens),
                   "--out", str(out)] + (["--gradient_checkpointing"] if checkpointing else [])
            runs.append(run_worker(cmd, out, timeout=900, env=MEMORY_ENV))
        raw[f"checkpointing={checkpointing}"] = runs
        r, d = p4_records(*runs)
        records += r
        details.update(d)
    return records, details, raw


BENCHMARKS = {"P1": (run_p1, [("P1 rollout tokens/s, gathered / per-layer ZeRO-3", "x", ">= 5")]),
              "P2": (run_p2, [("P2 log-prob peak memory, chunked / full logits", "x", "<= 0.10"),
                              ("P2 log-prob fwd+bwd time, chunked / full logits", "x", "<= 1.0")]),
              "P3": (run_p3, [("P3 distillation cost, (RLAD - GRPO step) / teacher pass", "x", "<= 1.10")]),
              "P4": (run_p4, [("P4 training-step peak memory, 8K / 2K response tokens", "x", "<= 4.5")]),
              "P5": (run_p5, [("P5 step time, vLLM / gathered", "x", "<= 1.0")])}


# ---- the report ---------------------------------------------------------------------------------------------

METHODS = """\
- **P1** (`benchmarks/rollout_bench.py`, deepspeed launcher, 2 ranks, `OMP_NUM_THREADS=1` and
  `torch.set_num_threads(1)`): one ZeRO-3 student engine (`ds_configs/zero3.json`,
  `stage3_param_persistence_threshold: 0`, so every parameter is partitioned), random weights whose EOS
  lm-head row is zero (greedy never stops early, every response is max_new_tokens long). Both engines are
  `rlad_ds.rollout.hf`: `gathered` and `per_layer` (`engine.module.generate` with ZeRO-3's hooks
  on and `synced_gpus=True`, DeepSpeed's fallback). Greedy decoding of the same per-rank prompts; one short
  warm-up call each, then the best of the timed repeats, each timed between barriers; tokens/s = generated
  tokens of both ranks / wall time. The token check compares the full output ids of both engines on every rank.
  With vLLM installed, the third engine is `rlad_ds.rollout.vllm.VLLMRollout` on the same ZeRO-3 engine (one
  colocated in-process vLLM per rank, fp32, `--vllm_kv_cache_gb 1`, weights synced from the partitions first),
  timed the same way; its weight sync (every parameter gathered layer by layer and reloaded) is timed apart,
  best of the repeats, and its engine start once.
- **P2** (`benchmarks/logprob_memory.py`, one fresh process per variant): a bare lm-head, hidden states
  [1, T, H] and weight [V, H] both requiring grad; chunked = `rlad_ds.logprobs.chunked_token_logprobs`, full =
  `torch.log_softmax(h @ W.T, -1).gather(...)`; loss = sum of log-probs, backward fills both gradients.
  Peak memory = `ru_maxrss` after the first full-size forward + backward minus the resident set
  (`/proc/self/statm`) just after the inputs were allocated (a 16-token warm-up runs before, so lazy
  initialisation is not counted), with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`) so that
  freed blocks leave the resident set. It counts everything a variant holds at its high-water mark beyond
  its inputs, including the gradients of h and W. Time = that forward + backward (torch's default threads).
  T is 8192 unless the full variant would not fit in 90% of the available memory (then halved; the name says
  which T ran).
- **P3** (`benchmarks/distill_cost.py`, one process): the demo's model sizes (student and a ~30x teacher,
  random weights, the demo tokenizer, the arith task), one set of models (`rlad_ds.run_models.build_run_models`)
  and two trainers over it, the `rlad` and `grpo` method objects (grpo: no teacher pass, grpo_loss), each
  running the real loop (`Trainer.fit`) with a timing callback and lr ~0 (weights never change), so both
  sample the same rollouts from the same seed. Runs go rlad, grpo, grpo, rlad; the first step of each is a
  warm-up. After each RLAD step the callback times the teacher's `score` on that step's batch alone. Cost =
  median(RLAD step - GRPO step over paired steps) / median(teacher pass alone).
- **P4** (`benchmarks/step_memory.py`, one fresh process per length): a ZeRO-3 student engine (one
  process, sdpa) runs the trainer's micro-batch: `token_logprobs` (chunked head, with entropy) + `trrd_loss`
  + `engine.backward` on one row of a 64-token prompt + L response tokens. Memory as in P2, after a 64-token
  warm-up forward + backward (ZeRO-3's gradient buffers then exist and sit in the baseline with parameters
  and optimizer state). The chunked head's fixed [chunk, V] workspace is part of both peaks.
- **P5** (`benchmarks/engine_e2e.py`, deepspeed launcher, 2 ranks, `OMP_NUM_THREADS=1`): `launchers/train.py`
  with the demo's recipe as flags and `--rollout gathered` / `--rollout vllm`, seed by seed, on the same SFT
  models; the student is the demo's regrouped to head_dim 32 (vLLM's CPU attention needs >= 32; same size).
  Step time = median `time/step` of each run after its first step, then the median over seeds; sync share =
  median `time/weight_sync / time/step` of the vLLM runs; accuracy = held-out greedy `eval_accuracy` (200
  problems) after the last step.
"""


def render_markdown(records: list[dict], details: dict, command: str, machine_start: dict, machine_end: dict,
                    seconds: float, settings_used: Settings, errors: list[str]) -> str:
    load = ", ".join(f"{x:.2f}" for x in machine_start["load_average"])
    load_end = ", ".join(f"{x:.2f}" for x in machine_end["load_average"])
    lines = ["# Benchmarks", "", "Written by `python -m benchmarks.run`; every number below comes from this one run.", "",
             "```", command, "```", "",
             f"Machine: {machine_start['nproc']} CPUs ({machine_start['cpu']}), {machine_start['memory_gib']} GiB "
             f"memory, no GPU; Python {machine_start['python']}, torch {machine_start['torch']}, deepspeed "
             f"{machine_start['deepspeed']}, transformers {machine_start['transformers']}. "
             f"Load average (1, 5, 15 min) {load} at the start and {load_end} at the end: other jobs shared the "
             f"machine, so times are noisy. Wall time {seconds / 60:.1f} min.", "",
             markdown_table(records, details), ""]
    if errors:
        lines += ["Failures:", "", *[f"- {e}" for e in errors], ""]
    lines += ["## How each number is measured", "", METHODS,
              "Settings of this run: `" + repr(settings_used) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (< 10 min on 2 cores)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"),
                        help="write the table and methods here ('' to skip)")
    parser.add_argument("--only", default="P1,P2,P3,P4,P5", help="comma-separated subset, e.g. P2,P4")
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
    records, details, errors = [], {}, []
    with tempfile.TemporaryDirectory(prefix="rlad_bench_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in chosen:
            run, fallbacks = BENCHMARKS[name]
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", flush=True)
            try:
                r, d, _ = run(s, work)
            except Exception as error:  # one failing benchmark still leaves the others' numbers
                r, d = [failed_record(*f) for f in fallbacks], {}
                errors.append(f"{name}: {str(error).splitlines()[0]}")
                print(f"[bench] {name} failed: {error}", file=sys.stderr, flush=True)
            records += r
            details.update(d)
            print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    table = markdown_table(records, details)
    print(table)
    if args.json:
        write_json(records, args.json)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(records, details, command, machine_start, machine_info(),
                                                       seconds, s, errors))
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
