"""The formats users bring load with no --columns, and their golds are checked as they load.

Each record below is written in the published shape of its dataset (field names, nesting and types as
released; texts shortened). Loading goes through the same check the trainer uses: every gold answer is
scored against itself in time-limited reward workers.
"""

import json
import time

import pytest

from rlad_ds.data import load_examples
from rlad_ds.errors import ConfigError
from rlad_ds.rewards import RewardRunner
from rlad_ds.tasks import get_task


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write(path, rows):
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".json":  # a JSON array, as DeepScaleR ships
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


_RUNNERS = {}  # one worker per (task, timeout) for the whole module: a worker start costs about a second


@pytest.fixture(scope="module", autouse=True)
def close_runners():
    yield
    for runner in _RUNNERS.values():
        runner.close()


def load(task_name, path, **options):
    task = get_task(task_name)
    timeout = options.pop("timeout_s", 10.0)
    key = (task_name, timeout)
    if key not in _RUNNERS:
        _RUNNERS[key] = RewardRunner(task_name, timeout, workers=1)
    return task, load_examples(task, path, check=_RUNNERS[key].check_records, **options)


GSM8K = {
    "question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
}
MATH = {
    "problem": "What is $1 - \\frac12$?",
    "level": "Level 2",
    "type": "Algebra",
    "solution": "We get $\\boxed{\\frac{1}{2}}$.",
}
MATH_500 = {
    "problem": "Convert $(0,3)$ to polar coordinates.",
    "solution": "We have $r = 3$ ...",
    "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
    "subject": "Precalculus",
    "level": 2,
    "unique_id": "test/precalculus/807.json",
}
AIME_CAPITALISED = {
    "ID": "2024-II-4",
    "Problem": "Let $x,y$ and $z$ be positive reals ...",
    "Solution": "...",
    "Answer": 33,
}
AIME_PADDED = {
    "id": 60,
    "problem": "Every morning Aya goes for a walk ...",
    "solution": "...",
    "answer": "033",
    "url": "https://artofproblemsolving.com/...",
    "year": "2024",
}
NUMINA_COT = {
    "source": "synthetic_math",
    "problem": "Solve for $y$: $2y = 13/3$.",
    "solution": "Dividing, $y = \\boxed{\\frac{13}{6}}$.",
    "messages": [{"content": "Solve for $y$ ...", "role": "user"}, {"content": "...", "role": "assistant"}],
}
NUMINA_15 = {
    "problem": "Find all primes $p$ ...",
    "solution": "...",
    "answer": "proof",
    "problem_type": "Number Theory",
    "question_type": "math-word-problem",
    "problem_is_valid": "Yes",
    "solution_is_valid": "Yes",
    "source": "olympiads",
    "synthetic": False,
}
DEEPSCALER = {
    "problem": "Determine $[(1 \\otimes 2) \\otimes 3] - [1 \\otimes (2 \\otimes 3)]$.",
    "answer": "-\\frac{2}{3}",
    "solution": "...",
}
VERL_GSM8K = {
    "data_source": "openai/gsm8k",
    "ability": "math",
    "prompt": [{"role": "user", "content": "Natalia sold clips ... Let's think step by step."}],
    "reward_model": {"style": "rule", "ground_truth": "72"},
    "extra_info": {"split": "train", "index": 0},
}


