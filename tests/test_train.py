"""End-to-end runs of launchers/train.py through the real deepspeed launcher (tiny models made here)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_deepspeed

# Persistence threshold 0: the tiny models really partition over the ranks.
TINY_RUN = [
    "--task",
    "toy_task:task",
    "--max_new_tokens",
    "12",
    "--group_size",
    "4",
    "--prompts_per_step",
    "4",
    "--eval_size",
    "4",
    "--micro_batch_tokens",
    "256",
    "--report_to",
    "none",
    "--lr",
    "1e-3",
    "--param_persistence_threshold",
    "0",
]


def train_args(models, out, *extra, method="rlad", teacher=None):
    """launchers/train.py on the tiny models; methods without a teacher get no --teacher (they refuse one)."""
    from rlad_ds.methods import get_method

    teacher = ["--teacher", teacher or models["teacher"]] if get_method(method).needs_teacher else []
    return [
        "launchers/train.py",
        "--deepspeed",
        "ds_configs/zero3.json",
        "--student",
        models["student"],
        *teacher,
        "--method",
        method,
        "--output_dir",
        out,
        *TINY_RUN,
        *extra,
    ]


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def check_ok(proc):
    assert proc.returncode == 0, proc.stdout[-6000:]


DAPO_FILTERS = [
    "--task",
    "toy_task:binary_task",
    "--dynamic_sampling",
    "--mask_truncated",
    "--soft_overlong_tokens",
    "4",
]

# rlad, grpo and kdrl (the methods with group advantages) run DAPO's filters on a 0/1 task whose groups are often all
# equal (the ranks agree on every extra sampling round: a disagreement would hang a collective); rlad also covers PPO
# epochs > 1 (an old-policy pass) and adaptive alpha; kdrl padding-free packed micro-batches; kd two PPO epochs
# without an old-policy pass (no ratio), on a reasoning-gym export loaded with --dataset (its golds checked in the
# reward workers of both ranks as it loads); sft prompts from reasoning-gym's generator with --task_args. bf16 runs
# in the two-node test below.
RG_EXPORT = "{reasoning-gym export}"
TWO_RANK_CASES = {
    "rlad": ["--ppo_epochs", "2", "--adaptive_alpha", *DAPO_FILTERS],
    "grpo": DAPO_FILTERS,
    "kdrl": ["--pack_sequences", "on", *DAPO_FILTERS],
    "kd": [
        "--ppo_epochs",
        "2",
        "--task",
        "rg:basic_arithmetic",
        "--dataset",
        RG_EXPORT,
        "--eval_dataset",
        RG_EXPORT,
        "--reward_workers",
        "1",
    ],
    "sft": ["--task", "rg:basic_arithmetic", "--task_args", "max_terms=3,max_digits=2", "--reward_workers", "1"],
}


def write_rg_export(path: Path) -> Path:
    """reasoning-gym entries written as its users export them: json.dumps of each entry, one per line."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=24, seed=5, max_terms=3, max_digits=2)
    path.write_text("".join(json.dumps(entry, default=str) + "\n" for entry in dataset))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TWO_RANK_CASES))
def test_each_method_two_ranks(tiny_models, tmp_path, case):
    method = case
    out = tmp_path / case
    extra = [str(write_rg_export(tmp_path / "rg.jsonl")) if arg == RG_EXPORT else arg for arg in TWO_RANK_CASES[case]]
    proc = run_deepspeed(train_args(tiny_models, out, "--max_steps", "2", *extra, method=method), nprocs=2)
    check_ok(proc)
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    filtered = "--dynamic_sampling" in extra
    for r in steps:
        check_method_metrics(method, r, filtered)
    if filtered:
        check_filtered_run(records)
    if case == "rlad":  # step 2 trains with the alpha adapted from step 1's KL to the teacher
        from rlad_ds.methods import adapt_alpha

        assert "time/old_logprobs" in steps[0]
        assert steps[0]["alpha"] == 0.5 and steps[0]["kl_teacher"] > 0
        assert steps[1]["alpha"] == pytest.approx(adapt_alpha(0.5, steps[0]["kl_teacher"], 0.1, 0.9))
        assert steps[1]["alpha"] != 0.5
    assert records[0]["step"] == 0 and records[-1].get("eval_accuracy") is not None
    if case == "kd":  # reasoning-gym's per-problem difficulty knobs are the evaluation subsets
        assert any(key.startswith("eval_accuracy/num_terms=2,num_digits=") for key in records[0]), records[0]
    check_export(out / "student_hf", "torch.float32")


