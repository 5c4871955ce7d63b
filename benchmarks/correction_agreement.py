"""`rlad_ds.losses.rollout_correction` beside TRL's, verl's and OpenRLHF's own code, on identical inputs.

    python -m venv /tmp/peervenv && /tmp/peervenv/bin/pip install torch==2.13.0 numpy packaging
    /tmp/peervenv/bin/pip install --no-deps trl==1.16.0 verl==0.9.1 openrlhf==0.11.2
    PYTHONPATH=. /tmp/peervenv/bin/python -m benchmarks.correction_agreement [--json FILE]

For every preset and every peer mode it equals, at the peer's default bounds (and at rlad_ds's where they differ),
on float64 inputs drawn at several scales of log(trainer / sampler): the largest |difference| of the per-token
multiplier of the loss (rlad_ds: `weights * keep`; the peer: what its loss multiplies each token's term by, times
the mask it averages with) and of the mask the loss is averaged with (`keep`). Nothing of the peers is copied into
this repository: their installed files are read and run.

How each peer's code is reached, without its heavy dependencies (ray, tensordict, transformers, deepspeed):
- TRL computes the ratio inline in `GRPOTrainer._generate_and_score_completions`, a method that cannot be called
  alone. The script reads trl/trainer/grpo_trainer.py, takes the statements of the `if self.use_vllm and
  self.vllm_importance_sampling_correction:` block that assigns `vllm_importance_sampling_ratio` (the line span is
  printed), and executes them unchanged with the names they read bound (`self.vllm_importance_sampling_*`,
  `old_per_token_logps`, `sampling_per_token_logps`, `completion_mask`, `tool_mask=None`). `_compute_loss` then
  multiplies the per-token loss by that ratio and averages with `completion_mask`: keep = mask.
- verl: `verl.trainer.ppo.rollout_corr_helper.compute_rollout_correction_and_rejection_mask`, called as it is. Its
  package `__init__`s are not run, and the names its module imports for other functions only (tensordict's
  TensorDict, transformers' PreTrainedTokenizer, verl.utils.device, verl.workers.config.actor's PolicyLossConfig)
  are stand-ins; verl.protocol's `DataProto`, which only wraps the returned weights, is a stand-in holding them.
  The loss multiplies by `rollout_is_weights` (1 without IS) and averages with the returned mask.
- OpenRLHF: `openrlhf.models.loss.PolicyLoss.forward`, which computes the correction coefficient inside the loss
  and returns only the aggregate. It is called with `log_probs == old_log_probs` (PPO ratio 1), per-token
  advantages A and `batch_num_tokens=1`, so its loss is -sum_t(coef_t * mask_t * A_t) and the gradient of A is
  -coef * mask exactly. Its package `__init__` is not run; `deepspeed`, imported by openrlhf/models/utils.py for
  other functions, is a stand-in. Its loss averages with `action_mask`: keep = mask.
- DAPO's soft overlong punishment: `trl.rewards.other_rewards.get_soft_overlong_punishment` against
  `rlad_ds.advantages.soft_overlong_penalty`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import math
import sys
import textwrap
import types
from pathlib import Path

import torch

from rlad_ds.advantages import soft_overlong_penalty
from rlad_ds.losses import rollout_correction
from rlad_ds.sampler_mismatch import PRESETS, mismatch_metrics

SCALES = (0.01, 0.3, 1.0)  # how far log(trainer / sampler) strays: bf16-like, large, extreme
ROWS, WIDTH = 64, 48
VERL_SAFETY_BOUND = 20.0  # verl clamps log-ratios and their sums to +-20 before exp; the others do not

# (preset, peer, peer's mode, (low, high) for rlad_ds and the peer): each peer mode's default bounds, and the
# preset's own where they differ. verl's Geo-RS bounds are on the inverse ratio: (a, b) there is (1/b, 1/a) here.
CASES = [
    ("tis", "trl", "token_truncate", (None, 3.0)),
    ("tis", "verl", "token", (None, 2.0)),
    ("tis", "openrlhf", "token clip", (0.5, 5.0)),
    ("icepop", "trl", "token_mask", (None, 3.0)),
    ("icepop", "verl", "token", (0.5, 5.0)),
    ("icepop", "openrlhf", "token mask", (0.5, 5.0)),
    ("seq_tis", "trl", "sequence_truncate", (None, 3.0)),
    ("seq_tis", "verl", "sequence", (None, 2.0)),
    ("seq_mask", "trl", "sequence_mask", (None, 3.0)),
    ("seq_mask", "verl", "sequence", (0.5, 5.0)),
    ("seq_mask_tis", "openrlhf", "seq mask", (0.5, 5.0)),
    ("geo_rs", "verl", "seq_mean_k1", (1 / 1.001, 1 / 0.999)),
    ("geo_rs", "verl", "seq_mean_k1", (1 / 1.2, 1 / 0.8)),
]


def inputs(scale: float, seed: int = 0, rows: int = ROWS, width: int = WIDTH, within_verl_bound: bool = True):
    """float64 (old_logp, rollout_logp, mask): sampler log-probs in (-3, 0); log(trainer / sampler) per token a row
    bias in +-1.5 * scale plus N(0, scale / 2) noise (a sampler can be off for a whole row); responses of every
    length from 1 to `width`, right-padded, one row empty; garbage under the padding. `within_verl_bound` scales
    down the rows whose summed log-ratio would pass +-19.5, where verl's safety clamp would differ."""
    g = torch.Generator().manual_seed(seed)
    rollout = -3 * torch.rand(rows, width, generator=g, dtype=torch.float64)
    bias = 1.5 * scale * (2 * torch.rand(rows, 1, generator=g, dtype=torch.float64) - 1)
    log_ratio = bias + scale / 2 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[0] = 0
    mask = (torch.arange(width)[None] < lengths[:, None]).to(torch.float64)
    if within_verl_bound:
        sums = (log_ratio * mask).sum(-1, keepdim=True).abs()
        log_ratio = log_ratio * (19.5 / sums).clamp(max=1.0)
    old = torch.where(mask.bool(), rollout + log_ratio, torch.randn(rows, width, generator=g, dtype=torch.float64))
    return old, rollout, mask


