"""What a checkpoint dir holds, checked without loading anything: the `COMPLETE` marker as its manifest.

The marker of OUTPUT_DIR/checkpoints/step_N/ is JSON, written last: the step, the world size, the run
identity and every file's size and sha256 (`{"files": {name: [size, hex]}}`). `verify` checks a dir against it
(sizes first, then checksums); a marker without a file list cannot be verified and is refused like a damaged one.
Hashing streams 4 MiB blocks into one reused buffer. Pure file work (no torch, no process group):
`rlad_ds.checkpoint.protocol` does the collective parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MARKER = "COMPLETE"
CHECKSUM = "sha256"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# ZeRO-3 writes one model-states and one optimizer file per rank (bf16_ prefixed under bf16), the trainer one
# RNG state per rank: each rank hashes its own files, rank 0 the rest.
_OWNER = re.compile(r"zero_pp_rank_(\d+)_|^rng_rank(\d+)\.")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with a marker), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(directory: Path) -> dict | None:
    """The marker's JSON, or None if it is unreadable."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def marker_step(directory: Path) -> int:
    """The step a checkpoint dir holds: its marker's, or (old, empty markers) its name's."""
    return int((read_marker(directory) or {}).get("step", int(STEP_DIR.match(directory.name).group(1))))


def file_digest(path: Path, block: int = 4 << 20) -> str:
    digest, buffer = hashlib.new(CHECKSUM), bytearray(block)
    view = memoryview(buffer)  # one reused buffer: no allocation per block
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def hash_own(directory: Path, rank: int) -> dict:
    """{name: [size, sha256]} of the files of `directory` that `rank` wrote."""

    def owner(name: str) -> int:
        match = _OWNER.search(name)
        return int(match.group(1) or match.group(2)) if match else 0

    return {
        p.name: [p.stat().st_size, file_digest(p)]
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MARKER and owner(p.name) == rank
    }


def verify(directory: Path) -> str | None:
    """What is wrong with a checkpoint dir against its manifest ("file F: size 1 != 2"), or None."""
    marker = read_marker(directory)
    if marker is None:
        return f"its {MARKER} marker is not JSON"
    files = marker.get("files")
    if files is None:  # a resumed checkpoint is a verified one: without a file list there is nothing to verify
        return (
            f"its {MARKER} marker lists no files (written by rlad_ds before checkpoints carried a manifest), so "
            f"it cannot be verified; resume it with the rlad_ds version that wrote it, or start afresh"
        )
    try:
        for name, (size, _) in sorted(files.items()):  # sizes first: a stat finds truncation without reading
            path = directory / name
            if not path.is_file():
                return f"file {name}: missing"
            if path.stat().st_size != size:
                return f"file {name}: size {path.stat().st_size} != {size}"
        for name, (_, digest) in sorted(files.items()):
            if file_digest(directory / name) != digest:
                return f"file {name}: {CHECKSUM} differs"
    except (TypeError, ValueError, AttributeError):
        return f"its {MARKER} marker's file list is malformed"
    return None
