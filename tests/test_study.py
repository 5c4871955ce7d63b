"""The study's pure pieces: the misaligned solution renderer, aggregation, tables, subsets, the run grid."""

import math

import pytest

from benchmarks import study, study_report
from benchmarks.misaligned_teacher import misaligned_solution
from rlad_ds.tasks import arith


def test_misaligned_solution_counts_the_units_carry_twice_in_the_tens_column():
    carry = arith.make_example(347, 285)  # 632: the units column carries
    assert misaligned_solution(carry) == "7+5+0=12|4+8+1=14|3+2+1=06|>0642"
    assert arith.solution(carry) == "7+5+0=12|4+8+1=13|3+2+1=06|>0632"
    assert arith.score(misaligned_solution(carry), carry) == 0.0
    no_carry = arith.make_example(341, 285)  # 626: no units carry, even though the tens column carries
    assert misaligned_solution(no_carry) == arith.solution(no_carry)
    assert arith.score(misaligned_solution(no_carry), no_carry) == 1.0
    ripple = arith.make_example(895, 105)  # 1000: the extra carry ripples into the hundreds column
    assert misaligned_solution(ripple) == "5+5+0=10|9+0+1=11|8+1+1=10|>1010"


def test_misaligned_solution_is_wrong_exactly_on_the_carry_subset():
    for example in arith.generate("train", 300, seed=3):
        mine, true = misaligned_solution(example), arith.solution(example)
        wrong = arith.score(mine, example) == 0.0
        assert wrong == (study_report.carry_subset(example) == "carry")
        # the units column is always right; only the tens column's sum is where the bug starts
        assert mine.split("|")[0] == true.split("|")[0]
        assert mine.split("|")[1].split("=")[0] == true.split("|")[1].split("=")[0]


def test_sft_targets_are_the_given_solution(monkeypatch):
    from rlad_ds.demo import recipe, sft

    tokenizer = recipe.demo_tokenizer()
    carry = arith.make_example(347, 285)
    _, _, labels = sft.sft_batch(tokenizer, [carry], misaligned_solution)
    target = tokenizer.decode([t for t in labels[0].tolist() if t != -100][:-1])  # without EOS
    assert target == misaligned_solution(carry) != arith.solution(carry)
    # train_sft hands its `solution` to every batch (the misaligned teacher is trained this way)
    seen, real = [], sft.sft_batch

    def recording_sft_batch(tok, batch, solution):
        seen.append(solution)
        return real(tok, batch, solution)

    monkeypatch.setattr(sft, "sft_batch", recording_sft_batch)
    model = recipe.build_model(recipe.DEFAULT_RECIPE.student, tokenizer, seed=0)
    sft.train_sft(
        model, tokenizer, recipe.SFTSpec(steps=2, batch_size=2), seed=0, progress=False, solution=misaligned_solution
    )
    assert seen == [misaligned_solution] * 2


