"""The benchmarks' pure parts: goals and `meets`, the record format, tables, MFU (no heavy runs here)."""

import json
import math

import pytest

from benchmarks import report, run
from benchmarks.common import RECORD_KEYS, make_record, markdown_table, meets_goal, parse_goal, write_json


@pytest.mark.parametrize(
    "value, goal, expected",
    [
        (5.6, ">= 5", True),
        (4.99, ">= 5", False),
        (5.0, ">= 5", True),
        (0.04, "<= 0.10", True),
        (0.1, "<= 0.10", True),
        (0.25, "<= 0.10", False),
        (1.0, "== 1", True),
        (0.0, "== 1", False),
        (2.0, "> 1", True),
        (1.0, "< 1", False),
        (float("nan"), ">= 5", False),
        (float("inf"), ">= 5", False),
        (None, "<= 1", False),
    ],
)
def test_meets_is_computed_from_value_and_goal(value, goal, expected):
    assert meets_goal(value, goal) is expected
    record = make_record("P0 x", value, "x", goal)
    assert record["meets"] is expected


@pytest.mark.parametrize("goal", ["5", ">=5", "at least 5", "=> 5", ">= five"])
def test_bad_goals_are_refused(goal):
    with pytest.raises(ValueError):
        parse_goal(goal)


def check_record(record):
    assert tuple(record) == RECORD_KEYS
    assert isinstance(record["name"], str) and record["name"][:2] in ("P1", "P2", "P3", "P4", "P5")
    assert isinstance(record["value"], float) and isinstance(record["unit"], str)
    assert isinstance(record["meets"], bool)
    assert record["meets"] == meets_goal(record["value"], record["goal"])


P1 = {
    "world_size": 2,
    "threads": 1,
    "partitioned": True,
    "identical_to_gathered": {"per_layer": True},
    "gathered": {"tokens_per_s": 600.0, "tokens": 1024.0},
    "per_layer": {"tokens_per_s": 100.0, "tokens": 1024.0},
}
P2_FULL = {
    "tokens": 8192,
    "vocab": 151936,
    "hidden": 256,
    "chunk_size": 0,
    "peak_growth_bytes": 15 * 2**30,
    "median_seconds": 40.0,
    "threads": 2,
}
P2_CHUNKED = {**P2_FULL, "chunk_size": 1024, "peak_growth_bytes": 3 * 2**30, "median_seconds": 50.0}
P3 = {
    "student_params": 76288,
    "teacher_params": 2370816,
    "cost": 1.05,
    "rlad_median_s": 1.5,
    "grpo_median_s": 0.7,
    "teacher_median_s": 0.76,
    "step_ratio": 2.14,
    "same_rollouts": True,
}
P4_SHORT = {"tokens": 2048, "peak_growth_bytes": 1.0 * 2**30, "seconds": 7.0, "gradient_checkpointing": False}
P4_LONG = {**P4_SHORT, "tokens": 8192, "peak_growth_bytes": 4.2 * 2**30, "seconds": 25.0}


def test_records_from_fake_measurements():
    p1, details1 = report.p1_records(P1, 7_900_000)
    assert [r["value"] for r in p1] == [6.0, 1.0] and all(r["meets"] for r in p1)
    assert "600 tok/s" in details1[p1[0]["name"]]
    p2, _ = report.p2_records(P2_CHUNKED, P2_FULL)
    assert p2[0]["value"] == pytest.approx(0.2) and not p2[0]["meets"]  # memory 0.2x > 0.10
    assert p2[1]["value"] == pytest.approx(1.25) and not p2[1]["meets"]  # time 1.25x > 1.0
    assert "T=8192" in p2[0]["name"] and "chunk 1024" in p2[0]["name"]
    p3, details3 = report.p3_records(P3)
    assert p3[0]["value"] == 1.05 and p3[0]["meets"] and "31x" in p3[0]["name"]
    assert "2.14x" in details3[p3[0]["name"]]
    p4, _ = report.p4_records(P4_SHORT, P4_LONG)
    assert p4[0]["value"] == pytest.approx(4.2) and p4[0]["meets"] and "8K / 2K" in p4[0]["name"]
    for record in p1 + p2 + p3 + p4:
        check_record(record)
    different, _ = report.p1_records(
        {**P1, "identical_to_gathered": {"per_layer": False}, "per_layer": {"tokens_per_s": 150.0, "tokens": 1024.0}},
        7_900_000,
    )
    assert [r["meets"] for r in different] == [False, False]