def check_export(export: Path, dtype: str) -> None:
    from safetensors import safe_open

    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == dtype


def check_filtered_run(records: list[dict]) -> None:
    """A run with DAPO's filters: finite, every group in the loss carries a signal, the rounds it drew logged."""
    import math

    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("loss", "grad_norm", "reward_mean", "entropy", "sampling_rounds", "discarded_group_frac"):
            assert math.isfinite(r[key]), (key, r)
        assert r["zero_std_frac"] == 0 and 1 <= r["sampling_rounds"] <= 4 and 0 <= r["discarded_group_frac"] < 1


def check_method_metrics(method: str, r: dict, filtered: bool = False) -> None:
    """What every step logs, and what each method object implies about its metrics (`filtered`: with DAPO's
    filters, which drop rows from the loss)."""
    import math

    for key in (
        "loss",
        "reward_mean",
        "reward_std",
        "accuracy",
        "response_len",
        "grad_norm",
        "lr",
        "entropy",
        "time/rollout",
        "time/reward",
        "tokens_per_s",
    ):
        assert key in r and math.isfinite(r[key]), (key, r)
    assert ("clip_frac_low" in r) == (method in ("rlad", "grpo", "kdrl"))
    assert ("time/teacher" in r) == (method in ("rlad", "kdrl", "kd"))  # sft's teacher generates, never scores
    assert ("alpha" in r) == (method == "rlad") and ("zero_std_frac" in r) == (method in ("rlad", "grpo", "kdrl"))
    assert "time/old_logprobs" not in r or method == "rlad"
    if method == "grpo" and not filtered:  # one epoch: ratio 1, and group-normalised advantages average to zero
        assert r["loss"] == pytest.approx(r["policy_loss"]) and abs(r["loss"]) < 1e-5
    if method == "kdrl":  # the batch loss is its parts, summed over micro-batches and ranks
        assert r["loss"] == pytest.approx(r["policy_loss"] + 0.1 * r["kd_loss"], rel=1e-4, abs=1e-7)
    if method == "kd":  # no reward in the loss: only the KL to the teacher
        assert "policy_loss" not in r and r["loss"] == pytest.approx(0.1 * r["kd_loss"], rel=1e-4, abs=1e-7)


def _launch(args, nprocs, log):
    hostfile = log.with_suffix(".hosts")
    hostfile.write_text(f"localhost slots={nprocs}\n")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--no_ssh_check",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tiny_models, tmp_path):
    common = ["--max_steps", "4", "--save_steps", "1", "--keep_last", "2", "--eval_size", "0"]
    check_ok(run_deepspeed(train_args(tiny_models, tmp_path / "straight", *common), nprocs=2))
    reference = {r["step"]: r for r in read_metrics(tmp_path / "straight")}

    out = tmp_path / "killed"
    proc = _launch(train_args(tiny_models, out, *common), 2, tmp_path / "killed.log")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, at an arbitrary point after step 2
    proc.wait()
    resumed = run_deepspeed(train_args(tiny_models, out, *common, "--resume", "auto"), nprocs=2)
    check_ok(resumed)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("loss", "reward_mean", "response_len", "grad_norm"):
            assert r[key] == pytest.approx(reference[r["step"]][key], rel=1e-5, abs=1e-7), (r["step"], key)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000003", "step_00000004"]


@pytest.mark.slow
def test_two_emulated_nodes_from_a_hostfile(tiny_models, tmp_path):
    """Two launchers, one per "node" of a hostfile, as on a cluster (here both on localhost, gloo, no ssh), in the
    precision GPU users get: bf16 student and teacher, fp32 log-probs and loss, on DeepSpeed's CPU accelerator."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port, out = free_port(), tmp_path / "multinode"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                *map(str, train_args(tiny_models, out, "--max_steps", "2", "--eval_size", "0", "--precision", "bf16")),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        check_method_metrics("rlad", r)
    check_export(out / "student_hf", "torch.bfloat16")
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
