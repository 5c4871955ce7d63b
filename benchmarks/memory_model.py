"""The per-device memory model of docs/long_context.md: its formulas, their check against P8's measured peaks, and
the longest trainable response on one 8 x H200 node.

    python -m benchmarks.memory_model --p8 DIR      (DIR holds p8_sp1.json and p8_sp2.json of benchmarks.run P8)

Element counts per token come from the tensors autograd saves in transformers' Qwen3 layer (sdpa), counted once per
storage with `torch.autograd.graph.saved_tensors_hooks` (docs/long_context.md says how); everything else is
arithmetic on the model's config.json and rlad_ds's defaults. Pure functions: tests/test_benchmarks.py checks them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params(self) -> int:
        h = self.hidden
        layer = h * (self.q + 2 * self.kv) + self.q * h + 3 * h * self.intermediate + 2 * h + 2 * self.head_dim
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h


# config.json of the released models (hidden, intermediate, layers, heads, KV heads, head dim, vocabulary, tied).
QWEN3 = {
    "Qwen3-1.7B": Arch(2048, 6144, 28, 16, 8, 128, 151936, tied=True),
    "Qwen3-8B": Arch(4096, 12288, 36, 32, 8, 128, 151936),
    "Qwen3-32B": Arch(5120, 25600, 64, 64, 8, 128, 151936),
}


def layer_saved(a: Arch, tiles: int = 1) -> float:
    """Elements per token one decoder layer saves for backward. Under TiledMLP the MLP saves only its input, which the
    layer saves anyway: its four [I] tensors are recomputed one tile at a time in backward."""
    mlp = 4 * a.intermediate if tiles == 1 else 0
    return 6 * a.hidden + 4 * a.q + 4 * a.kv + mlp + 2 * a.heads + a.kv_heads + 2


def layer_saved_bytes(a: Arch, bytes_per_value: int, tiles: int = 1) -> float:
    """Bytes per token one layer saves: `layer_saved` elements, and under bf16 the fp32 copies transformers' RMSNorms
    keep (the layer's two norms over [H], q_norm and k_norm over [Q] and [K])."""
    extra = 4 * a.hidden + 2 * a.q + 2 * a.kv + 24 if bytes_per_value == 2 else 0
    return layer_saved(a, tiles) * bytes_per_value + extra


def outside_saved(a: Arch) -> float:
    """Elements per token saved outside the layers: embeddings, final norm, the hidden states the log-prob head
    keeps, rotary tables, the fp32 log-sum-exp / log-prob / entropy."""
    return 3 * a.hidden + 2 * a.head_dim + 5


def backward_transient(a: Arch, tiles: int = 1) -> float:
    """Elements per token alive on top of the saved ones at the backward peak (the top layer's MLP): the incoming
    and outgoing hidden-state gradients [H] and the gradient of the MLP's product [I]; under TiledMLP one tile of
    that gradient and of the recomputed [I] tensors."""
    return 2 * a.hidden + a.intermediate / tiles + (4 * a.intermediate / tiles if tiles > 1 else 0)


def scoring_transient(a: Arch, tiles: int = 1) -> float:
    """Elements per token alive during a no-grad forward (teacher, old policy): the residual stream and its norm,
    the MLP's gate, up and product (one tile of them under TiledMLP), the attention output."""
    return 2 * a.hidden + 3 * a.intermediate / tiles + a.q


@dataclass(frozen=True)
class Setup:
    world: int = 8
    sequence_parallel: int = 1
    bytes_per_value: int = 2  # bf16 activations and weights
    checkpointing: bool = True
    offload: bool = False
    tiles: int = 1
    chunk: int | None = None  # log-prob rows per lm-head chunk; None: rlad_ds's default, 2^26 logits


def train_activations(a: Arch, tokens: int, s: Setup) -> float:
    """Bytes of the student's update pass at its peak, for one micro-batch of `tokens` on this rank's shard."""
    per_rank, b = tokens / s.sequence_parallel, s.bytes_per_value
    layer = layer_saved_bytes(a, b, s.tiles)
    if not s.checkpointing:
        held = a.layers * layer
    elif s.offload:  # the newest layer input stays, and one layer recomputed at a time
        held = 2 * a.hidden * b + layer
    else:  # every layer's input, and one layer recomputed at a time
        held = a.layers * a.hidden * b + layer
    return per_rank * (held + b * (outside_saved(a) + backward_transient(a, s.tiles)))


def logprob_head(a: Arch, s: Setup) -> float:
    """The chunked head's fixed cost: two fp32 [chunk, V] blocks and the fp32 gradient of the lm-head weight."""
    chunk = s.chunk or max(1, 2**26 // a.vocab)
    return 2 * chunk * a.vocab * 4 + a.vocab * a.hidden * 4


def zero3_states(a: Arch, s: Setup) -> float:
    """Parameters, gradients and AdamW state partitioned over every rank: bf16 weights, fp32 master copy, moments
    and gradients (18 bytes a parameter); fp32 training keeps no master copy (16)."""
    per_param = 18 if s.bytes_per_value == 2 else 16
    return a.params * per_param / s.world


def gathered(a: Arch, s: Setup, prefetch: float = 5e7) -> float:
    """ZeRO-3's working set of whole parameters: one layer and the prefetch bucket (stage3_prefetch_bucket_size)."""
    return (a.params / a.layers + prefetch) * s.bytes_per_value


def scoring_pass(a: Arch, tokens: int, s: Setup) -> float:
    """Bytes of a no-grad forward over this rank's shard, and the head's two fp32 [chunk, V] blocks."""
    per_rank = tokens / s.sequence_parallel
    return (
        per_rank * s.bytes_per_value * scoring_transient(a, s.tiles) + 2 * (s.chunk or 2**26 // a.vocab) * a.vocab * 4
    )


def rollout_kv(a: Arch, tokens: int, s: Setup) -> float:
    """One response's KV cache while it is sampled (generation is not sharded), with the student gathered whole."""
    return tokens * a.layers * 2 * a.kv * s.bytes_per_value + a.params * s.bytes_per_value


def device_peak(student: Arch, teacher: Arch, tokens: int, s: Setup, teacher_offloaded: bool = True) -> dict:
    """Per-device bytes of each phase of a step; the phases run one after the other, over the student's states."""
    states = zero3_states(student, s) + (0 if teacher_offloaded else teacher.params * s.bytes_per_value / s.world)
    return {
        "states": states,
        "train": states + gathered(student, s) + train_activations(student, tokens, s) + logprob_head(student, s),
        "teacher": states + gathered(teacher, s) + scoring_pass(teacher, tokens, s),
        "rollout": states + rollout_kv(student, tokens, s),
    }


def longest_response(student: Arch, teacher: Arch, s: Setup, memory: float, prompt: int = 1024) -> tuple[int, str]:
    """The most response tokens (a multiple of 1024) whose every phase fits in `memory` bytes, and the phase that
    stops the next 1024."""

    def over(response: int) -> str | None:
        phases = device_peak(student, teacher, prompt + response, s)
        return next((k for k in ("train", "teacher", "rollout") if phases[k] > memory), None)

    low, high = 0, 1 << 24
    while high - low > 1024:
        mid = (low + high) // 2 // 1024 * 1024
        low, high = (low, mid) if over(mid) else (mid, high)
    return low, over(low + 1024) or "none"


# ---- P8's models on this CPU -----------------------------------------------------------------------------------


def p8_prediction(student: Arch, teacher: Arch, tokens: int, s: Setup) -> float:
    """The peak growth P8 measures: above a baseline that holds the states and the warm-up's buffers, the larger of
    the update pass and the scoring passes (P8's tiny vocabulary makes the head's fixed cost negligible)."""
    scoring = tokens / s.sequence_parallel * s.bytes_per_value * scoring_transient(teacher, s.tiles)
    return max(train_activations(student, tokens, s), scoring)


def validate(p8_dir: Path, student: Arch, teacher: Arch) -> list[dict]:
    rows = []
    for size in (1, 2):
        run = json.loads((p8_dir / f"p8_sp{size}.json").read_text())
        for i, record in enumerate(run["ranks"][0]):
            variant = record["variant"]
            s = Setup(
                world=2,
                sequence_parallel=size,
                bytes_per_value=4,
                checkpointing=variant in ("checkpointing", "offload"),
                tiles=8 if variant == "tiled" else 1,
            )
            tokens = 64 + record["length"]
            measured = max(rank[i]["peak_growth_bytes"] for rank in run["ranks"])
            predicted = p8_prediction(student, teacher, tokens, s)
            rows.append(dict(N=size, variant=variant, tokens=tokens, measured=measured, predicted=predicted))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p8", help="dir with p8_sp1.json and p8_sp2.json")
    parser.add_argument("--memory_gib", type=float, default=126.0, help="usable memory of one device")
    args = parser.parse_args(argv)
    if args.p8:  # the models P8 built and measured, whichever sizes it ran (--quick or full)
        needed = ["p8_sp1.json", "p8_sp2.json", "p8_student/config.json", "p8_teacher/config.json"]
        missing = [name for name in needed if not (Path(args.p8) / name).is_file()]
        if missing:
            parser.error(f"--p8 {args.p8} lacks {', '.join(missing)}: give the --workdir of a benchmarks.run P8 run")
        student, teacher = (_arch_of(Path(args.p8) / f"p8_{role}") for role in ("student", "teacher"))
        print(
            "| N | variant | tokens | measured MiB | predicted MiB | predicted / measured |\n|---|---|---|---|---|---|"
        )
        for r in validate(Path(args.p8), student, teacher):
            print(
                f"| {r['N']} | {r['variant']} | {r['tokens']} | {r['measured'] / 2**20:.1f} | "
                f"{r['predicted'] / 2**20:.1f} | {r['predicted'] / r['measured']:.3f} |"
            )
    memory, names = args.memory_gib * GIB, {"train": "update", "teacher": "teacher pass", "rollout": "sampling"}
    print("\nlongest response (tokens after a 1024-token prompt; the phase that stops it) on 8 x H200 (ZeRO-3 over 8")
    print(f"ranks, bf16, teacher parameters offloaded), {args.memory_gib:.0f} GiB usable per device")
    print("| student | teacher | memory options | N = 1 | N = 8 |\n|---|---|---|---|---|")
    for student, teacher in (("Qwen3-1.7B", "Qwen3-8B"), ("Qwen3-8B", "Qwen3-32B")):
        for label, extra in (
            ("none", {"checkpointing": False}),
            ("checkpointing", {}),
            ("checkpointing + offload", {"offload": True}),
            ("checkpointing + offload + 8 MLP tiles", {"offload": True, "tiles": 8}),
        ):
            cells = []
            for n in (1, 8):
                tokens, phase = longest_response(
                    QWEN3[student], QWEN3[teacher], Setup(sequence_parallel=n, **extra), memory
                )
                cells.append(f"{tokens:,} ({names.get(phase, phase)})")
            print(f"| {student} | {teacher} | {label} | {cells[0]} | {cells[1]} |")
    return 0


def _arch_of(model_dir: Path) -> Arch:
    from rlad_ds.models import read_model_config

    config = read_model_config(model_dir)
    return Arch(
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        vocab=config["vocab_size"],
        tied=config.get("tie_word_embeddings", False),
    )


if __name__ == "__main__":
    raise SystemExit(main())
