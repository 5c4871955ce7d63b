"""A run's trained student from its newest checkpoint, as a plain transformers model dir in OUTPUT_DIR/student_hf:
the training command with `launchers/export.py` in place of `launchers/train.py`, one process, no accelerator.

    python launchers/export.py --student ... --output_dir OUTPUT_DIR [the run's other flags]

For a run whose export at the end failed (a full disk), or one stopped before its end. The checkpoint is verified
first (`--checkpoint_verify`); `--resume PATH` exports that checkpoint instead. Installed as `rlad-export`.
"""

import sys

from rlad_ds.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
