"""What a checkpoint dir holds, checked without loading anything: the `COMPLETE` marker as its manifest.

The marker of OUTPUT_DIR/checkpoints/step_N/ is JSON, written last: the step, the world size, the run identity,
the verification (`--checkpoint_verify`: "size" or "sha256") and every file's size and, under sha256, checksum
(`{"files": {name: [size, hex or null]}}`). `verify` checks a dir against it: sizes first (a stat per file), then
the checksums, each rank its share of them when the ranks verify together. A marker without a file list, or whose
step is not a number, cannot be trusted and is refused like a damaged checkpoint. Under sha256 the files DeepSpeed
writes are hashed as they are written (`HashingWriter`), the rest after; hashing streams 4 MiB blocks into one
reused buffer. Pure file work (no process group): `rlad_ds.checkpoint.protocol` does the collective parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MARKER = "COMPLETE"
VERIFY_MODES = ("size", "sha256")
STEP_DIR = re.compile(r"^step_(\d{8})$")
# ZeRO-3 writes one model-states and one optimizer file per rank (bf16_ prefixed under bf16), the trainer one
# RNG state per rank: each rank hashes its own files, rank 0 the rest.
_OWNER = re.compile(r"zero_pp_rank_(\d+)_|^rng_rank(\d+)\.")
# Below this, hashing inline costs less than handing the block to the hashing thread.
_PARALLEL_BYTES = 1 << 20
_HASHER = ThreadPoolExecutor(1, thread_name_prefix="rlad_ds-sha256")


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


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def marker_step(directory: Path) -> int:
    """The step a checkpoint dir holds (its marker's; `verify` refuses a marker whose step is not a number)."""
    step = (read_marker(directory) or {}).get("step")
    return step if _is_step(step) else int(STEP_DIR.match(directory.name).group(1))


def file_digest(path: Path, block: int = 4 << 20) -> str:
    digest, buffer = hashlib.sha256(), bytearray(block)
    view = memoryview(buffer)  # one reused buffer: no allocation per block
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


class HashingWriter:
    """A file for `torch.save` that hashes every byte it is given while the write of the same bytes goes on: a
    large block is hashed on a second thread (hashlib and file writes both release the GIL), so that a file's
    checksum costs no read-back and, with a core to spare, next to no time."""

    def __init__(self, file):
        self.file, self.size, self._digest = file, 0, hashlib.sha256()

    def write(self, data) -> int:
        if memoryview(data).nbytes >= _PARALLEL_BYTES:
            hashed = _HASHER.submit(self._digest.update, data)  # `data` stays valid until this call returns
            try:
                written = self.file.write(data)
            finally:
                hashed.result()
        else:
            self._digest.update(data)
            written = self.file.write(data)
        self.size += written
        return written

    def flush(self) -> None:
        self.file.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def owner(name: str) -> int:
    """The rank that writes a file of a checkpoint dir."""
    match = _OWNER.search(name)
    return int(match.group(1) or match.group(2)) if match else 0


def entries(paths: dict[str, Path], mode: str, hashed: dict | None = None) -> dict:
    """{name: [size, sha256 or None]} of `paths` ({name: path}); `hashed` ({name: [size, hex]}) are the checksums
    taken while the files were written, used when the size on disk is the size hashed."""
    hashed, found = hashed or {}, {}
    for name, path in sorted(paths.items()):
        size = path.stat().st_size
        known = hashed.get(name)
        if mode == "size":
            found[name] = [size, None]
        else:
            found[name] = [size, known[1] if known and known[0] == size else file_digest(path)]
    return found


def hash_own(directory: Path, rank: int, mode: str = "sha256", hashed: dict | None = None) -> dict:
    """The manifest entries of the files of `directory` that `rank` wrote."""
    own = {p.name: p for p in directory.iterdir() if p.is_file() and p.name != MARKER and owner(p.name) == rank}
    return entries(own, mode, hashed)


def tree_entries(directory: Path, mode: str) -> dict:
    """The manifest entries of every file under `directory` (names relative to it), the marker excepted."""
    files = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    files.pop(MARKER, None)
    return entries(files, mode)


def shares(files: dict, world_size: int) -> list[list[str]]:
    """The names of `files` ({name: [size, ...]}) cut into `world_size` lists of about equal bytes (largest first,
    each to the least loaded): who hashes what when the ranks verify a checkpoint together."""
    loads, names = [0] * world_size, [[] for _ in range(world_size)]
    for name in sorted(files, key=lambda n: (-files[n][0], n)):
        least = loads.index(min(loads))
        loads[least] += files[name][0]
        names[least].append(name)
    return names


def _files(marker: dict | None) -> tuple[dict | None, str | None]:
    """The marker's file list, or why it cannot be trusted."""
    if marker is None:
        return None, f"its {MARKER} marker is not JSON"
    if not _is_step(marker.get("step")):
        return None, f"its {MARKER} marker's step {marker.get('step')!r} is not a number"
    files = marker.get("files")
    if files is None:  # a resumed checkpoint is a verified one: without a file list there is nothing to verify
        return None, (
            f"its {MARKER} marker lists no files (written by rlad_ds before checkpoints carried a manifest), so "
            f"it cannot be verified; resume it with the rlad_ds version that wrote it, or start afresh"
        )
    ok = isinstance(files, dict) and all(isinstance(e, list) and len(e) == 2 for e in files.values())
    return (files, None) if ok else (None, f"its {MARKER} marker's file list is malformed")


def verify(directory: Path, digests: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with a checkpoint dir against its manifest ("file F: size 1 != 2"), or None. Every file's size
    is checked; with `digests`, the checksums of share (rank, world size) of the files (`shares`)."""
    files, problem = _files(read_marker(directory))
    if problem:
        return problem
    try:
        for name, (size, _) in sorted(files.items()):  # sizes first: a stat finds truncation without reading
            path = directory / name
            if not path.is_file():
                return f"file {name}: missing"
            if path.stat().st_size != size:
                return f"file {name}: size {path.stat().st_size} != {size}"
        for name in shares(files, share[1])[share[0]] if digests else ():
            expected = files[name][1]
            if expected is not None and file_digest(directory / name) != expected:
                return f"file {name}: sha256 differs"
    except OSError as error:  # a file that vanished meanwhile (another process pruning): damaged for this run
        return f"file {error.filename}: {error.strerror}"
    except (TypeError, ValueError, AttributeError):
        return f"its {MARKER} marker's file list is malformed"
    return None
