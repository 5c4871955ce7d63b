"""The benchmarks' records from their workers' measurements (pure: unit-tested with fake measurements), and the
markdown report `python -m benchmarks.run` writes: the table, the machine, and how each number is measured."""

from __future__ import annotations

from benchmarks.common import make_record, markdown_table

GIB = 2**30


def p1_records(m: dict, model_params: int, rl: dict | None = None) -> tuple[list[dict], dict]:
    """Records of the small-batch run `m` (gathered vs per-layer) and of the RL-batch run `rl` (vLLM vs gathered)."""
    size = f"{model_params / 1e6:.1f}M Qwen3, {m['world_size']} ranks x {m['threads']} thread"
    speedup = make_record(
        f"P1 rollout tokens/s, gathered / per-layer ZeRO-3 ({size})",
        m["gathered"]["tokens_per_s"] / m["per_layer"]["tokens_per_s"],
        "x",
        ">= 5",
    )
    identical = m["identical_to_gathered"]["per_layer"]
    same = make_record("P1 rollout tokens identical, gathered vs per-layer (greedy)", float(identical), "bool", "== 1")
    details = {
        speedup["name"]: f"gathered {m['gathered']['tokens_per_s']:.0f} tok/s, per-layer "
        f"{m['per_layer']['tokens_per_s']:.0f} tok/s ({m['gathered']['tokens']:.0f} tokens; "
        f"partitioned={m['partitioned']})",
        same["name"]: "identical" if identical else "DIFFERENT",
    }
    records = [speedup, same]
    if rl is not None and "vllm" in rl:
        batch = f"{rl['world_size']} x {rl['rows_per_rank']} rows x {rl['max_new_tokens']} tokens"
        vllm = make_record(
            f"P1 rollout tokens/s, vLLM / gathered ({size}, {batch})",
            rl["vllm"]["tokens_per_s"] / rl["gathered"]["tokens_per_s"],
            "x",
            ">= 4",
        )
        v, agree = rl["vllm"], "identical to" if rl["identical_to_gathered"]["vllm"] else "differ from"
        details[vllm["name"]] = (
            f"vLLM {v['tokens_per_s']:.0f} tok/s, gathered {rl['gathered']['tokens_per_s']:.0f} "
            f"tok/s; weight sync {v['sync_seconds']:.2f} s, engine start "
            f"{v['startup_seconds']:.0f} s; greedy tokens {agree} gathered's"
        )
        records.append(vllm)
    elif rl is not None:
        details[speedup["name"]] += f"; vLLM not run: {rl.get('vllm_skipped')}"
    return records, details


def p2_records(chunked: dict, full: dict) -> tuple[list[dict], dict]:
    chunk = chunked["chunk_size"] or f"auto {max(1, 2**26 // full['vocab'])}"
    shape = f"T={full['tokens']}, V={full['vocab']}, H={full['hidden']}, chunk {chunk}"
    memory = make_record(
        f"P2 log-prob peak memory, chunked / full logits ({shape})",
        chunked["peak_growth_bytes"] / full["peak_growth_bytes"],
        "x",
        "<= 0.10",
    )
    speed = make_record(
        f"P2 log-prob fwd+bwd time, chunked / full logits ({shape})",
        chunked["median_seconds"] / full["median_seconds"],
        "x",
        "<= 1.0",
    )
    details = {
        memory["name"]: f"{chunked['peak_growth_bytes'] / GIB:.2f} GiB vs {full['peak_growth_bytes'] / GIB:.2f} GiB",
        speed["name"]: f"{chunked['median_seconds']:.1f} s vs {full['median_seconds']:.1f} s "
        f"({chunked['threads']} threads)",
    }
    return [memory, speed], details


def p3_records(m: dict) -> tuple[list[dict], dict]:
    ratio = m["teacher_params"] / m["student_params"]
    cost = make_record(
        f"P3 distillation cost, (RLAD - GRPO step) / teacher pass (teacher {ratio:.0f}x student)",
        m["cost"],
        "x",
        "<= 1.10",
    )
    details = {
        cost["name"]: f"RLAD {m['rlad_median_s']:.2f} s, GRPO {m['grpo_median_s']:.2f} s, teacher pass "
        f"{m['teacher_median_s']:.2f} s per step (medians); RLAD/GRPO step ratio "
        f"{m['step_ratio']:.2f}x (info); same rollouts={m['same_rollouts']}"
    }
    return [cost], details


def p4_records(short: dict, long: dict) -> tuple[list[dict], dict]:
    gc = ", gradient checkpointing" if long["gradient_checkpointing"] else ""
    record = make_record(
        f"P4 training-step peak memory, {long['tokens'] // 1024}K / {short['tokens'] // 1024}K "
        f"response tokens (ZeRO-3 student{gc})",
        long["peak_growth_bytes"] / short["peak_growth_bytes"],
        "x",
        "<= 4.5",
    )
    details = {
        record["name"]: f"{long['peak_growth_bytes'] / GIB:.2f} GiB vs {short['peak_growth_bytes'] / GIB:.2f} "
        f"GiB; {long['seconds']:.0f} s vs {short['seconds']:.0f} s"
    }
    return [record], details


