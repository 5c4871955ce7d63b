"""A write or a load that fails on one rank only stops every rank together. Run by tests/test_checkpoints.py.

    deepspeed --hostfile H tests/dist/checkpoint_failure_check.py OUT_DIR     (2 ranks)

A tiny fp32 model under the trainer's ZeRO-3 config, with a persistence threshold that keeps its small
parameters persistent, so that DeepSpeed's save and load end with a collective (the all-gather of the persistent
parameters) that a failed rank must still join. Rank 1's writes fail with ENOSPC in the model file (step 2),
then in the optimizer file (step 3); step 4 saves; then rank 1's load fails. Each rank writes OUT_DIR/rank{r}.json.
"""

import errno
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from rlad_ds.checkpoint import manifest, protocol
from rlad_ds.ds_config import CONFIG_DIR, fill_train_config
from rlad_ds.errors import ConfigError, TrainingError

out = Path(sys.argv[-1])  # the launcher puts --local_rank=R first
deepspeed.init_distributed()
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 1))
config = fill_train_config(CONFIG_DIR / "zero3.json", world_size=2, micro_batch_size=1, gradient_accumulation_steps=1,
                           lr=1e-2, gradient_clipping=1.0, device="cpu", persistence_threshold=100)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
engine.backward(engine(torch.randn(4, 8)).sum())
engine.step()
state = {"step": 1, "world_size": 2, "controls": {}, "bad_steps": 0}
result = {"persistent": len(engine.optimizer.persistent_parameters), "saves": {}}
protocol.save_checkpoint(engine, out, 1, state, keep_last=5)
real_save = engine.checkpoint_engine.save
for step, fail_at in ((2, 0), (3, 1), (4, None)):
    calls = []

    def save(state_dict, path, calls=calls, fail_at=fail_at):
        calls.append(path)
        if rank == 1 and len(calls) - 1 == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(state_dict, path)

    engine.checkpoint_engine.save = save
    try:
        protocol.save_checkpoint(engine, out, step, {**state, "step": step}, keep_last=5)
        result["saves"][step] = "ok"
    except TrainingError as error:
        result["saves"][step] = str(error)
real_load = engine._load_checkpoint


def load(*args, **kwargs):
    if rank == 1:
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    return real_load(*args, **kwargs)


engine._load_checkpoint = load
try:
    protocol.load_checkpoint(engine, out / "checkpoints" / "step_00000004")
    result["load"] = "ok"
except ConfigError as error:
    result["load"] = str(error)
result["complete"] = [p.name for p in manifest.complete_checkpoints(out)]
result["dirs"] = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
