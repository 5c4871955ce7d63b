"""DeepSpeed's ZeRO-3 optimizer skips a step whose gradients are not finite. Run by tests/test_reliability.py.

    python tests/dist/nan_step_check.py OUT.json     (1 process; RANK/WORLD_SIZE/MASTER_* set by the test)

A tiny fp32 model under the trainer's own ZeRO-3 config (persistence threshold 0, so parameters really are
partitioned): a NaN loss is backpropagated and stepped, then a finite one. Writes what it saw to OUT.json.
"""

import json
import math
import sys

import torch
import deepspeed
import torch.distributed as dist

from rlad_ds.ds_config import CONFIG_DIR, fill_train_config
from rlad_ds.distributed import init_process_group


def full_params(engine):
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return [p.detach().clone() for p in engine.module.parameters()]


init_process_group(1800)  # (not deepspeed.init_distributed: this removes the /dev/shm buffer at exit)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
config = fill_train_config(CONFIG_DIR / "zero3.json", world_size=1, micro_batch_size=1, gradient_accumulation_steps=1,
                           lr=1e-2, gradient_clipping=1.0, device="cpu", persistence_threshold=0)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
x = torch.randn(4, 8)
result = {}

before = full_params(engine)
loss = engine(x).sum() * float("nan")
engine.backward(loss)
engine.step()
after = full_params(engine)
norm = engine.get_global_grad_norm()
result["nan_step"] = {"loss_finite": math.isfinite(loss.item()), "grad_norm": None if norm is None else float(norm),
                      "params_unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}

loss = engine(x).sum()
engine.backward(loss)
engine.step()
changed = full_params(engine)
result["finite_step"] = {"grad_norm": float(engine.get_global_grad_norm()),
                         "params_unchanged": all(torch.equal(a, b) for a, b in zip(after, changed)),
                         "params_finite": all(bool(torch.isfinite(p).all()) for p in changed)}
with open(sys.argv[1], "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
