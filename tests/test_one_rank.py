"""Every method end to end on one rank (plain `python launchers/train.py`, no launcher) with a plain transformers
export, the temperature convention, the same greedy accuracy from training-time evaluation and
launchers/eval.py, and the built-in demo of every method to its summary. The runs of a test go two at a
time (two cores)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_train import check_method_metrics, read_metrics, train_args

METHODS = ("rlad", "grpo", "kdrl", "kd", "sft")


def run_all(commands: dict, env: dict | None = None, parallel: int = 2, timeout: float = 300) -> dict:
    """Run {name: argv} as `python argv...` from the repo root, `parallel` at a time; {name: CompletedProcess}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {})}
    pending, running, done = list(commands.items()), {}, {}
    deadline = time.time() + timeout
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            running[name] = subprocess.Popen(
                [sys.executable, *map(str, argv)],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, proc.communicate()[0], "")
                del running[name]
        if time.time() > deadline:
            for proc in running.values():
                proc.kill()
            pytest.fail(f"runs still going after {timeout} s: {sorted(running)}")
        time.sleep(0.1)
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-5000:]}"
    return done


@pytest.mark.slow
def test_every_method_one_rank_and_the_same_accuracy_in_training_and_eval(tiny_models, tmp_path):
    commands = {m: train_args(tiny_models, tmp_path / m, "--max_steps", "2", method=m) for m in METHODS if m != "rlad"}
    # rlad with the student as its own teacher at temperature 0.7: every log-prob is tempered alike, so before the
    # first update the teacher's log-ratio is 0 (an untempered teacher would give the tempered student another).
    commands["rlad"] = train_args(
        tiny_models, tmp_path / "rlad", "--max_steps", "2", "--temperature", "0.7", teacher=tiny_models["student"]
    )
    commands["eval"] = [
        "launchers/eval.py",
        "--model",
        tiny_models["student"],
        "--task",
        "toy_task:task",
        "--eval_size",
        "4",
        "--max_new_tokens",
        "12",
        "--output",
        tmp_path / "eval.json",
    ]
    done = run_all(commands)
    for method in METHODS:
        # Every run ends with one line: what it reached and where its model and metrics are.
        last = done[method].stdout.strip().splitlines()[-1]
        assert last.startswith(f"rlad_ds: done: step 2 of 2, --method {method}; held-out accuracy "), last
        assert last.endswith(f"model {tmp_path / method / 'student_hf'}, metrics {tmp_path / method / 'metrics.jsonl'}")
        records = read_metrics(tmp_path / method)
        steps = [r for r in records if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2], method
        for r in steps:
            check_method_metrics(method, r)
        assert (tmp_path / method / "student_hf" / "model.safetensors").is_file()
    first, second = read_metrics(tmp_path / "rlad")[1:]
    assert abs(first["teacher_log_ratio_mean"]) < 1e-6 and first["kl_teacher"] < 1e-9, first
    assert abs(second["teacher_log_ratio_mean"]) > 1e-5  # after an update the student has moved away
    check_plain_transformers_export(tmp_path / "grpo" / "student_hf", tiny_models["student"])
    # Step 0 evaluates the initial student: the same number as launchers/eval.py on the same model and prompts.
    launcher = json.loads((tmp_path / "eval.json").read_text())["overall"]["mean@1"]
    before = {m: read_metrics(tmp_path / m)[0]["eval_accuracy"] for m in METHODS}
    assert set(before.values()) == {launcher} and 0 < launcher < 1, (before, launcher)


def check_plain_transformers_export(export, initial):
    """The export loads and generates with plain transformers, in a process that never imports rlad_ds, and
    holds the trained weights, not the initial student's."""
    from safetensors.torch import load_file

    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "ids = t('12+34=', return_tensors='pt').input_ids; "
        "out = m.generate(ids, max_new_tokens=5, do_sample=False); assert out.shape[1] == ids.shape[1] + 5 or "
        "out[0, -1] == t.eos_token_id; print('rlad_ds' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(export)], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-3000:]
    trained, untrained = load_file(export / "model.safetensors"), load_file(Path(initial) / "model.safetensors")
    assert trained.keys() == untrained.keys()
    assert any(not (trained[k] == untrained[k]).all() for k in trained)
    # The config is the student's own: training's settings (no KV cache) do not leak into what users load.
    exported_config, initial_config = (json.loads((Path(d) / "config.json").read_text()) for d in (export, initial))
    assert exported_config["use_cache"] == initial_config.get("use_cache", True)


@pytest.mark.slow
def test_the_demo_of_a_method_with_and_without_a_teacher_runs_to_its_summary(tmp_path):
    """The demo command with the models shipped with the package (no build), 2 steps of rlad and of grpo (no
    teacher), at once: each method's demo has its own output dir. Every method runs on one rank above."""
    commands = {
        m: [
            "launchers/train.py",
            "--deepspeed",
            "ds_configs/zero3.json",
            "--method",
            m,
            "--max_steps",
            "2",
            "--eval_size",
            "8",
            "--output_dir",
            tmp_path / m,
            "--cache_dir",
            tmp_path / "cache",  # stays empty: the demo builds nothing
        ]
        for m in ("rlad", "grpo")
    }
    done = run_all(commands)
    assert not (tmp_path / "cache").exists()
    for method, proc in done.items():
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        assert summary["method"] == method and summary["steps"] == 2 and summary["eval_prompts"] == 8
        assert summary["student_before"] is not None and summary["student_after"] is not None
        assert (summary["teacher"] is None) == (method == "grpo"), summary  # GRPO loads no teacher
        assert "| student after |" in proc.stdout and (tmp_path / method / "curves.png").is_file()
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith(f"rlad_ds: done: step 2 of 2, --method {method}; held-out accuracy "), last
        if method == "grpo":
            assert "| teacher | not loaded (--method grpo uses none) |" in proc.stdout
