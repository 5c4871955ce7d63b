"""Checkpoints that survive a crash mid-save, exact resume, and the HF export of the student.

Layout under OUTPUT_DIR/checkpoints/step_00000042/: DeepSpeed's own files (`save_checkpoint` with that
tag), one `rng_rank{r}.safetensors` + `rng_rank{r}.json` per rank, `trainer_state.json`, and last the
`COMPLETE` marker, written by rank 0 after every rank has finished. Resume only ever picks a directory
with the marker, so a checkpoint interrupted at any moment (kill -9 included) is never used, and the
previous complete one is only deleted after the new one is complete. Nothing here unpickles a file this
package did not write through DeepSpeed; RNG states and trainer state are safetensors and JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from rlad_ds.callbacks import Callback
from rlad_ds.errors import ConfigError
from rlad_ds.launch import world

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint dir `--resume` names: auto = newest complete one (or None), none = None, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker); pass a "
                          f"checkpoints/step_N dir written by this trainer, auto, or none")
    return path


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_rng(directory: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))
    version, state, gauss = random.getstate()
    write_json_atomic(directory / f"rng_rank{rank}.json", {"python": [version, list(state), gauss]})


def _load_rng(directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    tensors_path = directory / f"rng_rank{rank}.safetensors"
    if not tensors_path.is_file():
        raise ConfigError(f"checkpoint {directory} has no RNG state for rank {rank}: it was written with a "
                          f"different number of ranks; resume with the same world size")
    tensors = load_file(str(tensors_path))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = json.loads((directory / f"rng_rank{rank}.json").read_text())["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Save a complete, resumable checkpoint for `step` (collective: every rank calls it)."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    directory = root / tag
    rank = world()[0]
    if rank == 0 and directory.exists():  # a partial leftover of a crashed save of this very step
        shutil.rmtree(directory)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    _save_rng(directory, rank)
    _barrier()
    if rank == 0:
        write_json_atomic(directory / "trainer_state.json", trainer_state)
        write_json_atomic(directory / MARKER, {"step": step})
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in root.iterdir():  # leftovers of crashed saves, never resumable
            if _STEP_DIR.match(partial.name) and not (partial / MARKER).exists():
                shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    return directory


def load_checkpoint(engine, directory: Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a complete checkpoint; return trainer state."""
    load_path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {directory}; resume from another one or use "
                          f"--resume none")
    _load_rng(directory, world()[0])
    return json.loads((directory / "trainer_state.json").read_text())


class ExportHF(Callback):
    """At the end of the run, the trained student as a plain transformers model dir (safetensors + tokenizer)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, history: dict) -> None:
        export_hf(trainer.engines.student, trainer.tokenizer, self.out_dir)


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
    _barrier()
    return out_dir


# Fields that may change between a run and its resumption without making it a different run.
_RESUMABLE = {"train": {"max_steps", "resume", "save_steps", "keep_last", "overwrite_output_dir", "report_to",
                        "collective_timeout_s", "output_dir"},
              "eval": {"eval_size", "eval_steps", "eval_dataset", "eval_split", "eval_samples", "eval_k",
                       "eval_temperature", "eval_top_p", "eval_top_k", "eval_offload"}}


def run_identity(cfg) -> dict:
    """The config fields that define a run (what `--resume` must match), as JSON-ready values."""
    identity = json.loads(json.dumps(cfg.to_dict()))
    for section, fields in _RESUMABLE.items():
        identity[section] = {k: v for k, v in identity[section].items() if k not in fields}
    return identity


def check_output_dir(cfg) -> None:
    """Refuse an output dir that holds a different run, unless told to overwrite (nothing is deleted here)."""
    record = Path(cfg.train.output_dir) / "run_config.json"
    if not record.is_file() or cfg.train.overwrite_output_dir:
        return
    try:
        previous = json.loads(record.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"--output_dir {cfg.train.output_dir} has an unreadable run_config.json; choose another "
                          f"--output_dir or pass --overwrite_output_dir") from None
    if previous != run_identity(cfg):
        raise ConfigError(f"--output_dir {cfg.train.output_dir} holds a different run (see its run_config.json); "
                          f"choose another --output_dir or pass --overwrite_output_dir")
    if cfg.train.resume == "none" and complete_checkpoints(cfg.train.output_dir):
        raise ConfigError(f"--output_dir {cfg.train.output_dir} already has checkpoints of this run; pass "
                          f"--resume auto to continue it or --overwrite_output_dir to start again")
