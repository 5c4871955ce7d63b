"""The study's report: per-seed aggregation, the markdown tables, the curves, and the student-confidence probe.

Pure functions of the results `benchmarks.study` collects (unit-tested in tests/test_study.py), plus
`token_confidence`, a forward pass of the initial student.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rlad_ds.tasks import arith

SWEEP_ALPHAS = (0.1, 0.3, 0.7, 0.9)  # 0.5 is the main RLAD run
KD = "kd (on-policy, no reward)"


def carry_subset(example: dict) -> str:
    """'carry' when the units column carries (the misaligned teacher is wrong there), else 'no_carry'."""
    return "carry" if example["a"] % 10 + example["b"] % 10 >= 10 else "no_carry"


def aggregate(values: list[float]) -> dict:
    """Mean, sample std (ddof 1; 0 for one value), min, max and n of per-seed values."""
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def format_agg(agg: dict) -> str:
    """'0.642 ± 0.031 (0.610-0.670)' or '0.642' for a single value; 'n/a' when empty."""
    if not agg["n"]:
        return "n/a"
    if agg["n"] == 1:
        return f"{agg['mean']:.3f}"
    return f"{agg['mean']:.3f} ± {agg['std']:.3f} ({agg['min']:.3f}-{agg['max']:.3f})"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells, header has {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def subset_accuracy(scores: list[float], examples: list[dict], subset=carry_subset) -> dict[str, float]:
    """Accuracy per subset of `examples` (and 'all')."""
    groups: dict[str, list[float]] = {}
    for score, example in zip(scores, examples):
        groups.setdefault(subset(example), []).append(score)
    out = {name: sum(v) / len(v) for name, v in sorted(groups.items())}
    out["all"] = sum(scores) / max(len(scores), 1)
    return out


def summarise(results: list[dict], refs: dict, mode: dict) -> dict:
    """Per (group, name): per-seed final accuracies, per-subset values, aggregated; curves averaged over seeds."""
    from collections import defaultdict

    ref_examples = refs["examples"]
    reference = {k: subset_accuracy(v, ref_examples) for k, v in refs["scores"].items()}
    rows = defaultdict(list)
    for r in results:
        rows[(r["job"]["group"], r["job"]["name"])].append(r)
    summary = {}
    for (group, name), runs in rows.items():
        runs = sorted(runs, key=lambda r: r["job"]["seed"])
        subsets = sorted({k for r in runs for k in r["subsets"]})
        steps = [s for s, _ in runs[0]["curve"]]
        curve = [
            [s, {k: statistics.fmean(r["curve"][i][1][k] for r in runs) for k in runs[0]["curve"][i][1]}]
            for i, s in enumerate(steps)
        ]
        train = [statistics.fmean(r["train_accuracy"][i] for r in runs) for i in range(len(runs[0]["train_accuracy"]))]
        summary[f"{group}/{name}"] = {
            "group": group,
            "name": name,
            "seeds": [r["job"]["seed"] for r in runs],
            "final": aggregate([r["final"] for r in runs]),
            "per_seed": [r["final"] for r in runs],
            "subsets": {k: aggregate([r["subsets"][k] for r in runs]) for k in subsets},
            "curve_mean": curve,
            "train_accuracy_mean": train,
            "final_alpha_mean": statistics.fmean(r["alpha_trace"][-1] for r in runs)
            if runs[0]["alpha_trace"][-1] is not None
            else None,
            "seconds_mean": statistics.fmean(r["seconds"] for r in runs),
        }
    return {"reference": reference, "rows": summary}


MAIN_ORDER = [
    "grpo",
    "grpo shuffled rewards",
    KD,
    "kdrl",
    "kdrl beta_kd=1",
    "rlad a=0.5",
    "rlad adaptive alpha",
    "sft (offline distill)",
]


def tables(summary: dict, mode: dict, eval_size: int) -> str:
    """The study's three tables (aligned teacher, alpha sweep, misaligned teacher) as markdown."""
    head = (
        f"Held-out accuracy, greedy, {eval_size} fixed test-split prompts; after {mode['steps']} steps "
        f"(16 prompts x G=8 per step). Cells: mean ± sample std (min-max) over seeds."
    )
    return "\n".join([head, "", *_main_table(summary), *_sweep_table(summary), *_misaligned_table(summary, eval_size)])


def _main_table(summary: dict) -> list[str]:
    ref, rows = summary["reference"], summary["rows"]
    table = [
        ["student before (initial)", "-", f"{ref['student_before']['all']:.3f}", "-"],
        ["teacher (aligned, reference)", "-", f"{ref['teacher_aligned']['all']:.3f}", "-"],
    ]
    for name in MAIN_ORDER:
        row = rows.get(f"main/{name}")
        if row:
            per_seed = " / ".join(f"{v:.3f}" for v in row["per_seed"])
            table.append([name, str(len(row["seeds"])), format_agg(row["final"]), per_seed])
    header = ["method", "seeds", "held-out accuracy", "per seed"]
    return ["### Aligned teacher (the demo teacher)", "", render_table(header, table), ""]