def options(preset: str, bounds) -> dict:
    """The preset's `rollout_correction` keywords at exactly these bounds (None: no bound; on the command line a
    lower bound of 0 is none, as every ratio is >= 0)."""
    low, high = bounds
    return {**PRESETS[preset].options, "low": low, "high": high}


def ours(preset: str, bounds, old, rollout, mask):
    weights, keep = rollout_correction(old, rollout, mask, **options(preset, bounds))
    return weights * keep, keep


# ---- reaching the peers' code ---------------------------------------------------------------------------------------


_ROOTS: dict[str, Path] = {}  # each peer package's installed folder, found before any stand-in is registered


def _site_file(package: str, relative: str) -> Path:
    if package not in _ROOTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{package} is not installed in this Python; see this file's docstring for the venv")
        _ROOTS[package] = Path(list(spec.submodule_search_locations)[0])
    return _ROOTS[package] / relative


def _bare_packages(*names: str) -> None:
    """Register packages by their real folders without running their __init__ (which imports everything)."""
    for name in names:
        if name in sys.modules:
            continue
        top, _, rest = name.partition(".")
        module = types.ModuleType(name)
        module.__path__ = [str(_site_file(top, rest.replace(".", "/")))]
        sys.modules[name] = module


class _StandIn:
    """A name a peer module imports for functions this script never calls."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("a stand-in was called: the comparison reached code it means to leave out")


def _stand_in_modules(*names: str, **attributes) -> None:
    def name_of(attr: str):
        if attr.startswith("__"):  # module machinery (__file__, __path__, ...): a plain module has none
            raise AttributeError(attr)
        return attributes.get(attr, _StandIn)

    for name in names:
        module = types.ModuleType(name)
        module.__getattr__ = name_of
        sys.modules[name] = module


class _WeightsProto:
    """verl.protocol.DataProto's `from_dict(tensors=...)`, the only use rollout_corr_helper makes of it here."""

    def __init__(self, tensors):
        self.batch = tensors

    @classmethod
    def from_dict(cls, tensors):
        return cls(tensors)


