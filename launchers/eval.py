"""Mean@k / Pass@k evaluation: `[deepspeed] launchers/eval.py --model DIR --task kk [--n 32 --k 1,8,32 ...]`.

Runs as a plain `python launchers/eval.py` (one process) or under the deepspeed launcher (examples sharded
over ranks). `--help` lists every option with its default; the logic is `rlad_ds.evaluation.eval_main`.
"""

import sys

from rlad_ds.evaluation import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
