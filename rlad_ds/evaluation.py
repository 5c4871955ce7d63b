"""Mean@k and Pass@k, per subset and overall, for any generation engine.

- Pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) from n samples with c correct (Chen et al.
  2021), computed as the product 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms huge binomials.
  A sample counts as correct only with score 1.0 (a fully correct answer).
- Mean@k is the average accuracy over k samples. With n >= k samples the expected mean over a random
  k-subset equals the mean over all n, so we report that (same expectation, lower variance).
- Subset and overall values are averages over problems; "overall" pools every problem.

`evaluate(task, examples, generate_fn, n, ks)` asks `generate_fn(prompts, n)` for n completions per prompt,
scores them (in-process, or through a `RewardRunner` whose error / timeout counts are reported), and
returns a JSON-ready dict; `format_table` renders it, `write_json` saves it.

`eval_main(argv)` is `launchers/eval.py`: the model as a ZeRO-3 inference engine (no optimizer), problems
sharded over ranks (`shard_indices`), generated with the whole model gathered once for the evaluation
(ZeRO's hooks off, no collectives while decoding) or, above `--gather_budget_gb`, per layer with ranks in
lock-step; scores gathered to rank 0 (`merge_shards`), a markdown table printed there and the JSON written.
Each generate call is seeded from its first problem (`sample_seed`), so with `--batch_size 1` the samples
are the same for any number of ranks. Bad input is one line on stderr from rank 0 and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

from rlad_ds.data import Example
from rlad_ds.errors import ConfigError
from rlad_ds.tasks.base import Task

logger = logging.getLogger("rlad_ds")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_at_k(scores: Sequence[float], k: int) -> float:
    """Average accuracy over k samples, estimated from all n >= k samples of one problem."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"need 1 <= k <= n, got k={k} for n={len(scores)} samples")
    return sum(scores) / len(scores)


def problem_metrics(scores: Sequence[float], ks: Sequence[int]) -> dict[str, float]:
    """{"mean@k": ..., "pass@k": ...} for one problem's n sample scores."""
    correct = sum(score == 1.0 for score in scores)
    metrics = {f"mean@{k}": mean_at_k(scores, k) for k in ks}
    metrics.update({f"pass@{k}": pass_at_k(len(scores), correct, k) for k in ks})
    return metrics


def _average(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def _natural_key(name: str):
    # PPL2 < PPL10, not PPL10 < PPL2.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def evaluate(task: Task, examples: Sequence[Example | dict], generate_fn: Callable[[list[str], int], list[list[str]]],
             n: int, ks: Sequence[int] = (1,), runner=None, batch_size: int | None = None) -> dict:
    """Generate n completions per example, score them, and compute Mean@k / Pass@k per subset and overall.

    `examples` are `Example`s (rendered prompts) or raw records (prompted bare with `task.prompt`).
    `runner` is an optional `rlad_ds.rewards.RewardRunner` (hard timeouts); `batch_size` caps the prompts
    per `generate_fn` call.
    """
    ks = sorted(set(ks))
    if not examples:
        raise ValueError("no examples to evaluate")
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"every k must be in 1..n={n}, got {list(ks)}")
    examples = [e if isinstance(e, Example) else Example(task.prompt(e), e) for e in examples]
    completions = _generate(generate_fn, [e.text for e in examples], n, batch_size or len(examples))
    scores, errors, timeouts = _score(task, examples, completions, runner)
    return results_from_scores(task, [e.record for e in examples], scores, n, ks, errors, timeouts)


def results_from_scores(task: Task, records: Sequence[dict], scores: Sequence[Sequence[float]], n: int,
                        ks: Sequence[int] = (1,), errors: int = 0, timeouts: int = 0) -> dict:
    """`evaluate`'s result from already computed scores: `scores[i]` are the n sample scores of `records[i]`."""
    ks = sorted(set(ks))
    if not records or len(records) != len(scores):
        raise ValueError(f"need one score list per record, got {len(scores)} for {len(records)} records")
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"every k must be in 1..n={n}, got {list(ks)}")
    if any(len(s) != n for s in scores):
        raise ValueError(f"every record needs n={n} scores, got {sorted({len(s) for s in scores})}")
    problems = [{"index": i, "subset": task.subset(r), "scores": list(s), **problem_metrics(s, ks)}
                for i, (r, s) in enumerate(zip(records, scores))]
    subsets = {}
    for name in sorted({p["subset"] for p in problems}, key=_natural_key):
        members = [p for p in problems if p["subset"] == name]
        subsets[name] = {"problems": len(members), **_average([_metrics_only(p) for p in members])}
    overall = {"problems": len(problems), **_average([_metrics_only(p) for p in problems])}
    return {"task": task.name, "n": n, "ks": ks, "subsets": subsets, "overall": overall,
            "score_errors": errors, "score_timeouts": timeouts, "problems": problems}


