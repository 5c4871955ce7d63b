"""Wall time of a step's named phases (rollout, reward, teacher, train_forward, ...), as `time/<phase>` metrics.

On an accelerator each phase is bracketed by device events, recorded without waiting, and read after one
synchronisation when the step's times are asked for: timing never stalls the host inside the step (a
synchronisation around every micro-batch's forward and backward would defeat ZeRO-3's overlap of communication and
compute). Where DeepSpeed's accelerator says host timers are exact (the CPU, whose work is synchronous), the host
clock times each phase.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class Timer:
    def __init__(self):
        from deepspeed.accelerator import get_accelerator

        self._accelerator = get_accelerator()
        self._event = None if self._accelerator.use_host_timers() else self._accelerator.Event
        self._host: dict[str, float] = {}
        self._events: dict[str, list] = {}

    @contextmanager
    def __call__(self, name: str):
        key = f"time/{name}"
        if self._event is None:
            start = time.perf_counter()
            yield
            self._host[key] = self._host.get(key, 0.0) + time.perf_counter() - start
            return
        start, end = self._event(enable_timing=True), self._event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.setdefault(key, []).append((start, end))

    @property
    def times(self) -> dict[str, float]:
        """Seconds per phase, summed over its occurrences (one synchronisation on an accelerator)."""
        if self._events:
            self._accelerator.synchronize()
        device = {key: sum(s.elapsed_time(e) for s, e in pairs) / 1000.0 for key, pairs in self._events.items()}
        return {**self._host, **device}
