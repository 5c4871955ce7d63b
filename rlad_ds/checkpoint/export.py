"""The trained student as a plain transformers model dir (safetensors + tokenizer): at the end of a run, gathered
from ZeRO-3, or later from a checkpoint (`launchers/export.py`, DeepSpeed's own consolidation of the ZeRO-3 files).

The dir is written as OUT.tmp and renamed to OUT when whole; a write that fails (a full disk) removes OUT.tmp, keeps
an older OUT as it was, and ends in one line that says how to export again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rlad_ds.callbacks import Callback
from rlad_ds.checkpoint.collective import gather, raise_first
from rlad_ds.distributed import world
from rlad_ds.errors import TrainingError, reason_line


class ExportHF(Callback):
    """At the end of the run, the trained student as a plain transformers model dir (safetensors + tokenizer)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, history: dict) -> None:
        saved = trainer.cfg.train.save_steps >= 0  # the run's last step has a checkpoint to export from later
        export_hf(trainer.models.student, trainer.tokenizer, self.out_dir, trainer.step if saved else None)


def write_hf_dir(
    module, state_dict: dict | None, tokenizer, out_dir: Path, step: int | None, export_command: bool = False
) -> str | None:
    """`module` (with `state_dict`) and the tokenizer as OUT_DIR, whole or not at all; the one-line error, or None.
    `step`: the checkpoint that holds what a failed export of a run's end could not write."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return None
    except Exception as error:  # safetensors raises its own error type for a full disk, transformers OSError
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir.parent).free / 2**30
        checkpoint = (
            f"checkpoint step_{step:08d} holds the trained student: free space, then run the same command with "
            f"launchers/export.py to export it"
            if step is not None
            else "free space and export again"
            if export_command
            else "no checkpoint holds the trained student (--save_steps -1)"
        )
        return (
            f"cannot write the exported student to {out_dir} ({_reason(error)}; {free:.1f} GiB free there): "
            f"nothing of it is kept; {checkpoint}"
        )


def _reason(error: BaseException) -> str:
    text = reason_line(error)
    return "No space left on device" if "StorageFull" in text or "No space left" in text else text


def export_hf(engine, tokenizer, out_dir: str | Path, step: int | None = None) -> Path:
    """Write the consolidated student as an HF dir (safetensors + tokenizer); collective, rank 0 writes. `step`: the
    run's last step, whose checkpoint a failed export names."""
    out_dir = Path(out_dir)
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # gathers ZeRO-3 partitions onto rank 0
    error = write_hf_dir(engine.module, state_dict, tokenizer, out_dir, step) if world()[0] == 0 else None
    raise_first(gather(error), TrainingError)
    return out_dir


def export_checkpoint(directory: Path, student: Path, tokenizer, out_dir: Path, trust_remote_code: bool) -> Path:
    """The student of a checkpoint dir (any number of ranks wrote it) as an HF dir: DeepSpeed consolidates the
    ZeRO-3 partitions on CPU, in the dtype the run trained in. One process, no process group."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    # DeepSpeed names the optimizer files of a bf16 run bf16_zero_pp_rank_*; rlad_ds trains in bf16 or fp32.
    dtype = torch.bfloat16 if any(directory.glob("bf16_zero_pp_rank_*_optim_states.pt")) else torch.float32
    # DeepSpeed's reader unpickles the ZeRO-3 files: this run's own, verified against its manifest first.
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
    module = AutoModelForCausalLM.from_pretrained(student, dtype=dtype, trust_remote_code=trust_remote_code)
    module.load_state_dict(state_dict)  # cast to the module's dtype; every name must match
    error = write_hf_dir(module, None, tokenizer, Path(out_dir), None, export_command=True)
    if error:
        raise TrainingError(error)
    return Path(out_dir)
