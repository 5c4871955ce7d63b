"""Sections that misbehave on purpose, for the GPU check's runner tests (`module:function` targets, run in the
runner's own fresh processes with tests/ on PYTHONPATH). Each takes a `benchmarks.gpu_check_base.Check`."""

import json
import os
import subprocess
import sys
import threading
import time

from benchmarks.gpu_check_base import SectionSkipped


def fine(check):
    check.record(answer=42, summary="fine")


def hangs_after_a_number(check):
    """Records a number, starts a grandchild that would outlive it, then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    check.record(measured=1.5, grandchild=child.pid)
    time.sleep(600)


def raises(check):
    check.record(before=1)
    raise ValueError("boom\nsecond line")


def dies(check):
    print("about to die", flush=True)
    os._exit(3)


def skips(check):
    raise SectionSkipped("nothing to do here")


def hangs_at_exit(check):
    """Finishes its work but leaves a non-daemon thread that keeps the interpreter from exiting."""
    threading.Thread(target=time.sleep, args=(600,)).start()
    check.record(done=True)


def reads_rows(check):
    """What OUT/gpu_check.jsonl holds while this section runs: the rows of the sections before it."""
    rows = (check.out / "gpu_check.jsonl").read_text().splitlines()
    check.record(rows_before=[json.loads(line)["section"] for line in rows])