def test_vllm_records_when_vllm_ran_and_a_note_when_not():
    from benchmarks.engine_e2e import p5_records

    rl = {
        "world_size": 2,
        "threads": 1,
        "rows_per_rank": 64,
        "max_new_tokens": 128,
        "gathered": {"tokens_per_s": 600.0, "tokens": 16384.0},
        "identical_to_gathered": {"vllm": False},
        "vllm": {"tokens_per_s": 2700.0, "tokens": 16384.0, "sync_seconds": 0.2, "startup_seconds": 9.0},
    }
    records, details = report.p1_records(P1, 47_000_000, rl)
    assert [r["value"] for r in records] == [6.0, 1.0, 4.5] and records[2]["meets"]
    assert "vLLM / gathered (47.0M Qwen3, 2 ranks x 1 thread, 2 x 64 rows x 128 tokens)" in records[2]["name"]
    assert "differ from gathered's" in details[records[2]["name"]]
    skipped = {k: v for k, v in rl.items() if k != "vllm"} | {"vllm_skipped": "vLLM is not installed"}
    records, details = report.p1_records(P1, 7_900_000, skipped)
    assert len(records) == 2 and "vLLM not run: vLLM is not installed" in details[records[0]["name"]]
    runs = [
        {
            "engine": e,
            "seed": s,
            "step_s": t,
            "rollout_s": t / 2,
            "sync_share": 0.04 if e == "vllm" else 0.0,
            "train_forward_s": t / 10,
            "train_backward_s": t / 5,
            "eval_before": 0.5,
            "eval_after": a,
        }
        for e, t, a in (("gathered", 2.0, 0.8), ("vllm", 1.5, 0.79))
        for s in (0, 1)
    ]
    p5, details = p5_records({"steps": 60, "seeds": 2, "runs": runs})
    assert [r["value"] for r in p5] == [0.75, 0.04] and all(r["meets"] for r in p5)
    assert "vllm 0.790, 0.790" in details[p5[1]["name"]]
    assert "training forward 0.150 s vs 0.200 s, backward 0.300 s vs 0.400 s" in details[p5[0]["name"]]
    for record in records + p5:
        check_record(record)
    assert p5_records({"skipped": "vLLM not installed"}) == ([], {})


def test_json_and_table_hold_exactly_the_records(tmp_path):
    records = report.p1_records(P1, 7_900_000)[0] + [report.failed_record("P3 cost", "x", "<= 1.10")]
    path = tmp_path / "out" / "bench.json"
    write_json([{**r, "extra": 1} for r in records], path)
    loaded = json.loads(path.read_text())
    assert [tuple(r) for r in loaded] == [RECORD_KEYS] * 3
    assert math.isnan(loaded[2]["value"]) and loaded[2]["meets"] is False
    table = markdown_table(records, {records[0]["name"]: "raw numbers"})
    lines = table.splitlines()
    assert len(lines) == 2 + len(records) and "raw numbers" in lines[2] and "| failed |" in lines[4]
    assert "| yes |" in lines[2] and "| NO |" in lines[4]