def _plain_peaks(run: dict) -> dict[int, float]:
    """Response length -> per-rank peak growth (the largest over ranks) of the run's plain updates."""
    peaks: dict[int, float] = {}
    for rank in run["ranks"]:
        for r in rank:
            if r["variant"] == "plain":
                peaks[r["length"]] = max(peaks.get(r["length"], 0.0), r["peak_growth_bytes"])
    return peaks


def fitted_length(peaks: dict[int, float], budget: float) -> float:
    """The response length whose peak is `budget` on the least-squares line through (length, peak)."""
    n, xs, ys = len(peaks), list(peaks), list(peaks.values())
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return (budget - (mean_y - slope * mean_x)) / slope


def p8_records(one: dict, two: dict) -> tuple[list[dict], dict]:
    """N = 1 and N = 2 runs (benchmarks/sequence_memory.py) on the same 2 ranks: the peak ratio at the longest length,
    and the longest length whose per-rank peak fits a fixed budget (N = 1's peak at the second-longest length)."""
    whole, shared = _plain_peaks(one), _plain_peaks(two)
    lengths = sorted(whole)
    longest, budget = lengths[-1], whole[lengths[-2]]
    ratio = make_record(
        f"P8 per-rank peak memory of an RLAD update at {longest // 1024}K response tokens, N = 2 / N = 1 (2 ranks)",
        shared[longest] / whole[longest],
        "x",
        "<= 0.6",
    )
    fit = {n: fitted_length(peaks, budget) for n, peaks in ((1, whole), (2, shared))}
    reach = make_record(
        f"P8 longest response within a per-rank budget of {budget / GIB:.2f} GiB, N = 2 / N = 1",
        fit[2] / fit[1],
        "x",
        ">= 1.8",
    )
    table = "; ".join(f"{n // 1024}K {whole[n] / GIB:.2f} vs {shared[n] / GIB:.2f} GiB" for n in lengths)
    details = {
        ratio["name"]: f"per-rank peak growth N = 1 vs N = 2: {table}",
        reach["name"]: f"least-squares lines through the 4 peaks reach the budget at {fit[1]:.0f} (N = 1) and "
        f"{fit[2]:.0f} (N = 2) tokens",
    }
    for run, n in ((one, 1), (two, 2)):
        for r in run["ranks"][0]:
            if r["variant"] != "plain":
                base = (whole if n == 1 else shared)[r["length"]]
                peak = max(rank[run["ranks"][0].index(r)]["peak_growth_bytes"] for rank in run["ranks"])
                details[ratio["name"]] += (
                    f"; {r['variant']} at {r['length'] // 1024}K, N = {n}: {peak / base:.2f}x plain"
                )
    return [ratio, reach], details


def failed_record(name: str, unit: str, goal: str) -> dict:
    return make_record(name, float("nan"), unit, goal)


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
- **P8** (`benchmarks/sequence_memory.py`, deepspeed launcher, 2 ranks, `OMP_NUM_THREADS=1`, one launch with
  `--sequence_parallel_size 1` and one with 2): the models of `rlad_ds.run_models.build_run_models` (ZeRO-3
  student, frozen teacher, fp32, sdpa, `--logprob_chunk_size 1024`; random Qwen3s). Each data-parallel rank
  (N = 1) or sequence-parallel group (N = 2) holds one fixed response of L tokens after a 64-token prompt; one
  update = the teacher's and the old policy's scoring passes and `Trainer.update` (forward, TRRD loss, backward,
  optimizer step). Per-rank peak = the highest resident set (`/proc/self/statm`, sampled every 2 ms by a thread)
  during the update minus the resident set just before it, after a 256-token warm-up update; the larger of the
  two ranks. Lengths run in ascending order in one process; the variants (tiled MLPs, 8 tiles; gradient
  checkpointing; checkpointing with `--offload_activations`) run after them at one length, N = 2. Budget =
  N = 1's peak at the second-longest length; each N's longest length within it is read off the least-squares
  line through its four peaks.
"""


def render_markdown(
    records: list[dict],
    details: dict,
    command: str,
    machine_start: dict,
    machine_end: dict,
    seconds: float,
    settings_used,
    errors: list[str],
) -> str:
    load = ", ".join(f"{x:.2f}" for x in machine_start["load_average"])
    load_end = ", ".join(f"{x:.2f}" for x in machine_end["load_average"])
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m benchmarks.run`; every number below comes from this one run.",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine_start['nproc']} CPUs ({machine_start['cpu']}), {machine_start['memory_gib']} GiB "
        f"memory, no GPU; Python {machine_start['python']}, torch {machine_start['torch']}, deepspeed "
        f"{machine_start['deepspeed']}, transformers {machine_start['transformers']}. "
        f"Load average (1, 5, 15 min) {load} at the start and {load_end} at the end: other jobs shared the "
        f"machine, so times are noisy. Wall time {seconds / 60:.1f} min.",
        "",
        markdown_table(records, details),
        "",
    ]
    if errors:
        lines += ["Failures:", "", *[f"- {e}" for e in errors], ""]
    lines += ["## How each number is measured", "", METHODS, "Settings of this run: `" + repr(settings_used) + "`", ""]
    return "\n".join(lines)
