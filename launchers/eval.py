"""Mean@k / Pass@k evaluation: `[deepspeed] launchers/eval.py --model DIR --task kk [--eval_samples 32 ...]`.

Runs as a plain `python launchers/eval.py` (one process) or under the deepspeed launcher (problems sharded
over ranks). `--help` lists every option with its default; the names and defaults are the training
launcher's. The same entry point is installed as the console script `rlad-eval`.
"""

import sys

from rlad_ds.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
