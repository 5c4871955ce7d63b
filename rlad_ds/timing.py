"""Wall time of a step's named phases (rollout, reward, teacher, train_forward, ...), as `time/<phase>` metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager


class Timer:
    """Wall time of named phases (synchronised on accelerators so that times are real)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
        start = time.perf_counter()
        yield
        get_accelerator().synchronize()
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start