def trl_block() -> tuple[types.CodeType, tuple[int, int]]:
    """The statements of GRPOTrainer._generate_and_score_completions that compute vLLM's IS ratio, compiled."""
    path = _site_file("trl", "trainer/grpo_trainer.py")
    source = path.read_text()
    tree = ast.parse(source)
    method = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "_generate_and_score_completions"
    )
    block = next(
        node
        for node in ast.walk(method)
        if isinstance(node, ast.If)
        and ast.unparse(node.test) == "self.use_vllm and self.vllm_importance_sampling_correction"
        and "vllm_importance_sampling_ratio =" in ast.get_source_segment(source, node)
    )
    code = textwrap.dedent("\n".join(source.splitlines()[block.body[0].lineno - 1 : block.end_lineno]))
    return compile(code, str(path), "exec"), (block.lineno, block.end_lineno)


_TRL_BLOCK: list = []


def trl(mode: str, bounds, old, rollout, mask):
    if not _TRL_BLOCK:
        _TRL_BLOCK.append(trl_block())
    code, _ = _TRL_BLOCK[0]
    low, high = bounds
    trainer = types.SimpleNamespace(
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=low,
        vllm_importance_sampling_clip_max=high,
    )
    names = dict(self=trainer, old_per_token_logps=old, sampling_per_token_logps=rollout, completion_mask=mask,
                 tool_mask=None, torch=torch, math=math)  # fmt: skip
    exec(code, names)
    return names["vllm_importance_sampling_ratio"] * mask, mask


def verl(mode: str, bounds, old, rollout, mask):
    if "verl.trainer.ppo.rollout_corr_helper" not in sys.modules:
        _bare_packages("verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.config", "verl.utils", "verl.workers")
        _bare_packages("verl.workers.config")
        _stand_in_modules("tensordict", "transformers", "verl.utils.device", "verl.workers.config.actor")
        _stand_in_modules("verl.protocol", DataProto=_WeightsProto)
    helper = importlib.import_module("verl.trainer.ppo.rollout_corr_helper")
    low, high = bounds
    if mode == "seq_mean_k1":  # Geo-RS: rejection only, its k1 bounds on pi_rollout / pi_train
        kwargs = dict(rollout_is=None, rollout_rs=mode, rollout_rs_threshold=f"{1 / high!r}_{1 / low!r}")
    else:
        kwargs = dict(rollout_is=mode, rollout_is_threshold=high if low is None else f"{low!r}_{high!r}")
    proto, modified_mask, _ = helper.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **kwargs)
    weights = proto.batch["rollout_is_weights"] if proto is not None else torch.ones_like(mask)
    return weights * modified_mask, modified_mask


def openrlhf(mode: str, bounds, old, rollout, mask):
    if "openrlhf.models.loss" not in sys.modules:
        _bare_packages("openrlhf", "openrlhf.models")
        _stand_in_modules("deepspeed")
    loss_module = importlib.import_module("openrlhf.models.loss")
    level, action = mode.split()
    loss_fn = loss_module.PolicyLoss(
        is_correction_level=level,
        is_correction_mode=action,
        is_correction_gating="ratio",
        is_correction_threshold=bounds,
    )
    advantages = torch.ones_like(old, requires_grad=True)
    loss, *_ = loss_fn(old, old, advantages, mask, rollout_log_probs=rollout, batch_num_tokens=1.0)
    loss.backward()
    return -advantages.grad, mask


PEERS = {"trl": trl, "verl": verl, "openrlhf": openrlhf}


