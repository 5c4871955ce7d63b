"""A checkpoint written by 2 ranks, loaded on 1 through DeepSpeed's universal checkpoint, gives back exactly the
saved parameters. Run by tests/test_checkpoints.py.

    python tests/dist/universal_load_check.py CHECKPOINT_DIR OUT.json TRAIN_ARGS...   (1 process)

Builds the student engine as the trainer does (from TRAIN_ARGS), loads CHECKPOINT_DIR with
`rlad_ds.protocol.load_checkpoint` and compares the gathered parameters with DeepSpeed's own fp32 reading of
the 2-rank ZeRO-3 files (`get_fp32_state_dict_from_zero_checkpoint`), and with the untrained student (so that the
comparison is not vacuous). Writes what it found to OUT.json.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from rlad_ds.checkpoint import protocol
from rlad_ds.config.parsing import parse_config
from rlad_ds.distributed import init_process_group, single_process_env
from rlad_ds.methods import get_method
from rlad_ds.models import load_tokenizer
from rlad_ds.run_models import build_run_models


def gathered(engine) -> dict:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


directory, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg, _ = parse_config(sys.argv[3:])
single_process_env()
init_process_group(120)
models = build_run_models(cfg, get_method(cfg.loss.method), Path(cfg.model.student), None,
                          load_tokenizer(cfg.model.student))
initial = gathered(models.student)
state = protocol.load_checkpoint(models.student, directory, seed=cfg.train.seed)
loaded = gathered(models.student)
saved = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[name].detach().float() - b[name].detach().float()).abs().max()) for name in a)


out.write_text(json.dumps({"step": state["step"], "names": sorted(loaded) == sorted(saved),
                           "loaded_vs_saved": max_diff(loaded, saved), "initial_vs_saved": max_diff(initial, saved),
                           "global_steps": models.student.global_steps}))
dist.barrier()
dist.destroy_process_group()
