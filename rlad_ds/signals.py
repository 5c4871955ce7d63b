"""What a signal does to a run: SIGTERM / SIGINT (also sent to a rank whose DeepSpeed launcher died) are recorded
in `STOP`, so that the trainer finishes its step, saves a checkpoint and exits when that fits in the launcher's
grace period, and exits at once otherwise."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from rlad_ds import hygiene
from rlad_ds.distributed import env_rank

logger = logging.getLogger("rlad_ds")


class StopRequest:
    """What this rank does on SIGTERM / SIGINT (also sent to itself when its launcher dies).

    With `save` on and the trainer's last step + checkpoint time (`seconds_needed`) within `grace_s` (what a
    launcher waits before SIGKILL: DeepSpeed's, SLURM's and Kubernetes' defaults are 30 s), the signal is only
    recorded: the trainer finishes its step, all ranks agree, save a checkpoint and exit. Otherwise (no step
    done yet, no time, opt-out, or a second signal) the rank exits at once, the last complete checkpoint intact.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.exit_code, self.requested_at = 0, 0.0
        self.seconds_needed: float | None = None
        self.grace_s = 30.0
        self.save = True
        self.last_checkpoint: str | None = None  # where a rerun resumes: set by the trainer as it resumes and saves

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and time.monotonic() - self.requested_at < 1.0:
            return  # Ctrl-C reaches every process, then DeepSpeed's launcher SIGTERMs the ranks: one request
        if self.requested or not self.save or self.seconds_needed is None or self.seconds_needed > self.grace_s:
            why = (
                "a second signal"
                if self.requested
                else "--save_on_signal is off"
                if not self.save
                else "no step finished yet"
                if self.seconds_needed is None
                else f"a step and a checkpoint take {self.seconds_needed:.0f} s, over --signal_grace_s {self.grace_s:g}"
            )
            if env_rank() == 0:
                rerun = (
                    f"a rerun resumes from {self.last_checkpoint}"
                    if self.last_checkpoint
                    else "this run has no checkpoint yet: a rerun starts at step 0"
                )
                logger.warning("%s: exiting now (%s); %s", name, why, rerun)
            raise SystemExit(128 + signum)
        self.signal_name, self.exit_code, self.requested_at = name, 128 + signum, time.monotonic()
        if env_rank() == 0:
            logger.warning(
                "%s: finishing this step, then saving a checkpoint and exiting (about %.0f s of the %g s grace)",
                name,
                self.seconds_needed,
                self.grace_s,
            )


STOP = StopRequest()


def guard_signals() -> dict:
    """SIGTERM / SIGINT go to `STOP`; under DeepSpeed's launcher, this rank also stops when the launcher dies.
    Returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.signal(signum, STOP.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    _watch_launcher()
    return previous


def _watch_launcher() -> None:
    """`deepspeed` runs `deepspeed.launcher.launch`, which runs the ranks. A SIGTERM to `deepspeed` alone (how
    supervisors stop a job) leaves `launch` and the ranks running; a kill of `launch` leaves the ranks. So each
    rank asks for SIGTERM when `launch` exits, and watches whether `launch` lost its own parent."""
    parent = os.getppid()
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:  # not Linux, or no /proc
        return
    if b"deepspeed.launcher.launch" not in command:
        return
    import psutil

    hygiene.set_parent_death_signal(signal.SIGTERM)
    launcher = psutil.Process(parent).ppid()

    def watch():
        while True:
            time.sleep(1.0)
            try:
                gone = os.getppid() != parent or psutil.Process(parent).ppid() != launcher
            except psutil.Error:
                gone = True
            if gone:
                if env_rank() == 0:
                    logger.warning("the deepspeed launcher is gone: stopping this run")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="rlad_ds-launcher-watch", daemon=True).start()