def test_aggregate_mean_and_spread():
    agg = study_report.aggregate([0.5, 0.7, 0.6])
    assert agg["mean"] == pytest.approx(0.6)
    assert agg["std"] == pytest.approx(0.1)  # sample std (ddof 1)
    assert (agg["min"], agg["max"], agg["n"]) == (0.5, 0.7, 3)
    one = study_report.aggregate([0.4])
    assert one["std"] == 0.0 and one["n"] == 1
    empty = study_report.aggregate([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_format_agg():
    assert study_report.format_agg(study_report.aggregate([0.5, 0.7, 0.6])) == "0.600 ± 0.100 (0.500-0.700)"
    assert study_report.format_agg(study_report.aggregate([0.25])) == "0.250"
    assert study_report.format_agg(study_report.aggregate([])) == "n/a"


def test_render_table():
    text = study_report.render_table(["a", "b"], [["1", "2"], ["x", "y"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| x | y |"]
    with pytest.raises(ValueError):
        study_report.render_table(["a", "b"], [["1"]])


def test_subset_accuracy():
    examples = [
        arith.make_example(847, 285),
        arith.make_example(341, 285),
        arith.make_example(999, 999),
        arith.make_example(100, 100),
    ]
    out = study_report.subset_accuracy([1.0, 0.0, 0.0, 1.0], examples)
    assert out == {"carry": 0.5, "no_carry": 0.5, "all": 0.5}
    assert study_report.subset_accuracy([1.0, 1.0, 0.0, 1.0], examples)["no_carry"] == 1.0


def test_grid_has_every_method_and_control():
    jobs = study.build_jobs(seeds=3, sweep_seeds=1)
    names = {(j.group, j.name) for j in jobs}
    for name in study_report.MAIN_ORDER:
        assert ("main", name) in names
    assert sum(j.group == "main" and j.name == "rlad a=0.5" for j in jobs) == 3
    assert {j.alpha for j in jobs if j.group == "sweep"} == set(study_report.SWEEP_ALPHAS)
    assert {j.teacher for j in jobs if j.group == "misaligned"} == {"misaligned"}
    assert {j.control for j in jobs} == {None, "shuffled"}
    assert {j.method for j in jobs if j.name == study_report.KD} == {"kd"}
    assert any(j.adaptive for j in jobs)
    assert {j.beta_kd for j in jobs if j.name == "kdrl beta_kd=1"} == {1.0}
    assert {j.group for j in jobs if j.name == "kdrl beta_kd=1"} == {"main", "misaligned"}


def test_summary_and_tables_render_from_fake_results():
    mode = dict(study.MODES["quick"])
    examples = [{"a": 847, "b": 285}, {"a": 341, "b": 285}]
    refs = {
        "examples": examples,
        "scores": {"student_before": [0.0, 1.0], "teacher_aligned": [1.0, 1.0], "teacher_misaligned": [0.0, 1.0]},
    }
    results = []
    for job in study.build_jobs(seeds=2, sweep_seeds=1):
        results.append(
            {
                "job": study.dataclasses.asdict(job),
                "final": 0.5,
                "subsets": {"all": 0.5, "carry": 0.0, "no_carry": 1.0},
                "curve": [[3, {"all": 0.4, "carry": 0.2}], [6, {"all": 0.5, "carry": 0.3}]],
                "train_accuracy": [0.3] * 6,
                "alpha_trace": [0.5] * 6,
                "seconds": 1.0,
            }
        )
    summary = study_report.summarise(results, refs, mode)
    summary["examples"] = examples
    assert summary["rows"]["main/kdrl"]["final"]["n"] == 2
    assert summary["rows"]["main/kdrl"]["curve_mean"] == [
        [3, {"all": 0.4, "carry": 0.2}],
        [6, {"all": 0.5, "carry": 0.3}],
    ]
    text = study_report.tables(summary, mode, eval_size=2)
    assert "| kdrl | 2 | 0.500 ± 0.000 (0.500-0.500) |" in text
    assert "| teacher (misaligned, reference) | - | 0.500 | 0.000 | 1.000 |" in text
    assert "1 of 2 prompts" in text


def test_token_confidence_matches_a_direct_forward(tmp_path):
    import torch

    from rlad_ds.demo import recipe

    tokenizer = recipe.demo_tokenizer()
    model = recipe.build_model(recipe.DEFAULT_RECIPE.student, tokenizer, seed=0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    examples = [arith.make_example(347, 285), arith.make_example(999, 101)]
    rows = study_report.token_confidence(str(tmp_path), examples)
    assert [r["example_char"] for r in rows] == list(arith.solution(examples[0]))
    # position 0 by hand: the probability of the first solution character right after the prompt
    expected = []
    for example in examples:
        prompt = tokenizer(recipe.render_prompt(tokenizer, arith.prompt(example)), add_special_tokens=False).input_ids
        first = tokenizer(arith.solution(example), add_special_tokens=False).input_ids[0]
        with torch.no_grad():
            expected.append(torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)[first].item())
    assert rows[0]["mean_p"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert rows[0]["frac_below_0.9"] == sum(p < 0.9 for p in expected) / 2


@pytest.mark.parametrize("flag", ["--workers", "--steps", "--seeds", "--sweep_seeds"])
def test_bad_counts_are_refused_with_one_line(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main([flag, "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer, got 0" in err and "Traceback" not in err
