"""launchers/eval.py: the shard/merge helpers, a 1- and a 2-rank run through the real deepspeed launcher, bad input."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_deepspeed

from rlad_ds.evaluation import merge_shards, sample_seed, shard_indices

TESTS = ROOT / "tests"
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}


def coin_task():
    """The arith problems, scored by a coin the random tiny model flips: 1.0 iff the completion's first
    character has an even code. Scores then vary per sample and per problem, so comparing runs means something."""
    from rlad_ds.tasks import get_task
    from rlad_ds.tasks.base import Task

    arith = get_task("arith")
    return Task(
        name="coin",
        prompt=arith.prompt,
        generate=arith.generate,
        subset=arith.subset,
        score=lambda completion, example: float(bool(completion) and ord(completion[0]) % 2 == 0),
    )


# ---- fast: pure helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num", [0, 1, 2, 5, 6, 7, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_partition_the_items_and_merge_back_in_order(num, world):
    shards = [shard_indices(num, rank, world) for rank in range(world)]
    owned = [indices for indices, _ in shards]
    per_rank = {count for _, count in shards}
    assert sorted(i for indices in owned for i in indices) == list(range(num))
    assert per_rank == {max(len(indices) for indices in owned)}  # every rank knows the longest shard
    assert max(map(len, owned)) - min(map(len, owned)) <= 1  # balanced
    parts = [[(i, f"item{i}") for i in indices] for indices in owned][::-1]  # gather order does not matter
    assert merge_shards(parts, num) == [f"item{i}" for i in range(num)]


def test_merge_refuses_missing_or_duplicate_items():
    with pytest.raises(ValueError, match="miss index 1"):
        merge_shards([[(0, "a")], [(2, "c")]], 3)
    with pytest.raises(ValueError, match="twice"):
        merge_shards([[(0, "a"), (1, "b")], [(1, "b")]], 2)
    with pytest.raises(ValueError):
        shard_indices(4, 2, 2)


def test_sampling_seed_depends_on_the_item_not_the_rank():
    assert sample_seed(3, 5) == sample_seed(3, 5) != sample_seed(3, 6) != sample_seed(4, 5)


def test_eval_flags_are_the_training_flags_with_the_same_defaults():
    """launchers/eval.py reads the same config tree: every flag it takes is a training flag too (but for its own
    three), with the same default."""
    from rlad_ds.config.parsing import build_parser, config_from_layers, read_layers

    def flags(parser):
        return {a.dest: a.default for a in parser._actions if a.option_strings}

    train, evaluation = flags(build_parser("train")), flags(build_parser("eval"))
    assert set(evaluation) - set(train) == {"eval_offload"}
    assert {
        "max_new_tokens",
        "rollout",
        "eval_samples",
        "eval_k",
        "eval_temperature",
        "rollout_batch_size",
        "task",
        "reward_workers",
        "seed",
        "precision",
    } <= set(evaluation)
    assert not {"lr", "method", "alpha", "group_size", "temperature", "student"} & set(evaluation)
    cfg = config_from_layers(read_layers(build_parser("eval").parse_args(["--eval_k", "1,2", "--eval_samples", "2"])))
    assert cfg.eval.eval_k == (1, 2) and cfg.rollout.max_new_tokens == config_from_layers({}).rollout.max_new_tokens


# ---- slow: the real launcher ------------------------------------------------------------------------------------


def eval_args(model, out, *extra):
    # --rollout_batch_size 1 seeds every generate call from its problem, so sampled outputs do not depend on the
    # ranks; 5 problems over 2 ranks make uneven shards (3 + 2); persistence threshold 0: tiny models really
    # partition, so that the gathered generation has something to gather.
    return [
        "launchers/eval.py",
        "--model",
        model,
        "--task",
        "test_eval_launcher:coin_task",
        "--eval_size",
        "5",
        "--eval_samples",
        "4",
        "--eval_k",
        "1,2,4",
        "--eval_temperature",
        "0.6",
        "--eval_top_p",
        "0.95",
        "--max_new_tokens",
        "12",
        "--seed",
        "7",
        "--rollout_batch_size",
        "1",
        "--param_persistence_threshold",
        "0",
        "--save_completions",
        "--output",
        out,
        *extra,
    ]


def run_plain(*args):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **ENV},
    )


@pytest.fixture(scope="module")
def one_rank(tiny_models, tmp_path_factory):
    """The reference: plain `python launchers/eval.py` (one process, no launcher), per-layer generation."""
    out = tmp_path_factory.mktemp("eval") / "one.json"
    proc = run_plain(*eval_args(tiny_models["student"], out, "--rollout", "per_layer", "--reward_workers", "1"))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("| overall | 5 |") == 1
    return json.loads(out.read_text())


def check_same_samples(reference, result):
    assert [p["completions"] for p in reference["problems"]] == [p["completions"] for p in result["problems"]]
    assert [p["scores"] for p in reference["problems"]] == [p["scores"] for p in result["problems"]]
    assert reference["subsets"] == result["subsets"] and reference["overall"] == result["overall"]


@pytest.mark.slow
def test_two_ranks_gathered_match_one_rank(tiny_models, tmp_path, one_rank):
    out = tmp_path / "two.json"
    proc = run_deepspeed(eval_args(tiny_models["student"], out, "--reward_workers", "1"), nprocs=2, env=ENV)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert proc.stdout.count("| overall | 5 |") == 1  # the table is printed by rank 0 only

    result = json.loads(out.read_text())
    assert result["n"] == 4 and result["ks"] == [1, 2, 4] and result["task"] == "coin"
    assert result["run"]["world_size"] == 2 and result["run"]["rollout"] == "gathered"
    assert one_rank["run"]["world_size"] == 1 and one_rank["run"]["rollout"] == "per_layer"
    assert (result["score_errors"], result["score_timeouts"]) == (0, 0)
    assert sum(row["problems"] for row in result["subsets"].values()) == result["overall"]["problems"] == 5
    for row in [*result["subsets"].values(), result["overall"]]:
        assert set(row) == {"problems", "mean@1", "mean@2", "mean@4", "pass@1", "pass@2", "pass@4"}
        assert 0 <= row["mean@1"] <= row["pass@2"] <= row["pass@4"] <= 1
        assert row["mean@1"] == row["pass@1"]
    assert [p["index"] for p in result["problems"]] == list(range(5))
    assert all(len(p["scores"]) == 4 and len(p["completions"]) == 4 for p in result["problems"])
    flat = [s for p in result["problems"] for s in p["scores"]]
    assert 0 < sum(flat) < len(flat), "the coin task should give mixed scores"
    # The same samples, scores and metrics with 1 and 2 ranks (and per-layer vs gathered generation).
    check_same_samples(one_rank, result)


def test_missing_model_dir_is_one_line_and_exit_2(tmp_path):
    proc = run_plain("launchers/eval.py", "--model", tmp_path / "nope", "--task", "arith", "--eval_size", "2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"rlad_ds: error: model dir {tmp_path / 'nope'} does not exist; "
        "point the model path at a Hugging Face model dir"
    ]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nosuch"], "unknown task 'nosuch'"),
        (["--task", "arith", "--eval_dataset", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--task", "arith", "--eval_samples", "2", "--eval_k", "4"], "every --eval_k must be in 1..eval_samples=2"),
        (["--task", "arith", "--lr", "1e-5"], "unrecognized arguments: --lr 1e-5"),
    ],
)
def test_bad_input_in_process(tiny_models, capsys, args, message):
    from rlad_ds.cli import eval_main

    assert eval_main(["--model", str(tiny_models["student"]), "--eval_size", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlad_ds: error:") and message in err[0], err


def test_a_run_or_checkpoint_dir_as_the_model_points_at_its_student_hf(tiny_models, tmp_path, capsys):
    """`--model OUTPUT_DIR` (or one of its checkpoints) is what a newcomer tries first after training: the line names
    the run's exported student, or says it is written when the run ends, instead of "save_pretrained"."""
    import shutil

    from rlad_ds.cli import eval_main

    def refusal(model) -> str:
        assert eval_main(["--model", str(model), "--task", "arith", "--eval_size", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rlad_ds: error: model dir "), err
        return err[0]

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    (step / "universal").mkdir(parents=True)  # another number of ranks resumes through this one
    (run / "run_config.json").write_text("{}")
    (step / "COMPLETE").write_text("{}")
    assert (
        f"{run} is a training run's output dir, not a model dir; the run writes its trained student to "
        in (line := refusal(run))
        and f"{run / 'student_hf'} when it ends: finish the run" in line
    )
    assert (
        f"{step} is inside the training run {run.resolve()} (a checkpoint), not a model dir; the run writes its"
        in (line := refusal(step))
        and f"{run.resolve() / 'student_hf'} when it ends" in line
    )
    shutil.copytree(tiny_models["student"], run / "student_hf")
    assert f"its trained student is {run / 'student_hf'}: pass that" in refusal(run)
    assert f"its trained student is {run.resolve() / 'student_hf'}: pass that" in refusal(step / "universal")
    assert f"{tmp_path} has no config.json; save the model with save_pretrained" in refusal(tmp_path)
