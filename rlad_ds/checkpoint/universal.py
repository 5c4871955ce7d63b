"""A checkpoint loaded on another number of ranks: DeepSpeed's universal format, converted once by rank 0 into
step_N/universal/ with its own manifest (`universal/COMPLETE`, under --checkpoint_verify), and verified before
every load like the checkpoint it came from. A conversion that fails verification is derived data: it is
removed and converted again from the original, which was verified before."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from rlad_ds.checkpoint.collective import gather, raise_first, verify_together
from rlad_ds.checkpoint.manifest import MARKER, read_marker, tree_entries, write_json_atomic
from rlad_ds.distributed import world
from rlad_ds.errors import ConfigError, reason_line

logger = logging.getLogger("rlad_ds")
UNIVERSAL = "universal"


def _convert(directory: Path, tmp: Path) -> None:
    """DeepSpeed's ds_to_universal of `directory` into `tmp`, quietly."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    # One worker: no process pool forked from a process inside a process group.
    args = argparse.Namespace(
        input_folder=str(directory),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ds_to_universal.main(args)
    (directory / "latest_universal").unlink(missing_ok=True)  # names the tmp dir; tags are explicit here


def universal_checkpoint(directory: Path, ranks: int, verify_mode: str = "sha256") -> Path:
    """step_N/universal, verified under `verify_mode`; converted by rank 0 when missing or damaged, its manifest
    recording what `verify_mode` asks (collective: the others wait)."""
    target, error = directory / UNIVERSAL, None
    problem = verify_together(target, verify_mode == "sha256") if target.is_dir() else "missing"
    if problem is not None and world()[0] == 0:
        if problem != "missing":
            logger.warning("%s fails verification (%s): converting the checkpoint again", target, problem)
        step = (read_marker(directory) or {}).get("step")
        tmp = directory / f"{UNIVERSAL}.tmp"  # renamed when done: a crash mid-conversion is redone, never used
        try:
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
            _convert(directory, tmp)
            files = tree_entries(tmp, verify_mode)
            write_json_atomic(tmp / MARKER, {"step": step, "checksum": verify_mode, "files": files})
            os.replace(tmp, target)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = (
                f"cannot convert checkpoint {directory} to DeepSpeed's universal format for another number of "
                f"ranks ({reason_line(e)}); resume with the {ranks} ranks that wrote it"
            )
    raise_first(gather(error), ConfigError)
    return target