def test_main_writes_records_and_markdown_and_reports_failures(tmp_path, monkeypatch):
    def fake_p1(settings, work):
        return (*report.p1_records(P1, 7_900_000), {})

    def broken_p3(settings, work):
        raise RuntimeError("worker exited 1\nlong log")

    monkeypatch.setitem(run.BENCHMARKS, "P1", (fake_p1, run.BENCHMARKS["P1"][1]))
    monkeypatch.setitem(run.BENCHMARKS, "P3", (broken_p3, run.BENCHMARKS["P3"][1]))
    machine = {
        "nproc": 2,
        "cpu": "Test CPU",
        "memory_gib": 8.0,
        "python": "3",
        "torch": "t",
        "deepspeed": "d",
        "transformers": "x",
        "load_average": (1.0, 1.0, 1.0),
    }
    monkeypatch.setattr(run, "machine_info", lambda: machine)
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = run.main(["--quick", "--only", "P1,P3", "--json", str(out), "--markdown", str(md)])
    assert rc == 1  # P3 failed
    records = json.loads(out.read_text())
    assert [r["name"][:2] for r in records] == ["P1", "P1", "P3"]
    assert records[2]["meets"] is False and math.isnan(records[2]["value"])
    text = md.read_text()
    assert "python -m benchmarks.run --quick --only P1,P3" in text and "Test CPU" in text
    assert "P3: worker exited 1" in text and "How each number is measured" in text
    with pytest.raises(SystemExit):
        run.main(["--only", "P9"])


def test_quick_settings_are_smaller_than_full():
    quick, full = run.settings(True), run.settings(False)
    assert quick.p2_tokens == full.p2_tokens == 8192 and quick.p2_vocab == 151936
    assert quick.p4_lengths == (2048, 8192)
    assert quick.p1_model["hidden"] < full.p1_model["hidden"] and quick.p3_steps < full.p3_steps


# ---- benchmarks/correction_agreement.py: the parts that need no peer installed -------------------------------------


def test_correction_agreement_inputs_stay_within_verl_bound_and_our_side_follows_the_presets():
    import torch

    from benchmarks import correction_agreement as agreement
    from rlad_ds.losses import rollout_correction

    old, rollout, mask = agreement.inputs(1.0, seed=2)
    assert old.dtype == torch.float64 and mask[0].sum() == 0 and mask.sum(-1).max() == agreement.WIDTH
    assert ((old - rollout) * mask).sum(-1).abs().max() <= 19.5 + 1e-9  # where verl's exp(+-20) clamp never acts
    wild, _, wild_mask = agreement.inputs(3.0, seed=2, within_verl_bound=False)
    assert ((wild - rollout) * wild_mask).sum(-1).abs().max() > agreement.VERL_SAFETY_BOUND
    # Exact bounds, None included (a preset's own default is not substituted for a peer's "no bound").
    assert agreement.options("icepop", (None, 3.0))["low"] is None
    effective, keep = agreement.ours("geo_rs", (0.9, 1.1), old, rollout, mask)
    weights, expected_keep = rollout_correction(old, rollout, mask, level="sequence", statistic="mean", action="mask",
                                                weight="one", low=0.9, high=1.1, drop_rejected=True)  # fmt: skip
    assert torch.equal(keep, expected_keep) and torch.equal(effective, weights * expected_keep)
    # Every preset has at least one peer mode it is compared with.
    assert {case[0] for case in agreement.CASES} == set(agreement.PRESETS)
    diffs = {"weights_keep_max_abs_diff": 0.0, "keep_max_abs_diff": 0.0, "outside_bounds_frac": [0.0, 0.25]}
    rows = [{"preset": "tis", "peer": "trl", "mode": "token_truncate", "bounds": [None, 3.0], **diffs}]
    assert (
        agreement.table(rows).splitlines()[2]
        == "| tis | trl | token_truncate | none, 3 | 0.0e+00 | 0.0e+00 | 0.00 / 0.25 |"
    )


def test_p5_correction_summary_says_whether_vllm_is_within_the_seed_spread():
    from benchmarks.engine_e2e import CORRECTION_RUNS, correction_summary

    def runs(accuracies):
        return [
            {"label": label, "eval_after": acc, "step_s": 1.0, "sampling_rounds": 2.0}
            for label, accs in zip(CORRECTION_RUNS, accuracies)
            for acc in accs
        ]

    close = correction_summary({"runs": runs([(0.70, 0.74), (0.73, 0.71), (0.72, 0.72)])})
    assert "| gathered | 0.700, 0.740 | 0.720 | 0.040 | 1.00 | - |" in close
    assert close.endswith("= 0.000; largest seed spread 0.040: within the seed spread")
    far = correction_summary({"runs": runs([(0.70, 0.71), (0.50, 0.51), (0.72, 0.72)])})
    assert far.endswith("outside the seed spread")