@pytest.mark.parametrize(
    "name, rows, suffix, right, wrong",
    [
        ("gsm8k", [GSM8K], ".jsonl", "\\boxed{72}", "\\boxed{71}"),
        ("math", [MATH], ".jsonl", "\\boxed{0.5}", "\\boxed{2}"),
        ("math500", [MATH_500], ".jsonl", "\\boxed{(3, \\frac{\\pi}{2})}", "\\boxed{(3, \\pi)}"),
        ("aime_capitalised", [AIME_CAPITALISED], ".parquet", "\\boxed{33}", "\\boxed{34}"),
        ("aime_padded", [AIME_PADDED], ".jsonl", "\\boxed{33}", "\\boxed{34}"),
        ("numina_cot", [NUMINA_COT], ".jsonl", "\\boxed{\\dfrac{13}{6}}", "\\boxed{13/5}"),
        ("deepscaler", [DEEPSCALER], ".json", "\\boxed{-2/3}", "\\boxed{2/3}"),
        ("verl_gsm8k", [VERL_GSM8K], ".parquet", "so \\boxed{72}", "\\boxed{27}"),
    ],
)
def test_math_formats_load_without_columns(tmp_path, name, rows, suffix, right, wrong):
    task, examples = load("math", write(tmp_path / f"{name}{suffix}", rows))
    record = examples[0].record
    assert task.score(right, record) == 1.0 and task.score(wrong, record) == 0.0
    assert "\\boxed{}" in examples[0].text and len(examples[0].text) > 40


def test_math_subsets_and_capitalised_problem(tmp_path):
    task, examples = load("math", write(tmp_path / "mixed.jsonl", [MATH, AIME_CAPITALISED]))
    assert [task.subset(e.record) for e in examples] == ["Level 2", "all"]
    assert examples[1].text.startswith("Let $x,y$ and $z$")


def test_numina_rows_without_a_checkable_answer_are_skipped_and_named(tmp_path):
    path = write(
        tmp_path / "numina15.jsonl",
        [NUMINA_15, {**NUMINA_15, "answer": "12"}, {**NUMINA_15, "answer": "12", "question_type": "proof"}],
    )
    _, examples = load("math", path, skip_bad_rows=True)
    assert len(examples) == 1 and examples.skipped == 2
    assert "numina15.jsonl:1: the gold answer is 'proof'" in examples.messages[0]
    assert "numina15.jsonl:3: the record is a proof" in examples.messages[1]


def test_a_gold_the_verifier_cannot_read_is_caught_at_load_time(tmp_path):
    path = write(
        tmp_path / "golds.jsonl",
        [{**DEEPSCALER, "answer": "}{"}, DEEPSCALER, {**MATH, "solution": "So she pays \\boxed{\\$18.90}."}],
    )
    with pytest.raises(ConfigError, match=r"golds\.jsonl:1: its gold answer does not verify against itself"):
        load("math", path)
    _, examples = load("math", path, skip_bad_rows=True)
    assert len(examples) == 2 and examples.skipped == 1  # the escaped-dollar gold is fine


def test_a_verifier_that_hangs_or_raises_on_validation_is_stopped_by_the_timeout(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"prompt": f"digits {i}:"} for i in range(4)])
    start = time.monotonic()
    _, examples = load("flaky_task:hang_on_validation", path, skip_bad_rows=True, timeout_s=1.0)
    assert time.monotonic() - start < 20
    assert len(examples) == 1 and examples.skipped == 3  # 0 raises, 1 hangs, 2 returns NaN, 3 is fine
    joined = " | ".join(examples.messages)
    assert "rows.jsonl:1: RuntimeError: verifier bug" in joined and "rows.jsonl:2: no score within 1.0s" in joined
    assert "rows.jsonl:3:" in joined and "outside [0, 1]" in joined


