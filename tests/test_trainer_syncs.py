"""A training step's host synchronisations do not grow with its number of micro-batches (tests/dist/host_sync_check.py
counts them in one process). kdrl with two PPO epochs and packed micro-batches runs every phase that has
micro-batches: teacher scoring, old-policy scoring, and the update with a ratio and a teacher term, reweighted
by the rollout correction (icepop) of rollouts that carry sampler log-probs."""

import json
import subprocess
import sys

from conftest import ROOT, one_rank_env
from test_train import TINY_RUN


def test_host_syncs_per_step_do_not_grow_with_micro_batches(tiny_models, tmp_path):
    out = tmp_path / "syncs.json"
    flags = [
        "--student",
        tiny_models["student"],
        "--teacher",
        tiny_models["teacher"],
        "--method",
        "kdrl",
        "--deepspeed",
        "ds_configs/zero3.json",
        "--output_dir",
        tmp_path / "run",
        *TINY_RUN,
        "--ppo_epochs",
        "2",
        "--pack_sequences",
        "on",
        "--rollout_correction",
        "icepop",
    ]
    env = one_rank_env()
    proc = subprocess.run(
        [sys.executable, "tests/dist/host_sync_check.py", out, *map(str, flags)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, many = json.loads(out.read_text()).values()
    assert one["micro_batches"] == 1 and many["micro_batches"] >= 4, (one, many)
    assert many["total"] <= one["total"], (one, many)