def _metrics_only(problem: dict) -> dict[str, float]:
    return {key: value for key, value in problem.items() if "@" in key}


def _generate(generate_fn, prompts: list[str], n: int, batch_size: int) -> list[list[str]]:
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        out = generate_fn(batch, n)
        if len(out) != len(batch) or any(len(group) != n for group in out):
            raise ValueError(f"generate_fn must return {n} completions for each of {len(batch)} prompts, got "
                             f"{[len(group) for group in out]}")
        completions.extend(out)
    return completions


def _score(task: Task, examples: list[Example], completions: list[list[str]], runner):
    if runner is None:
        scores = [[float(task.score(c, e.record)) for c in group] for e, group in zip(examples, completions)]
        return scores, 0, 0
    flat = [c for group in completions for c in group]
    records = [e.record for e, group in zip(examples, completions) for _ in group]
    result = runner.run(flat, records)
    n = len(completions[0])
    return [result.scores[i:i + n] for i in range(0, len(flat), n)], result.errors, result.timeouts


def format_table(results: dict, style: str = "markdown") -> str:
    """The per-subset and overall metrics as a markdown or plain-text table (values in %)."""
    if style not in ("markdown", "plain"):
        raise ValueError(f"style must be 'markdown' or 'plain', got {style!r}")
    metrics = [f"mean@{k}" for k in results["ks"]] + [f"pass@{k}" for k in results["ks"]]
    header = ["subset", "problems"] + [m.replace("mean", "Mean").replace("pass", "Pass") for m in metrics]
    rows = [[name, str(row["problems"])] + [f"{100 * row[m]:.1f}" for m in metrics]
            for name, row in [*results["subsets"].items(), ("overall", results["overall"])]]
    if style == "markdown":
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


# ---- sharding over ranks (pure) ----------------------------------------------------------------------------------

