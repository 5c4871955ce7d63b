"""Pass@k / Mean@k against brute force, and `evaluate` on fake engines with known accuracy."""

import itertools
import json
import random
from math import comb

import pytest

from rlad_ds.data import Example
from rlad_ds.evaluation import evaluate, format_table, mean_at_k, pass_at_k, problem_metrics, write_json
from rlad_ds.rewards import RewardRunner
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
        "mean@1": 0.375, "mean@2": 0.375, "pass@1": 0.25, "pass@2": 0.5}  # 0.5 is not "correct"


def right(record):
    return f"<answer>{solution_text(record['names'], record['solution'])}</answer>"


def wrong(record):
    return f"<answer>{solution_text(record['names'], [not s for s in record['solution']])}</answer>"


@pytest.fixture(scope="module")
def puzzles():
    return KK.generate("test", 14, seed=5)  # two per size PPL2..PPL8


def fake_engine(records, accuracy_by_size, seed=0):
    """generate_fn whose completions are right with a known probability per puzzle size."""
    by_prompt = {KK.prompt(r): r for r in records}
    rng = random.Random(seed)
    calls = []

    def generate_fn(prompts, n):
        calls.append(len(prompts))
        out = []
        for prompt in prompts:
            record = by_prompt[prompt]
            p = accuracy_by_size[len(record["names"])]
            out.append([right(record) if rng.random() < p else wrong(record) for _ in range(n)])
        return out

    generate_fn.calls = calls
    return generate_fn


def test_evaluate_per_subset_with_exact_accuracies(puzzles):
    accuracy = {size: (1.0 if size <= 4 else 0.0) for size in range(2, 9)}
    results = evaluate(KK, puzzles, fake_engine(puzzles, accuracy), n=4, ks=[1, 4])
    assert list(results["subsets"]) == [f"PPL{s}" for s in range(2, 9)]
    for size in range(2, 9):
        row = results["subsets"][f"PPL{size}"]
        assert row == {"problems": 2, "mean@1": accuracy[size], "mean@4": accuracy[size],
                       "pass@1": accuracy[size], "pass@4": accuracy[size]}
    assert results["overall"]["problems"] == 14 and results["overall"]["mean@1"] == pytest.approx(3 / 7)
    assert results["score_errors"] == results["score_timeouts"] == 0
    assert len(results["problems"]) == 14 and results["problems"][0]["scores"] == [1.0] * 4


def test_evaluate_converges_to_the_engine_accuracy(puzzles):
    # With accuracy p per sample, Mean@k -> p and Pass@k -> 1 - (1 - p)^k.
    p, n = 0.3, 400
    results = evaluate(KK, puzzles, fake_engine(puzzles, {s: p for s in range(2, 9)}, seed=1), n=n, ks=[1, 4])
    assert results["overall"]["mean@1"] == pytest.approx(p, abs=0.03)
    assert results["overall"]["pass@4"] == pytest.approx(1 - (1 - p) ** 4, abs=0.04)


def test_evaluate_batches_prompts_and_accepts_rendered_examples(puzzles):
    engine = fake_engine(puzzles, {s: 1.0 for s in range(2, 9)})
    examples = [Example(KK.prompt(r), r) for r in puzzles[:5]]
    results = evaluate(KK, examples, engine, n=2, ks=[2], batch_size=2)
    assert engine.calls == [2, 2, 1]
    assert results["overall"]["pass@2"] == 1.0


def test_evaluate_with_a_reward_runner(puzzles):
    with RewardRunner("kk", timeout_s=10, workers=1) as runner:
        results = evaluate(KK, puzzles[:3], fake_engine(puzzles, {s: 1.0 for s in range(2, 9)}), n=2, runner=runner)
    assert results["overall"]["mean@1"] == 1.0 and results["score_errors"] == 0


def test_evaluate_rejects_bad_input(puzzles):
    engine = fake_engine(puzzles, {s: 1.0 for s in range(2, 9)})
    with pytest.raises(ValueError, match="every k must be in 1..n=2"):
        evaluate(KK, puzzles, engine, n=2, ks=[4])
    with pytest.raises(ValueError, match="no examples"):
        evaluate(KK, [], engine, n=2)
    with pytest.raises(ValueError, match="must return 2 completions for each of 1 prompts"):
        evaluate(KK, puzzles[:1], lambda prompts, n: [["only one"]], n=2)


def test_table_and_json(puzzles, tmp_path):
    results = evaluate(KK, puzzles, fake_engine(puzzles, {s: 1.0 if s == 2 else 0.0 for s in range(2, 9)}),
                       n=2, ks=[1, 2])
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
