"""Host synchronisations of one training step, counted in rlad_ds's own code, for one micro-batch per phase and for
many. Run by tests/test_trainer_syncs.py in one process:

    python tests/dist/host_sync_check.py OUT.json TRAIN_FLAGS...

The student's rollouts are given sampler log-probs (as vLLM's carry), so that the rollout correction and the
mismatch metrics run in every micro-batch too.

A synchronisation is a call, from a frame of the rlad_ds package, of a tensor method that waits for the device and
copies to the host (item, tolist, cpu, numpy, float(), int(), bool(), nonzero). On a CPU they cost nothing; on an
accelerator each one stalls the host, so their number must not grow with the number of micro-batches.
"""

import collections
import json
import sys
from pathlib import Path

import torch

from rlad_ds.callbacks import Callback
from rlad_ds.config.parsing import parse_config
from rlad_ds.data import load_train_examples
from rlad_ds.distributed import end_process_group, init_process_group, single_process_env
from rlad_ds.methods import get_method
from rlad_ds.microbatches import microbatch_slices
from rlad_ds.models import load_tokenizer
from rlad_ds.rewards import RewardRunner
from rlad_ds.run_models import build_run_models
from rlad_ds.tasks import get_task
from rlad_ds.trainer import Trainer

SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "nonzero")
counts: collections.Counter = collections.Counter()


def counting(name: str, original):
    def wrapper(self, *args, **kwargs):
        if "/rlad_ds/" in sys._getframe(1).f_code.co_filename:
            counts[name] += 1
        return original(self, *args, **kwargs)

    return wrapper


class LastBatch(Callback):
    def on_batch(self, trainer, batch) -> None:
        self.batch = batch


out, (cfg, _) = Path(sys.argv[1]), parse_config(sys.argv[2:])
single_process_env()
init_process_group(120)
tokenizer, method = load_tokenizer(cfg.model.student), get_method(cfg.loss.method)
teacher = Path(cfg.model.teacher) if cfg.model.teacher else None
models = build_run_models(cfg, method, Path(cfg.model.student), teacher, tokenizer)
sample = models.student_rollout.generate


def with_sampler_logprobs(request, sampling):
    out = sample(request, sampling)
    out.rollout_logprobs = -torch.rand(out.input_ids.shape) * out.response_mask
    return out


models.student_rollout.generate, models.student_rollout.sampler_logprobs = with_sampler_logprobs, True
result = {}
with RewardRunner.from_config(cfg.data) as rewards:
    train = load_train_examples(cfg.data, tokenizer, seed=cfg.train.seed, rewards=rewards)
    trainer = Trainer(cfg, method, models, tokenizer, get_task(cfg.data.task, cfg.data.task_args), rewards, train, [])
    seen = LastBatch()
    trainer.callbacks = [seen]
    trainer.train_step(0)  # warm-up: first-call work (imports, caches) is not the steady state
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}
    for budget in (1 << 20, 24):  # one micro-batch per phase, then many
        cfg.train.micro_batch_tokens = budget
        for scorer in (models.student_scorer, models.teacher_scorer, models.reference_scorer):
            if scorer is not None:
                scorer.max_tokens_per_microbatch = budget
        counts.clear()
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        try:
            trainer.train_step(1)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        pieces = len(microbatch_slices(seen.batch.attention_mask, budget, models.packed))
        result[str(budget)] = {"micro_batches": pieces, "syncs": dict(counts), "total": sum(counts.values())}
out.write_text(json.dumps(result, indent=1))
end_process_group()