def shard_indices(num_items: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """The item indices `rank` evaluates (strided: rank, rank + world, ...) and how many every rank runs.

    The second value is the largest shard; a rank whose shard is shorter pads with throw-away work up to it
    whenever its generation takes part in collectives (per-layer ZeRO-3 gathers), so no rank waits forever.
    """
    if world_size < 1 or not 0 <= rank < world_size or num_items < 0:
        raise ValueError(f"need world_size >= 1, 0 <= rank < world_size, num_items >= 0; got {num_items}, "
                         f"{rank}, {world_size}")
    return list(range(rank, num_items, world_size)), -(-num_items // world_size)


def merge_shards(parts: Sequence[Sequence[tuple[int, object]]], num_items: int) -> list:
    """Every rank's [(index, value), ...] back into one list in index order; each index exactly once."""
    merged: list = [None] * num_items
    seen = [False] * num_items
    for part in parts:
        for index, value in part:
            if not 0 <= index < num_items or seen[index]:
                raise ValueError(f"index {index} is out of range or comes twice in the gathered shards")
            merged[index], seen[index] = value, True
    if not all(seen):
        raise ValueError(f"the gathered shards miss index {seen.index(False)} of {num_items}")
    return merged


def sample_seed(seed: int, index: int) -> int:
    """The torch seed of the generate call whose first prompt is item `index`: independent of the rank count."""
    return (seed * 1_000_003 + index) % 2**63


# ---- the launcher: `python launchers/eval.py` or `deepspeed launchers/eval.py` -----------------------------------

class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line through ConfigError, not usage + exit inside argparse
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="launchers/eval.py", description="Mean@k and unbiased Pass@k of a causal LM on a "
                        "task, per subset, under ZeRO-3 inference (any number of ranks).")
    p.add_argument("--model", required=True, help="Hugging Face model dir (config.json + safetensors/bin)")
    p.add_argument("--task", required=True, help="kk, math, arith or module:function returning a Task")
    p.add_argument("--dataset", default=None, help="jsonl/json/parquet/csv file, save_to_disk dir or hub name; "
                   "default: the task's own generated test split")
    p.add_argument("--split", default="test", help="split of a saved dataset dict or hub dataset")
    p.add_argument("--columns", default=None, help="column mapping, e.g. prompt=question,answer=answer")
    p.add_argument("--system_prompt", default=None, help="system message for the chat template")
    p.add_argument("--prompt_template", default=None, help="raw template with {prompt} instead of the chat template")
    p.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows (counted) instead of stopping")
    p.add_argument("--size", type=int, default=None, help="number of problems (generated tasks need it; "
                   "for a file: the first N usable rows)")
    # The deepspeed launcher's own parser rejects `--n` (an ambiguous prefix of its --num_* options) even after
    # the script name: behind it, write -n or --n_samples.
    p.add_argument("--n", "-n", "--n_samples", dest="n", type=int, default=32,
                   help="samples per problem (behind the deepspeed launcher: -n or --n_samples)")
    p.add_argument("--k", default="1,8,32", help="comma-separated k values (each <= n)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling")
    p.add_argument("--top_k", type=int, default=0, help="top-k sampling (<= 0: off)")
    p.add_argument("--max_new_tokens", type=int, default=4096, help="response budget in tokens")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate call on each rank "
                   "(x n rows); 1 makes sampled outputs independent of the number of ranks")
    p.add_argument("--seed", type=int, default=0, help="data (generated tasks) and sampling seed")
    p.add_argument("--output", default=None, help="write the results here as JSON")
    p.add_argument("--save_completions", action="store_true", help="also store every completion in the JSON")
    p.add_argument("--rollout", default="auto", choices=("auto", "gathered", "per_layer"),
                   help="gathered: the whole model gathered once, ranks decode independently; per_layer: ZeRO-3 "
                   "gathers per layer, ranks in lock-step; auto: gathered below --gather_budget_gb")
    p.add_argument("--gather_budget_gb", type=float, default=32.0, help="largest model (GB of parameters) auto "
                   "gathers whole on every rank")
    p.add_argument("--deepspeed", default=None, help="inference ZeRO-3 JSON (default ds_configs/teacher.json)")
    p.add_argument("--offload_params", action="store_true", help="keep parameter partitions in CPU memory")
    p.add_argument("--attn_implementation", default="auto", help="auto, sdpa, eager, flash_attention_2, "
                   "flex_attention")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model dir")
    p.add_argument("--score_workers", type=int, default=2, help="verifier processes per rank, each call with a "
                   "hard timeout (0: score in-process, no timeout)")
    p.add_argument("--score_timeout", type=float, default=10.0, help="seconds per verifier call")
    p.add_argument("--collective_timeout_s", type=int, default=1800, help="seconds a collective may wait")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the launcher
    return p


