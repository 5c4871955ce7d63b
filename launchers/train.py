"""RLAD training: `deepspeed launchers/train.py --deepspeed ds_configs/zero3.json [--student DIR --teacher DIR ...]`.

With no --student/--teacher it runs the built-in demo. `--help` lists every option with its default. The same
entry point is installed as the console script `rlad-train`.
"""

import sys

from rlad_ds.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