def compare(cases=CASES, scales=SCALES, within_verl_bound: bool = True) -> list[dict]:
    rows = []
    for preset, peer, mode, bounds in cases:
        worst_weight = worst_keep = 0.0
        outside = []
        for seed, scale in enumerate(scales):
            old, rollout, mask = inputs(scale, seed, within_verl_bound=within_verl_bound)
            mine, keep = ours(preset, bounds, old, rollout, mask)
            theirs, their_keep = PEERS[peer](mode, bounds, old, rollout, mask)
            worst_weight = max(worst_weight, (mine - theirs).abs().max().item())
            worst_keep = max(worst_keep, (keep - their_keep).abs().max().item())
            outside.append(
                mismatch_metrics(old, rollout, mask, options(preset, bounds))["rollout_corrected_frac"].item()
            )
        rows.append({"preset": preset, "peer": peer, "mode": mode, "bounds": list(bounds),
                     "weights_keep_max_abs_diff": worst_weight, "keep_max_abs_diff": worst_keep,
                     "outside_bounds_frac": outside})  # fmt: skip
    return rows


def overlong_rows(max_len: int = 64, caches=(0, 8, 32)) -> list[dict]:
    _bare_packages("trl", "trl.rewards")
    theirs_module = importlib.import_module("trl.rewards.other_rewards")
    lengths = list(range(0, max_len + 1))
    rows = []
    for cache in caches:
        mine = soft_overlong_penalty(torch.tensor(lengths), max_len, cache).tolist()
        if cache == 0:
            theirs = [0.0] * len(lengths)  # TRL divides by the cache: 0 is rlad_ds's "off", not a TRL setting
        else:
            theirs = theirs_module.get_soft_overlong_punishment(max_len, cache)([[0] * n for n in lengths])
        diff = max(abs(a - b) for a, b in zip(mine, theirs))
        rows.append({"max_len": max_len, "cache": cache, "max_abs_diff": diff})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | peer | peer mode | bounds (low, high) | max abs diff, weights * keep | max abs diff, keep |"
        " tokens outside the bounds, per scale |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["bounds"]
        bounds = f"{'none' if low is None else f'{low:.6g}'}, {high:.6g}"
        lines.append(
            f"| {r['preset']} | {r['peer']} | {r['mode']} | {bounds} | {r['weights_keep_max_abs_diff']:.1e} | "
            f"{r['keep_max_abs_diff']:.1e} | {' / '.join(f'{x:.2f}' for x in r['outside_bounds_frac'])} |"
        )
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "trl", "verl", "openrlhf")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows, overlong = compare(), overlong_rows()
    _, span = trl_block()
    print(f"versions: {versions()}; TRL block: trl/trainer/grpo_trainer.py lines {span[0]}-{span[1]}")
    print(f"inputs: {ROWS} rows x {WIDTH} tokens, float64, scales {SCALES}\n")
    print(table(rows))
    beyond = compare([c for c in CASES if c[1] == "verl" and c[2] != "token"], scales=(3.0,), within_verl_bound=False)
    print(f"\nrows whose summed log-ratio passes verl's +-{VERL_SAFETY_BOUND:g} (scale 3.0, not scaled back):")
    print(table(beyond))
    print("\nsoft overlong punishment vs TRL's get_soft_overlong_punishment:", overlong)
    worst = max(max(r["weights_keep_max_abs_diff"], r["keep_max_abs_diff"]) for r in rows)
    print(f"\nlargest difference: {worst:.1e}")
    if args.json:
        record = {"versions": versions(), "trl_block": span, "rows": rows, "beyond_verl_bound": beyond}
        Path(args.json).write_text(json.dumps({**record, "overlong": overlong}, indent=1))
    return 0 if worst <= 1e-12 and all(r["max_abs_diff"] <= 1e-12 for r in overlong) else 1


if __name__ == "__main__":
    sys.exit(main())