def _sweep_table(summary: dict) -> list[str]:
    rows, table = summary["rows"], []
    for alpha in sorted(set(SWEEP_ALPHAS) | {0.5}):
        row = rows.get("main/rlad a=0.5" if alpha == 0.5 else f"sweep/rlad a={alpha}")
        if row:
            table.append([f"{alpha}", str(len(row["seeds"])), format_agg(row["final"])])
    if "main/grpo" in rows:
        table.append(["1.0 (= grpo)", str(len(rows["main/grpo"]["seeds"])), format_agg(rows["main/grpo"]["final"])])
    header = ["alpha", "seeds", "held-out accuracy"]
    return ["### RLAD alpha sweep (aligned teacher; alpha = 1 is GRPO)", "", render_table(header, table), ""]


def _misaligned_table(summary: dict, eval_size: int) -> list[str]:
    ref, rows, parts = summary["reference"], summary["rows"], ("all", "carry", "no_carry")
    table = [
        ["student before (initial)", "-"] + [f"{ref['student_before'][k]:.3f}" for k in parts],
        ["teacher (misaligned, reference)", "-"] + [f"{ref['teacher_misaligned'][k]:.3f}" for k in parts],
    ]
    labels = [
        ("main/grpo", "grpo (no teacher)"),
        (f"misaligned/{KD}", KD),
        ("misaligned/kdrl", "kdrl"),
        ("misaligned/kdrl beta_kd=1", "kdrl beta_kd=1"),
        ("misaligned/rlad a=0.5", "rlad a=0.5"),
    ]
    for key, label in labels:
        row = rows.get(key)
        if row:
            cells = [format_agg(row["subsets"][k]) if k != "all" else format_agg(row["final"]) for k in parts]
            table.append([label, str(len(row["seeds"]))] + cells)
    n_carry = sum(carry_subset(e) == "carry" for e in summary.get("examples", []))
    header = ["method", "seeds", "all", "carry (teacher wrong)", "no_carry (teacher right)"]
    return [
        "### Misaligned teacher (wrong whenever the units column carries)",
        "",
        f"`carry`: the units digits sum to 10 or more ({n_carry} of {eval_size} prompts; the teacher is wrong "
        "there), `no_carry`: they do not (the teacher is right).",
        "",
        render_table(header, table),
        "",
    ]


def plot(summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, rows = summary["reference"], summary["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    misaligned = [
        "main/grpo",
        f"misaligned/{KD}",
        "misaligned/kdrl",
        "misaligned/kdrl beta_kd=1",
        "misaligned/rlad a=0.5",
    ]
    panels = [
        ("aligned teacher: held-out accuracy (greedy), all prompts", [f"main/{n}" for n in MAIN_ORDER], "all"),
        (
            "alpha sweep (aligned teacher), all prompts",
            [f"sweep/rlad a={a}" for a in SWEEP_ALPHAS[:2]]
            + ["main/rlad a=0.5"]
            + [f"sweep/rlad a={a}" for a in SWEEP_ALPHAS[2:]]
            + ["main/grpo"],
            "all",
        ),
        ("misaligned teacher: 'carry' prompts (units column carries, teacher wrong)", misaligned, "carry"),
        ("misaligned teacher: 'no_carry' prompts (teacher right)", misaligned, "no_carry"),
    ]
    for ax, (title, keys, part) in zip(axes.flat, panels):
        before = ref["student_before"][part]
        for key in keys:
            row = rows.get(key)
            if not row:
                continue
            xs = [0] + [s for s, _ in row["curve_mean"]]
            ys = [before] + [v[part] for _, v in row["curve_mean"]]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{row['name']} (n={len(row['seeds'])})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy, mean over seeds")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---- where the student is unsure ------------------------------------------------------------------------------------


def token_confidence(student_dir: str, examples: list[dict]) -> list[dict]:
    """Per position of the worked solution: the student's mean probability of the correct token (teacher forcing).

    On-policy KD on sampled tokens moves a token's log-prob with a gradient scaled by (1 - p): a teacher can
    only pull the student where the student is unsure, which is where a misaligned teacher has to be wrong.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlad_ds.demo.recipe import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    width = len(arith.solution(examples[0]))
    sums, below = [0.0] * width, [0] * width
    for example in examples:
        prompt_ids = tokenizer(render_prompt(tokenizer, arith.prompt(example)), add_special_tokens=False).input_ids
        target_ids = tokenizer(arith.solution(example), add_special_tokens=False).input_ids
        if len(target_ids) != width:
            raise ValueError("token_confidence expects one token per character of the worked solution")
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([prompt_ids + target_ids])).logits[0].float(), -1)
        for i, token in enumerate(target_ids):
            p = probs[len(prompt_ids) + i - 1, token].item()
            sums[i] += p
            below[i] += p < 0.9
    sample = arith.solution(examples[0])
    return [
        {
            "position": i,
            "example_char": sample[i],
            "mean_p": sums[i] / len(examples),
            "frac_below_0.9": below[i] / len(examples),
        }
        for i in range(width)
    ]
