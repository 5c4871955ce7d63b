"""python -m rlad_ds.demo [CACHE_ROOT]: build (or reuse) the demo's models under CACHE_ROOT (default: --cache_dir's)
and print their demo.json."""

import json
import sys
import time

from rlad_ds.demo.cache import cache_dir, demo_info, prepare_demo

start = time.perf_counter()
result = prepare_demo(cache_dir(sys.argv[1] if len(sys.argv) > 1 else None))
print(json.dumps(demo_info(result), indent=2))
print(f"prepare_demo: {time.perf_counter() - start:.1f} s; {result}")