def parse_eval_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parsed and checked arguments; every mistake is a one-line ConfigError."""
    args = build_parser().parse_args(list(argv))
    try:
        args.ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"--k {args.k!r} must be comma-separated integers, e.g. 1,8,32") from None
    checks = [(args.n >= 1, f"--n must be >= 1, got {args.n}"),
              (bool(args.ks) and args.ks[0] >= 1 and args.ks[-1] <= args.n,
               f"every --k must be in 1..n={args.n}, got {args.k!r}"),
              (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
              (0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}"),
              (args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
              (args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}"),
              (args.size is None or args.size >= 1, f"--size must be >= 1, got {args.size}"),
              (args.score_workers >= 0 and args.score_timeout > 0,
               "--score_workers must be >= 0 and --score_timeout > 0"),
              (args.gather_budget_gb > 0, "--gather_budget_gb must be > 0")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if args.temperature == 0 and args.n > 1:
        logger.warning("--temperature 0 is greedy: all %d samples of a problem are the same", args.n)
    return args


def eval_main(argv: Sequence[str] | None = None) -> int:
    """The evaluation launcher: 0 on success, 2 (one line on stderr from rank 0) on a user mistake."""
    argv = sys.argv[1:] if argv is None else list(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[rlad_ds %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return _eval(argv)
    except ConfigError as error:
        if "--debug" in argv:
            raise
        if rank == 0:
            print(f"rlad_ds: error: {error}", file=sys.stderr)
        _end_process_group(barrier=False)
        return 2


def _end_process_group(barrier: bool = True) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _eval(argv) -> int:
    args = parse_eval_args(argv)
    from rlad_ds.data import load_examples
    from rlad_ds.main import _single_process_env
    from rlad_ds.models import check_model_dir, load_tokenizer
    from rlad_ds.tasks import get_task

    # Everything a user can get wrong is checked before the process group exists, identically on every rank.
    task = get_task(args.task)
    model_dir = check_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=args.trust_remote_code)
    use_chat = args.prompt_template is None
    try:
        examples = load_examples(task, args.dataset, split=args.split, n=args.size, seed=args.seed,
                                 columns=args.columns, tokenizer=tokenizer if use_chat else None,
                                 template=args.prompt_template, system_prompt=args.system_prompt,
                                 skip_bad_rows=args.skip_bad_rows)
    except ConfigError:
        raise
    except Exception as error:  # e.g. `datasets` cannot reach or parse a hub dataset
        if args.dataset is None or "--debug" in argv:
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"cannot load dataset {args.dataset!r} ({type(error).__name__}: {first_line}); give a "
                          "local file or save_to_disk dir, or a hub name reachable from here") from None
    if examples.skipped:
        logger.warning("skipped %d bad rows (first: %s)", examples.skipped, examples.messages[0])

    start = time.perf_counter()
    _single_process_env()
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(timeout=timedelta(seconds=args.collective_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, mode = _load_engine(args, model_dir)
    load_seconds = time.perf_counter() - start

    own, per_rank = shard_indices(len(examples), rank, world)
    clock = time.perf_counter()
    completions, tokens = _generate_shard(engine, tokenizer, examples, own, per_rank, mode, args)
    generate_seconds = time.perf_counter() - clock
    scores, errors, timeouts = _score_shard(args, task, [examples[i].record for i in own], completions)

    shard = [(i, (s, c if args.save_completions else None)) for i, s, c in zip(own, scores, completions)]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"items": shard, "errors": errors, "timeouts": timeouts, "tokens": tokens,
                                      "generate_seconds": generate_seconds})
    if rank == 0:
        merged = merge_shards([g["items"] for g in gathered], len(examples))
        results = results_from_scores(task, [e.record for e in examples], [m[0] for m in merged], args.n,
                                      args.ks, sum(g["errors"] for g in gathered),
                                      sum(g["timeouts"] for g in gathered))
        if args.save_completions:
            for problem, (_, texts) in zip(results["problems"], merged):
                problem["completions"] = texts
        total_tokens = sum(g["tokens"] for g in gathered)
        slowest = max(g["generate_seconds"] for g in gathered)
        results["run"] = {"model": str(model_dir), "dataset": args.dataset, "split": args.split,
                          "size": len(examples), "skipped_rows": examples.skipped, "seed": args.seed,
                          "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                          "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                          "world_size": world, "rollout": mode, "generated_tokens": total_tokens,
                          "load_seconds": round(load_seconds, 2), "generate_seconds": round(slowest, 2),
                          "tokens_per_second": round(total_tokens / slowest, 1) if slowest > 0 else None,
                          "seconds": round(time.perf_counter() - start, 2)}
        print(format_table(results), flush=True)
        print(f"\n{len(examples)} problems x {args.n} samples, {world} rank(s), {mode} generation: "
              f"{total_tokens} tokens in {slowest:.1f} s", flush=True)
        if results["score_errors"] or results["score_timeouts"]:
            print(f"scoring: {results['score_errors']} errors, {results['score_timeouts']} timeouts (scored 0)")
        if args.output:
            print(f"wrote {write_json(results, args.output)}", flush=True)
    _end_process_group()
    return 0


def _load_engine(args, model_dir: Path):
    """The model as a ZeRO-3 inference engine (no optimizer) and the generation mode it gets."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from rlad_ds.ds_config import teacher_config
    from rlad_ds.models import choose_attention, load_causal_lm, param_bytes

    device = get_accelerator().device_name()
    threshold = os.environ.get("RLAD_PERSISTENCE_THRESHOLD")
    config = teacher_config(args.deepspeed, offload=args.offload_params, world_size=dist.get_world_size(),
                            micro_batch_size=1, device=device,
                            persistence_threshold=int(threshold) if threshold not in (None, "") else None)
    attn = choose_attention(device, None if args.attn_implementation == "auto" else args.attn_implementation)
    model = load_causal_lm(model_dir, config, attn_implementation=attn, trainable=False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    mode = args.rollout
    if mode == "auto":
        full = param_bytes(engine.module)
        mode = "gathered" if full <= args.gather_budget_gb * 2**30 else "per_layer"
        if mode == "per_layer":
            logger.warning("the model needs %.1f GiB gathered, over --gather_budget_gb %.1f: per-layer ZeRO-3 "
                           "generation with synced ranks", full / 2**30, args.gather_budget_gb)
    return engine, mode


@contextmanager
def _generating_module(engine, mode: str):
    """The module to call generate on. Gathered: ZeRO-3's whole parameters for the whole evaluation, hooks off
    (an optimizer-less engine's `DeepSpeedZeRoOffload` holds them; they come back on exceptions too)."""
    from rlad_ds.rollout import eval_mode, gathered_for_generation

    if mode == "gathered":
        with gathered_for_generation(engine) as unwrapped, eval_mode(unwrapped.module) as module:
            yield module
    else:
        with eval_mode(engine.module) as module:
            yield module


def _generate_shard(engine, tokenizer, examples, own: list[int], per_rank: int, mode: str, args):
    """n completions for each of this rank's examples, plus the number of generated tokens.

    Per-layer generation pads the shard with throw-away calls up to `per_rank` examples, so that every rank
    makes the same generate calls; gathered generation runs no collective and needs no padding.
    """
    import torch
    from deepspeed.runtime.rollout import SamplingConfig

    from rlad_ds.rollout import finish_rollout, generation_config

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, n_samples_per_prompt=args.n)
    config = generation_config(sampling, tokenizer)
    synced = mode == "per_layer"
    padded = own + [None] * ((per_rank - len(own)) if synced else 0)
    tokenizer.padding_side = "left"
    completions, tokens = [], 0
    with _generating_module(engine, mode) as module, torch.no_grad():
        for start in range(0, len(padded), args.batch_size):
            batch = padded[start:start + args.batch_size]
            indices = [i if i is not None else 0 for i in batch]  # padding repeats item 0, output dropped
            enc = tokenizer([examples[i].text for i in indices], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            ids, mask = enc["input_ids"].to(engine.device), enc["attention_mask"].to(engine.device)
            torch.manual_seed(sample_seed(args.seed, indices[0]))
            out = module.generate(ids.repeat_interleave(args.n, 0), attention_mask=mask.repeat_interleave(args.n, 0),
                                  generation_config=config, synced_gpus=synced)
            rollout = finish_rollout(mask, out, args.n, tokenizer.eos_token_id, tokenizer.pad_token_id)
            texts = [tokenizer.decode(row[keep].tolist(), skip_special_tokens=True)
                     for row, keep in zip(rollout.input_ids, rollout.response_mask)]
            for j, index in enumerate(batch):
                if index is not None:
                    completions.append(texts[j * args.n:(j + 1) * args.n])
                    tokens += int(rollout.response_mask[j * args.n:(j + 1) * args.n].sum())
    return completions, tokens


def _score_shard(args, task: Task, records: list[dict], completions: list[list[str]]):
    """Each completion's score (verifier processes with a hard timeout, or in-process), errors, timeouts."""
    if not records:
        return [], 0, 0
    if args.score_workers == 0:
        return [[float(task.score(c, r)) for c in group] for r, group in zip(records, completions)], 0, 0
    from rlad_ds.rewards import RewardRunner

    with RewardRunner(args.task, timeout_s=args.score_timeout, workers=args.score_workers) as runner:
        result = runner.run([c for group in completions for c in group],
                            [r for r, group in zip(records, completions) for _ in group])
    if result.messages:
        logger.warning("scoring: %s", "; ".join(result.messages[:3]))
    return [result.scores[i:i + args.n] for i in range(0, len(result.scores), args.n)], result.errors, \
        result.timeouts
