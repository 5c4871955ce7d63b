"""Mean@k and Pass@k, per subset and overall: pure functions, no model and no process group.

- Pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) from n samples with c correct (Chen et al.
  2021), computed as the product 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms huge binomials.
  A sample counts as correct only with score 1.0 (a fully correct answer, `rlad_ds.tasks.base.correct`).
- Mean@k is the average accuracy over k samples. With n >= k samples the expected mean over a random
  k-subset equals the mean over all n, so we report that (same expectation, lower variance).
- Subset and overall values are averages over problems; "overall" pools every problem.

`results_from_scores` turns every problem's n sample scores into a JSON-ready dict, `format_table` renders
it, `write_json` saves it, `eval_metrics` is its log line. `shard_indices` / `merge_shards` / `sample_seed`
are the pure parts of running an evaluation over ranks (`rlad_ds.generation.evaluate_examples` runs it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from rlad_ds.tasks.base import Task, correct


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
    n_correct = sum(bool(correct(score)) for score in scores)
    metrics = {f"mean@{k}": mean_at_k(scores, k) for k in ks}
    metrics.update({f"pass@{k}": pass_at_k(len(scores), n_correct, k) for k in ks})
    return metrics


def _average(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def _natural_key(name: str):
    # PPL2 < PPL10, not PPL10 < PPL2.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def results_from_scores(
    task: Task,
    records: Sequence[dict],
    scores: Sequence[Sequence[float]],
    n: int,
    ks: Sequence[int] = (1,),
    errors: int = 0,
    timeouts: int = 0,
) -> dict:
    """`evaluate`'s result from already computed scores: `scores[i]` are the n sample scores of `records[i]`."""
    ks = sorted(set(ks))
    if not records or len(records) != len(scores):
        raise ValueError(f"need one score list per record, got {len(scores)} for {len(records)} records")
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"every k must be in 1..n={n}, got {list(ks)}")
    if any(len(s) != n for s in scores):
        raise ValueError(f"every record needs n={n} scores, got {sorted({len(s) for s in scores})}")
    problems = [
        {"index": i, "subset": task.subset(r), "scores": list(s), **problem_metrics(s, ks)}
        for i, (r, s) in enumerate(zip(records, scores))
    ]
    subsets = {}
    for name in sorted({p["subset"] for p in problems}, key=_natural_key):
        members = [p for p in problems if p["subset"] == name]
        subsets[name] = {"problems": len(members), **_average([_metrics_only(p) for p in members])}
    overall = {"problems": len(problems), **_average([_metrics_only(p) for p in problems])}
    return {
        "task": task.name,
        "n": n,
        "ks": ks,
        "subsets": subsets,
        "overall": overall,
        "score_errors": errors,
        "score_timeouts": timeouts,
        "problems": problems,
    }


def _metrics_only(problem: dict) -> dict[str, float]:
    return {key: value for key, value in problem.items() if "@" in key}


def format_table(results: dict, style: str = "markdown") -> str:
    """The per-subset and overall metrics as a markdown or plain-text table (values in %)."""
    if style not in ("markdown", "plain"):
        raise ValueError(f"style must be 'markdown' or 'plain', got {style!r}")
    metrics = [f"mean@{k}" for k in results["ks"]] + [f"pass@{k}" for k in results["ks"]]
    header = ["subset", "problems"] + [m.replace("mean", "Mean").replace("pass", "Pass") for m in metrics]
    rows = [
        [name, str(row["problems"])] + [f"{100 * row[m]:.1f}" for m in metrics]
        for name, row in [*results["subsets"].items(), ("overall", results["overall"])]
    ]
    if style == "markdown":
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    )


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
        raise ValueError(
            f"need world_size >= 1, 0 <= rank < world_size, num_items >= 0; got {num_items}, {rank}, {world_size}"
        )
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


def eval_metrics(results: dict) -> dict:
    """An evaluation's log line: overall accuracy (Mean@k), Pass@k for k > 1, and the accuracy per subset."""
    overall, ks = results["overall"], results["ks"]
    # A verifier that raised or timed out scores 0 like a wrong answer; counted apart so that the two never blur.
    metrics = {
        "eval_accuracy": overall[f"mean@{ks[0]}"],
        "eval_score_errors": results["score_errors"] + results["score_timeouts"],
    }
    metrics.update({f"eval_pass@{k}": overall[f"pass@{k}"] for k in ks if k > 1})
    if len(results["subsets"]) > 1:
        metrics.update({f"eval_accuracy/{name}": row[f"mean@{ks[0]}"] for name, row in results["subsets"].items()})
    return metrics
