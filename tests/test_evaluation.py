"""Pass@k / Mean@k against brute force, and per-subset results from samples of known accuracy."""

import itertools
import json
import random
from math import comb

import pytest

from rlad_ds.evaluation import (
    eval_metrics,
    format_table,
    mean_at_k,
    pass_at_k,
    problem_metrics,
    results_from_scores,
    write_json,
)
from rlad_ds.tasks import get_task
from rlad_ds.tasks.kk import solution_text

KK = get_task("kk")


def brute_force_pass_at_k(outcomes, k):
    """Fraction of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_over_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(1000, 3, 32) == pytest.approx(1 - comb(997, 32) / comb(1000, 32), rel=1e-12)
    assert pass_at_k(10_000, 0, 500) == 0.0 and pass_at_k(10_000, 9_600, 500) == 1.0
    assert pass_at_k(32, 1, 32) == 1.0


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_at_k_equals_expected_mean_over_k_subsets():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0]
    for k in range(1, 6):
        subsets = list(itertools.combinations(scores, k))
        assert mean_at_k(scores, k) == pytest.approx(sum(sum(s) / k for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        mean_at_k(scores, 6)
    assert problem_metrics([1.0, 0.5, 0.0, 0.0], [1, 2]) == {
        "mean@1": 0.375,
        "mean@2": 0.375,
        "pass@1": 0.25,
        "pass@2": 0.5,
    }  # 0.5 is not "correct"


def right(record):
    return f"<answer>{solution_text(record['names'], record['solution'])}</answer>"


def wrong(record):
    return f"<answer>{solution_text(record['names'], [not s for s in record['solution']])}</answer>"


@pytest.fixture(scope="module")
def puzzles():
    return KK.generate("test", 14, seed=5)  # two per size PPL2..PPL8


def scored_samples(records, accuracy_by_size, n, seed=0):
    """n completions per puzzle, right with a known probability per puzzle size, scored by the real verifier."""
    rng = random.Random(seed)
    return [
        [KK.score(right(r) if rng.random() < accuracy_by_size[len(r["names"])] else wrong(r), r) for _ in range(n)]
        for r in records
    ]


def test_results_per_subset_with_exact_accuracies(puzzles):
    accuracy = {size: (1.0 if size <= 4 else 0.0) for size in range(2, 9)}
    results = results_from_scores(KK, puzzles, scored_samples(puzzles, accuracy, 4), n=4, ks=[1, 4])
    assert list(results["subsets"]) == [f"PPL{s}" for s in range(2, 9)]
    for size in range(2, 9):
        row = results["subsets"][f"PPL{size}"]
        assert row == {
            "problems": 2,
            "mean@1": accuracy[size],
            "mean@4": accuracy[size],
            "pass@1": accuracy[size],
            "pass@4": accuracy[size],
        }
    assert results["overall"]["problems"] == 14 and results["overall"]["mean@1"] == pytest.approx(3 / 7)
    assert results["score_errors"] == results["score_timeouts"] == 0
    assert len(results["problems"]) == 14 and results["problems"][0]["scores"] == [1.0] * 4
    assert eval_metrics(results)["eval_accuracy"] == pytest.approx(3 / 7)
    assert eval_metrics(results)["eval_pass@4"] == pytest.approx(3 / 7)
    assert eval_metrics(results)["eval_accuracy/PPL2"] == 1.0 and eval_metrics(results)["eval_accuracy/PPL8"] == 0.0


def test_results_converge_to_the_sample_accuracy(puzzles):
    # With accuracy p per sample, Mean@k -> p and Pass@k -> 1 - (1 - p)^k.
    p, n = 0.3, 400
    results = results_from_scores(
        KK, puzzles, scored_samples(puzzles, {s: p for s in range(2, 9)}, n, seed=1), n=n, ks=[1, 4]
    )
    assert results["overall"]["mean@1"] == pytest.approx(p, abs=0.03)
    assert results["overall"]["pass@4"] == pytest.approx(1 - (1 - p) ** 4, abs=0.04)


def test_results_reject_bad_input(puzzles):
    scores = scored_samples(puzzles, {s: 1.0 for s in range(2, 9)}, 2)
    with pytest.raises(ValueError, match="every k must be in 1..n=2"):
        results_from_scores(KK, puzzles, scores, n=2, ks=[4])
    with pytest.raises(ValueError, match="one score list per record"):
        results_from_scores(KK, [], [], n=2)
    with pytest.raises(ValueError, match="needs n=2 scores"):
        results_from_scores(KK, puzzles[:1], [[1.0]], n=2)


def test_table_and_json(puzzles, tmp_path):
    results = results_from_scores(
        KK, puzzles, scored_samples(puzzles, {s: 1.0 if s == 2 else 0.0 for s in range(2, 9)}, 2), n=2, ks=[1, 2]
    )
    markdown = format_table(results)
    lines = markdown.splitlines()
    assert lines[0] == "| subset | problems | Mean@1 | Mean@2 | Pass@1 | Pass@2 |"
    assert lines[2] == "| PPL2 | 2 | 100.0 | 100.0 | 100.0 | 100.0 |"
    assert lines[-1] == "| overall | 14 | 14.3 | 14.3 | 14.3 | 14.3 |"
    plain = format_table(results, "plain").splitlines()
    assert plain[0].split() == ["subset", "problems", "Mean@1", "Mean@2", "Pass@1", "Pass@2"]
    assert plain[-1].split() == ["overall", "14", "14.3", "14.3", "14.3", "14.3"]
    with pytest.raises(ValueError, match="style"):
        format_table(results, "html")
    path = write_json(results, tmp_path / "out" / "eval.json")
    assert json.loads(path.read_text())["subsets"]["PPL2"]["pass@2"] == 1.0
