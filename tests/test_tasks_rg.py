"""reasoning-gym as a task source: seeded disjoint splits, its own verifier, its config, difficulty subsets."""

import json
import re

import pytest

from rlad_ds.errors import ConfigError
from rlad_ds.tasks import get_task, parse_task_args
from rlad_ds.tasks.rg import plain


@pytest.mark.parametrize("name", ["knights_knaves", "basic_arithmetic", "gsm_symbolic"])
def test_generated_splits_are_seeded_disjoint_and_verified_by_reasoning_gym(name):
    task = get_task(f"rg:{name}")
    train, test = task.generate("train", 40, 3), task.generate("test", 20, 3)
    assert train == task.generate("train", 40, 3) and train != task.generate("train", 40, 4)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for record in test[:5]:
        json.dumps(record)  # plain JSON: the records go to workers, files and logs
        assert task.score(task.reference(record), record) == 1.0
        assert task.score(f"The answer is {record['answer']}", record) == 0.0  # no <answer> block
        assert task.score("", record) == 0.0
        assert task.prompt(record).startswith(record["question"]) and "<answer>" in task.prompt(record)


def test_task_args_configure_the_dataset_and_name_the_subsets():
    task = get_task("rg:knights_knaves", "n_people=3")
    records = task.generate("test", 6, 0)
    assert all(len(r["metadata"]["names"]) == 3 for r in records)
    assert {task.subset(r) for r in records} == {"n_people=3,depth_constraint=2,width_constraint=2"}
    arithmetic = get_task("rg:basic_arithmetic", '{"min_terms": 2, "max_terms": 3}')
    assert {arithmetic.subset(r).split(",")[0] for r in arithmetic.generate("train", 30, 0)} == {
        "num_terms=2",
        "num_terms=3",
    }  # per-problem values, not the configured ranges
    # reasoning-gym's K&K gives partial credit: 0.3 + 0.7 x the share of people right.
    record = records[0]
    names, solution = record["metadata"]["names"], record["metadata"]["solution"]
    terms = record["metadata"]["knight_knave_terms"]
    flipped = ", ".join(
        f"{n} is {terms['a_knight'] if not s else terms['a_knave']}"
        if i == 0
        else f"{n} is {terms['a_knight'] if s else terms['a_knave']}"
        for i, (n, s) in enumerate(zip(names, solution))
    )
    assert task.score(f"<answer>{flipped}</answer>", record) == pytest.approx(0.3 + 0.7 * 2 / 3)


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("rg:knights_knave", None, "no dataset 'knights_knave'; did you mean knights_knaves"),
        ("rg:knights_knaves", "n_peple=3", "its config fields are: n_people, depth_constraint, width_constraint"),
        ("rg:knights_knaves", "seed=3", "seed and size are set by --seed"),
        ("rg:knights_knaves", "{bad", "not valid JSON"),
        ("rg:knights_knaves", "n_people", "write key=value"),
        ("kk", "n_people=3", "task 'kk' takes no --task_args"),
        # Values of the wrong type raised inside reasoning-gym's generator (TypeError).
        ("rg:knights_knaves", "n_people=2.5", "n_people=2.5: rg:knights_knaves's n_people is int (default 2)"),
        ("rg:knights_knaves", "n_people=true", "n_people=true: rg:knights_knaves's n_people is int"),
        ("rg:basic_arithmetic", 'format_style="fancy"', "format_style is Literal['simple', 'natural']"),
    ],
)
@pytest.mark.timeout(30)  # n_people=true (one person) made reasoning-gym search for a puzzle forever
def test_bad_task_names_and_args_are_one_line_errors(name, args, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        get_task(name, args)
    assert "\n" not in str(error.value)


def test_task_args_syntax_and_plain_json():
    assert parse_task_args("n_people=3, name=x ,flag=true") == {"n_people": 3, "name": "x", "flag": True}
    assert parse_task_args('{"a": [1, 2]}') == {"a": [1, 2]} and parse_task_args(None) == {}
    import numpy as np

    assert plain({"t": (1, np.int64(2)), "s": np.str_("x"), "f": np.float32(0.5)}) == {"t": [1, 2], "s": "x", "f": 0.5}


def test_config_loads_reasoning_gym_prompts_for_training_and_eval(tiny_tokenizer):
    from rlad_ds.config.parsing import config_from_layers
    from rlad_ds.data import load_eval_examples, load_train_examples

    cfg = config_from_layers(
        {
            "data": {"task": "rg:basic_arithmetic", "task_args": "max_terms=3", "train_size": 8},
            "eval": {"eval_size": 4},
            "train": {"seed": 1},
        }
    )
    train, held_out = load_train_examples(cfg.data, tiny_tokenizer, seed=1), load_eval_examples(cfg, tiny_tokenizer)
    assert len(train) == 8 and len(held_out) == 4
    assert train[0]["prompt_text"].startswith("<|im_start|>user\nCalculate")
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}


def test_datasets_that_record_no_answer_train_without_a_gold_check():
    task = get_task("rg:rush_hour")  # checked by simulating the moves; its entries have answer None
    record = task.generate("train", 1, 0)[0]
    assert record["answer"] is None and task.reference is None
    assert task.prompt(record).startswith(record["question"]) and task.score("no block", record) == 0.0


@pytest.mark.timeout(45)
def test_a_config_that_makes_no_problem_in_time_is_refused(monkeypatch):
    """knights_knaves with n_people=50 searches 2^50 assignments for its first problem: it hung silently."""
    from rlad_ds.tasks import rg

    monkeypatch.setattr(rg, "PROBE_TIMEOUT_S", 2.0)  # the worker's start-up is not counted
    with pytest.raises(ConfigError, match=r"rg:knights_knaves made no problem in 2 s with --task_args n_people=50; "):
        get_task("rg:knights_knaves", "n_people=50")


def test_long_generation_shows_its_progress(monkeypatch, caplog):
    """Generating thousands of problems took minutes without a word (10,000 knights_knaves: about 35 s here)."""
    from rlad_ds.tasks import base

    monkeypatch.setattr(base, "FIRST_PROGRESS_S", 0.0)
    with caplog.at_level("INFO", logger="rlad_ds"):
        get_task("rg:basic_arithmetic").generate("train", 3, 0)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "rg:basic_arithmetic train problems generated: 1 / 3"
    ]
