"""rlad, grpo and kdrl trained for a few steps, one after the other in one process group, each with its own models;
every step's metrics and the final student weights are written out. Run by tests/test_sequence_parallel.py twice,
on 2 ranks with --sequence_parallel_size 2 and on 1 rank without, whose outputs must agree.

    deepspeed ... tests/dist/sequence_parallel_check.py OUT_DIR STUDENT TEACHER SEQUENCE_PARALLEL_SIZE [FLAGS...]

Each case also covers one of the update's normalisers or passes: rlad two PPO epochs (old-policy scoring) with
adaptive alpha (its KL reduced over the group), grpo token-mean, kdrl a reference model (--beta_ref).
"""

import json
import random
import sys
from pathlib import Path

import torch
from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

from rlad_ds import sequence_parallel
from rlad_ds.callbacks import Callback
from rlad_ds.checkpoint.export import ExportHF
from rlad_ds.config.parsing import parse_config
from rlad_ds.data import load_train_examples
from rlad_ds.distributed import end_process_group, init_process_group, world
from rlad_ds.methods import get_method
from rlad_ds.models import load_tokenizer
from rlad_ds.rewards import RewardRunner
from rlad_ds.run_models import build_run_models
from rlad_ds.tasks import get_task
from rlad_ds.trainer import Trainer

CASES = {
    "rlad": ["--ppo_epochs", "2", "--adaptive_alpha"],
    "grpo": ["--loss_agg", "token-mean"],
    "kdrl": ["--beta_ref", "0.1"],
}
RUN = [
    "--task", "toy_task:task", "--max_new_tokens", "25", "--group_size", "4", "--prompts_per_step", "2",
    "--micro_batch_tokens", "96", "--report_to", "none", "--lr", "1e-3", "--param_persistence_threshold", "0",
    "--max_steps", "2", "--save_steps", "-1", "--eval_size", "0", "--precision", "fp32",
]  # fmt: skip


# What ran sharded: TiledMLP calls, and the head shapes Ulysses wrappers were made for (student and teacher differ).
tiled = {"calls": 0}
_apply = TiledMLP.apply


def _counted(*args):
    tiled["calls"] += 1
    return _apply(*args)


TiledMLP.apply = staticmethod(_counted)


class Record(Callback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, step, metrics):
        self.steps.append({k: v for k, v in metrics.items() if not k.startswith("time/") and k != "tokens_per_s"})


args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out, student, teacher, size, extra = Path(args[0]), args[1], args[2], args[3], args[4:]
init_process_group(600)
for name, flags in CASES.items():
    method = get_method(name)
    argv = ["--student", student, "--method", name, "--output_dir", str(out / name), *RUN, *flags, *extra]
    argv += ["--teacher", teacher] if method.needs_teacher else []
    cfg, _ = parse_config([*argv, "--sequence_parallel_size", size])
    tokenizer = load_tokenizer(student)
    data_rank = world()[0] // cfg.train.sequence_parallel_size
    random.seed(cfg.train.seed + data_rank)  # as launchers/train.py seeds
    torch.manual_seed(cfg.train.seed + data_rank)
    models = build_run_models(cfg, method, Path(student), Path(teacher) if method.needs_teacher else None, tokenizer)
    record = Record()
    with RewardRunner.from_config(cfg.data) as rewards:
        train = load_train_examples(cfg.data, tokenizer, seed=cfg.train.seed, rewards=rewards)
        task = get_task(cfg.data.task, cfg.data.task_args)
        trainer = Trainer(cfg, method, models, tokenizer, task, rewards, train, [])
        trainer.fit([record, ExportHF(out / name / "student_hf")])
    offload = models.long_context.offload_stats
    result = {
        "steps": record.steps,
        "tiled_mlp_calls": tiled["calls"],
        "ulysses_head_shapes": sorted(list(shape[1:4]) for shape in sequence_parallel._ULYSSES),
        "offload_marked": offload.marked_tensors if offload is not None else 0,
    }
    if world()[0] == 0:
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
end_process_group()