KK_PUBLISHED = {
    "quiz": "A very special island is inhabited only by knights and knaves. ... You meet 2 inhabitants: "
    "Zoey, and Oliver. Zoey said that Oliver is a knight. Oliver told you that Zoey is a knave.",
    "names": ["Zoey", "Oliver"],
    "knight_knave": {
        "Knave": "Knave",
        "Knight": "Knight",
        "a_knave": "a knave",
        "a_knight": "a knight",
        "knave": "knave",
        "knight": "knight",
    },
    "solution": [False, True],
    "solution_text": "Zoey is a knave, and Oliver is a knight.",
    "solution_text_format": "(1) Zoey is a knave\n(2) Oliver is a knight",
    "cot_head": "Let's think step by step.",
    "cot_repeat_steps": ["Assume Zoey is a knight. ..."],
    "cot_foot": "This leads to a feasible solution.",
    "statements": "(('telling-truth', 1), ('lying', 0))",
    "index": 100,
}
LOGIC_RL = {
    **KK_PUBLISHED,
    "data_source": "kk_logic",
    "ability": "logic",
    "prompt": [
        {
            "content": "<|im_start|>system\nYou are a helpful assistant. ...<|im_end|>\n<|im_start|>user\n"
            "A very special island ...<|im_end|>\n<|im_start|>assistant\n<think>",
            "role": "user",
        }
    ],
    "reward_model": {
        "ground_truth": {
            "solution_text_format": KK_PUBLISHED["solution_text_format"],
            "statements": KK_PUBLISHED["statements"],
        },
        "style": "rule",
    },
    "extra_info": {"index": 0, "split": "train"},
}
RG_KK = {
    "question": "A very special island is inhabited only by sages and fools. Sages always tell the truth, and "
    "fools always lie. You meet 2 inhabitants: Zoey, and Riley. ... (Format your answer like: "
    '"Zoey is a sage/fool, and Riley is a sage/fool")',
    "answer": "Zoey is a fool, and Riley is a sage.",
    "metadata": {
        "source_dataset": "knights_knaves",
        "source_index": 0,
        "statements": [["lying", 1], ["or", ["telling-truth", 0], ["telling-truth", 1]]],
        "solution": [False, True],
        "names": ["Zoey", "Riley"],
        "knight_knave_terms": {
            "knight": "sage",
            "knave": "fool",
            "a_knight": "a sage",
            "a_knave": "a fool",
            "Knight": "Sage",
            "Knave": "Fool",
        },
        "difficulty": {"n_people": 2, "depth_constraint": 2, "width_constraint": 2},
    },
}


@pytest.mark.parametrize("rows, suffix", [([KK_PUBLISHED], ".jsonl"), ([LOGIC_RL], ".parquet")])
def test_published_kk_and_logic_rl_load_as_is(tmp_path, rows, suffix):
    task, examples = load("kk", write(tmp_path / f"kk{suffix}", rows))
    record = examples[0].record
    assert examples[0].text.startswith("A very special island") and "(2) Oliver is a knight/knave" in examples[0].text
    assert task.score("<answer>(1) Zoey is a knave\n(2) Oliver is a knight</answer>", record) == 1.0
    assert task.score("<answer>(1) Zoey is a knight\n(2) Oliver is a knight</answer>", record) == 0.0


def test_reasoning_gym_kk_export_is_asked_and_graded_in_its_own_role_words(tmp_path):
    path = write(tmp_path / "rg_kk.jsonl", [RG_KK])
    task, examples = load("kk", path)
    assert "(1) Zoey is a sage/fool" in examples[0].text and "either 'a sage' or 'a fool'" in examples[0].text
    assert task.score("<answer>(1) Zoey is a fool\n(2) Riley is a sage</answer>", RG_KK) == 1.0
    assert task.score("<answer>(1) Zoey is a knave\n(2) Riley is a knight</answer>", RG_KK) == 0.0
    assert task.subset(RG_KK) == "PPL2"
    # The same file through reasoning-gym's own verifier, and through dotted --columns.
    rg_task, rg_examples = load("rg:knights_knaves", path)
    assert rg_task.score("<answer>Zoey is a fool, and Riley is a sage.</answer>", rg_examples[0].record) == 1.0
    _, mapped = load("kk", path, columns="quiz=question,names=metadata.names,solution=metadata.solution")
    assert mapped[0].record["names"] == ["Zoey", "Riley"]
    with pytest.raises(ConfigError, match="rg_kk.jsonl:1: missing column 'metadata.nmes'"):
        load("kk", path, columns="names=metadata.nmes")
