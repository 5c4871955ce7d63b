"""The trained student as a plain transformers model dir (safetensors + tokenizer), gathered from ZeRO-3."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from rlad_ds.callbacks import Callback
from rlad_ds.distributed import world


class ExportHF(Callback):
    """At the end of the run, the trained student as a plain transformers model dir (safetensors + tokenizer)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, history: dict) -> None:
        export_hf(trainer.models.student, trainer.tokenizer, self.out_dir)


def export_hf(engine, tokenizer, out_dir: str | Path) -> Path | None:
    """Write the consolidated student as an HF dir (safetensors + tokenizer); collective, rank 0 writes."""
    out_dir = Path(out_dir)
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # gathers ZeRO-3 partitions onto rank 0
    if world()[0] == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module = engine.module
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out_dir
