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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Sequence

from rlad_ds.data import Example
from rlad_ds.tasks.base import Task


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
    problems = [{"index": i, "subset": task.subset(e.record), "scores": s, **problem_metrics(s, ks)}
                for i, (e, s) in enumerate(zip(examples, scores))]
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
