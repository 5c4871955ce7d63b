"""python -m rlad_ds.demo [CACHE_ROOT] [--vllm | --ship]: train the demo's SFT models on this machine (the demo
itself loads those shipped with the package unless --demo_build), cached under CACHE_ROOT (default: --cache_dir's),
print their demo.json and how they compare with the shipped ones.

--vllm builds the demo recipe with a student of head size 32, which vLLM's CPU attention runs, and prints the
command that trains it with --rollout vllm. --ship (maintainers, after a recipe change) copies the build into the
package as the shipped one."""

import argparse
import json
import shlex
import time

from rlad_ds.demo.cache import cache_dir, demo_info, prepare_demo, ship, shipped_build
from rlad_ds.demo.recipe import DEFAULT_RECIPE, VLLM_RECIPE, demo_command

parser = argparse.ArgumentParser(prog="python -m rlad_ds.demo", description=__doc__.split("\n\n")[0])
parser.add_argument("cache_root", nargs="?", default=None, help="--cache_dir's root (default: ~/.cache/rlad_ds)")
choice = parser.add_mutually_exclusive_group()
choice.add_argument("--vllm", action="store_true", help="build a student vLLM's CPU build runs, print its command")
choice.add_argument("--ship", action="store_true", help="make this build the one shipped with the package")
args = parser.parse_args()

start = time.perf_counter()
paths = prepare_demo(cache_dir(args.cache_root), recipe=VLLM_RECIPE if args.vllm else DEFAULT_RECIPE, shipped=False)
info = demo_info(paths)
print(json.dumps(info, indent=2))
print(f"{time.perf_counter() - start:.1f} s: {paths['student'].parent}")
if args.vllm:
    print("train it with vLLM rollouts, from the repository's root (the demo's recipe on these models):")
    print(shlex.join(demo_command(paths, "outputs/demo-vllm", "--rollout", "vllm")))
elif args.ship:
    print(f"shipped: pin SHIPPED_SHA256SUMS = {ship(paths['student'].parent)!r} in rlad_ds/demo/recipe.py")
else:
    here, shipped = paths["student"].parent, shipped_build()
    if shipped is None:
        print("the package ships no build of this recipe: make this one the shipped build with --ship")
    else:
        same = all(
            (here / role / "model.safetensors").read_bytes() == (shipped / role / "model.safetensors").read_bytes()
            for role in ("student", "teacher")
        )
        theirs = json.loads((shipped / "demo.json").read_text())["student"]["heldout_greedy"]
        print(
            f"the weights are {'identical to' if same else 'not the same as'} those shipped with the package "
            f"(student held-out greedy accuracy {info['student']['heldout_greedy']} here, {theirs} shipped); "
            f"the demo loads the shipped ones, these with --demo_build"
        )
