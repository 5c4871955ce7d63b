"""The demo's recipe: the task's tokenizer and chat template, the sizes and SFT schedules of its teacher and
student, and the RL run it starts (`PROFILE`, a profile of the config tree). Everything here decides the demo's
models, so `recipe_key` hashes it to key their cache, and names the build shipped with the package
(`SHIPPED_SHA256SUMS` pins its files)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from rlad_ds.tasks import arith
from rlad_ds.tiny import char_tokenizer, tiny_config

FORMAT_VERSION = 1  # bump when the files written or the training code change meaning
# Raw template: user content only; assistant content (for completeness) followed by EOS; no generation prompt.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<|im_end|>"
    "{% elif m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
)
MAX_NEW_TOKENS = 48  # the worked solution is 32 characters + EOS
# The sha256 of the SHA256SUMS file of the build shipped in rlad_ds/demo/models/arith-<key of DEFAULT_RECIPE, seed 0>/
# (one machine's build: a few hundred SFT steps on a CPU are not bit-identical between CPUs, and the demo's
# numbers follow its models). A change of the recipe makes the shipped build another recipe's: rebuild it with
# `python -m rlad_ds.demo --ship` and pin the new sum here.
SHIPPED_SHA256SUMS = "77fd8276211370ba9caeac11d68082e3e28c5e4563793bd6e6673267d8a7f00c"
# The demo's recipe, a profile of the config tree (`rlad_ds.config`): `launchers/train.py` with no --student
# starts from these values, under the user's --config file and flags, which still override any of them.
PROFILE = {
    "data": {"task": "arith"},
    "rollout": {"max_new_tokens": MAX_NEW_TOKENS},
    "train": {"prompts_per_step": 16, "lr": 1e-5, "max_steps": 60, "save_steps": 0, "output_dir": "outputs/demo"},
    "eval": {"eval_size": 200, "eval_steps": 20},
}


def demo_profile(layers: dict) -> dict:
    """`PROFILE` under the user's layers ({section: {field: value}}): the demo of another method than the default
    writes to its own dir (outputs/demo-grpo, ...), so that trying it is not refused as another run in outputs/demo."""
    from rlad_ds.config.schema import LossConfig

    method = (layers.get("loss") or {}).get("method", LossConfig.method)
    if method == LossConfig.method:
        return PROFILE
    return {**PROFILE, "train": {**PROFILE["train"], "output_dir": f"{PROFILE['train']['output_dir']}-{method}"}}


@dataclass(frozen=True)
class ModelSpec:
    """Size of a tiny Qwen3 model (see `rlad_ds.tiny.tiny_config`)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class SFTSpec:
    """Supervised fine-tuning on generated worked solutions: AdamW, linear warm-up then cosine decay."""

    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo models; its hash keys the cache."""

    teacher: ModelSpec = ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512)
    teacher_sft: SFTSpec = SFTSpec(steps=200, lr=5e-3)
    student: ModelSpec = ModelSpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    student_sft: SFTSpec = SFTSpec(steps=400, lr=1e-2)
    # The student's SFT stops early, once its sampled (temperature 1) accuracy on `student_check_examples`
    # unseen train-split pairs reaches `student_target`: it learns the task abruptly and the step at which it
    # does varies with the seed, so a fixed step count would give anything from 2% to 80%. None: no stop.
    student_target: float | None = 0.25
    student_check_every: int = 25
    student_check_examples: int = 128
    eval_examples: int = 256  # held-out examples scored after training, recorded in demo.json (0: skip)


DEFAULT_RECIPE = DemoRecipe()
# The demo recipe with the student's 4 x 16 query heads (2 x 16 key/value) regrouped as 2 x 32 (1 x 32), the head
# size vLLM's CPU attention needs (>= 32): the same hidden size, layers and parameter count give or take the q/k
# norms. Its SFT gets up to 1200 steps (the demo's: 400) to reach the same early-stop target (sampled accuracy
# 0.25): with 400 this build stopped at 0.04. `python -m rlad_ds.demo --vllm` builds it.
VLLM_RECIPE = dataclasses.replace(
    DEFAULT_RECIPE,
    student=dataclasses.replace(DEFAULT_RECIPE.student, heads=2, kv_heads=1),
    student_sft=dataclasses.replace(DEFAULT_RECIPE.student_sft, steps=1200),
)


def demo_command(paths: dict, output_dir: str, *extra: str) -> list[str]:
    """The training command of the demo's recipe (`PROFILE`) on the models in `paths` (e.g. another recipe's build:
    with --student given, the profile does not apply by itself)."""
    flags = [
        "deepspeed",
        "launchers/train.py",
        "--deepspeed",
        "ds_configs/zero3.json",
        "--student",
        str(paths["student"]),
        "--teacher",
        str(paths["teacher"]),
    ]
    for values in PROFILE.values():
        flags += [item for name, value in values.items() if name != "output_dir" for item in (f"--{name}", str(value))]
    return [*flags, "--output_dir", output_dir, *extra]


def demo_tokenizer():
    """The demo's 17-token character tokenizer with the raw chat template (see the module docstring)."""
    tokenizer = char_tokenizer(arith.ALPHABET)
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


def render_prompt(tokenizer, text: str) -> str:
    """The model input for a user text, through the tokenizer's chat template (for the demo: `text` itself)."""
    if tokenizer.chat_template is None:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def recipe_key(recipe: DemoRecipe, seed: int) -> str:
    blob = json.dumps(
        {
            "recipe": dataclasses.asdict(recipe),
            "seed": seed,
            "version": FORMAT_VERSION,
            "alphabet": arith.ALPHABET,
            "template": DEMO_CHAT_TEMPLATE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(spec: ModelSpec, tokenizer, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    config = tiny_config(
        "qwen3",
        len(tokenizer),
        hidden=spec.hidden,
        layers=spec.layers,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        intermediate=spec.intermediate,
        max_positions=128,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=MAX_NEW_TOKENS
    )
    return model
