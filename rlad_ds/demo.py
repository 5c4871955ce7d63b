"""The embedded demo's assets: a local tokenizer and an SFT-trained teacher and student for `arith`.

`prepare_demo(cache_dir)` returns HF model dirs ``{"student": Path, "teacher": Path}`` for the
column-wise addition task (`rlad_ds.tasks.arith`): a Qwen3 teacher of ~2.4M parameters and a Qwen3
student of ~80k parameters, both pre-trained by supervised fine-tuning on generated worked solutions
(plain PyTorch, one process, no DeepSpeed). The SFT lengths are chosen so that the teacher is nearly
perfect and the student only partly competent, which leaves room for RL to improve it.

Prompt format (explicit choice): the demo uses a *raw* template, not ChatML. The tokenizer's vocabulary
is the 14 characters of the task plus the specials <|pad|>, <|im_start|>, <|im_end|> (17 tokens), and its
chat template renders a user message as its bare content and adds nothing for the generation prompt, so
``apply_chat_template([{"role": "user", "content": "347+285="}], add_generation_prompt=True)`` is
``347+285=``; the model continues with the worked solution and ends with EOS ``<|im_end|>``. Code that
applies chat templates therefore needs no special case for the demo. (ChatML would need role names and
newlines in the vocabulary, i.e. a larger vocabulary for nothing.)

Cache: the models are written under ``cache_dir/arith-<key>/``, where `key` hashes the recipe, the seed,
the tokenizer and a format version, so changing any of them trains anew. A build happens in a temporary
directory that is renamed into place only when complete, under a file lock, so an interrupted run never
leaves a half cache that would be reused and concurrent callers (e.g. two ranks) train once.
``demo.json`` beside the model dirs records the recipe, parameter counts, timings and held-out accuracies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rlad_ds.tasks import arith
from rlad_ds.tiny import char_tokenizer, tiny_config

FORMAT_VERSION = 1  # bump when the files written or the training code change meaning
CACHE_DIR = Path(os.environ.get("RLAD_CACHE", Path.home() / ".cache" / "rlad_ds")) / "demo"
# Raw template: user content only; assistant content (for completeness) followed by EOS; no generation prompt.
DEMO_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<|im_end|>"
                      "{% elif m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}")
MAX_NEW_TOKENS = 48  # the worked solution is 32 characters + EOS
# The demo's recipe, a profile of the config tree (`rlad_ds.config`): `launchers/train.py` with no --student
# starts from these values, under the user's --config file and flags, which still override any of them.
PROFILE = {"data": {"task": "arith"}, "rollout": {"max_new_tokens": MAX_NEW_TOKENS},
           "train": {"prompts_per_step": 16, "lr": 1e-5, "max_steps": 60, "save_steps": 0,
                     "output_dir": "outputs/demo"},
           "eval": {"eval_size": 200, "eval_steps": 20}}


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


def demo_tokenizer():
    """The demo's 17-token character tokenizer with the raw chat template (see the module docstring)."""
    tokenizer = char_tokenizer(arith.ALPHABET)
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


def render_prompt(tokenizer, text: str) -> str:
    """The model input for a user text, through the tokenizer's chat template (for the demo: `text` itself)."""
    if tokenizer.chat_template is None:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def recipe_key(recipe: DemoRecipe, seed: int) -> str:
    blob = json.dumps({"recipe": dataclasses.asdict(recipe), "seed": seed, "version": FORMAT_VERSION,
                       "alphabet": arith.ALPHABET, "template": DEMO_CHAT_TEMPLATE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sft_batch(tokenizer, examples: list[dict], solution=arith.solution):
    """Right-padded (input_ids, attention_mask, labels) with the loss on `solution(example)` and EOS only."""
    import torch

    rows, prompt_lengths = [], []
    for example in examples:
        prompt_ids = tokenizer.encode(render_prompt(tokenizer, arith.prompt(example)), add_special_tokens=False)
        target_ids = tokenizer.encode(solution(example), add_special_tokens=False)
        rows.append(prompt_ids + target_ids + [tokenizer.eos_token_id])
        prompt_lengths.append(len(prompt_ids))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, n_prompt) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        labels[i, n_prompt:len(row)] = input_ids[i, n_prompt:len(row)]
    return input_ids, attention_mask, labels


def build_model(spec: ModelSpec, tokenizer, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    config = tiny_config("qwen3", len(tokenizer), hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                         kv_heads=spec.kv_heads, intermediate=spec.intermediate, max_positions=128)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               max_new_tokens=MAX_NEW_TOKENS)
    return model


def train_sft(model, tokenizer, spec: SFTSpec, seed: int, progress: bool = True, desc: str = "sft",
              stop=None, check_every: int = 25, solution=arith.solution) -> list[float]:
    """SFT `model` in place on fresh train-split examples; returns the per-step losses.

    `stop(model)`, if given, is called every `check_every` steps (model in eval mode); True ends training.
    `solution(example)` renders the targets (the study trains a deliberately wrong teacher with it).
    """
    import torch
    from tqdm.auto import tqdm

    examples = arith.generate("train", spec.steps * spec.batch_size, seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress_ = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = examples[step * spec.batch_size:(step + 1) * spec.batch_size]
        input_ids, attention_mask, labels = sft_batch(tokenizer, batch, solution)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == spec.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if stop is not None and (step + 1) % check_every == 0 and step + 1 < spec.steps:
            model.eval()
            done = stop(model)
            model.train()
            if done:
                break
    bar.close()
    model.eval()
    return losses


def evaluate_accuracy(model, tokenizer, examples: list[dict], greedy: bool = True, temperature: float = 1.0,
                      batch_size: int = 64, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Mean `arith` score of `model` (a model or an HF dir) on `examples`, with batched HF generate.

    Greedy decoding, or sampling at `temperature` (no top-k / top-p) seeded by `seed` without touching the
    global RNG. Prompts are left padded. `tokenizer` may be None when `model` is a dir.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, (str, Path)):
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model)
    if not examples:
        return 0.0
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    total = 0.0
    sampling = {} if greedy else {"temperature": temperature, "top_k": None, "top_p": None}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                texts = [render_prompt(tokenizer, arith.prompt(e)) for e in chunk]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, do_sample=not greedy, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **sampling)
                completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                total += sum(arith.score(c, e) for c, e in zip(completions, chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return total / len(examples)


@contextlib.contextmanager
def _threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(root: Path) -> bool:
    return (root / "demo.json").is_file() and all((root / r / "config.json").is_file() for r in ("student", "teacher"))


def _build(root: Path, recipe: DemoRecipe, seed: int, progress: bool) -> None:
    """Train and save both models plus demo.json into `root` (a fresh temporary dir)."""
    tokenizer = demo_tokenizer()
    info = {"recipe": dataclasses.asdict(recipe), "seed": seed, "format_version": FORMAT_VERSION,
            "tokenizer_size": len(tokenizer)}
    test = arith.generate("test", recipe.eval_examples, seed) if recipe.eval_examples else []
    for offset, role in enumerate(("teacher", "student")):
        spec, sft = getattr(recipe, role), getattr(recipe, f"{role}_sft")
        model = build_model(spec, tokenizer, seed * 1000 + offset)
        stop = None
        if role == "student" and recipe.student_target is not None:
            check = arith.generate("train", recipe.student_check_examples, seed + 10_000)

            def reached_target(m, check=check):
                return evaluate_accuracy(m, tokenizer, check, greedy=False, seed=seed) >= recipe.student_target

            stop = reached_target
        start = time.perf_counter()
        losses = train_sft(model, tokenizer, sft, seed * 1000 + offset, progress, desc=f"demo SFT {role}", stop=stop,
                           check_every=recipe.student_check_every)
        record = {"parameters": count_parameters(model), "sft_steps": len(losses),
                  "sft_seconds": round(time.perf_counter() - start, 1),
                  "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4)}
        if test:
            start = time.perf_counter()
            record["heldout_greedy"] = evaluate_accuracy(model, tokenizer, test, greedy=True, seed=seed)
            record["heldout_sampled_t1"] = evaluate_accuracy(model, tokenizer, test, greedy=False, seed=seed)
            record["eval_seconds"] = round(time.perf_counter() - start, 1)
        info[role] = record
        model.save_pretrained(root / role, safe_serialization=True)
        tokenizer.save_pretrained(root / role)
    (root / "demo.json").write_text(json.dumps(info, indent=2) + "\n")


def build_cached(cache_dir: Path, name: str, complete, build) -> Path:
    """`cache_dir / name`, made once by `build(tmp_dir)` and reused while `complete(root)` holds.

    Concurrent callers wait on a file lock while one builds; the result appears by an atomic rename, so a
    killed build never leaves a half-written `name` (its temporary dir is removed by the next build).
    """
    root = cache_dir / name
    if complete(root):
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{name}.lock"):
        if complete(root):  # another process built it while we waited
            return root
        for stale in cache_dir.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            if root.exists():  # an incomplete leftover from a run that predates the lock
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare_demo(cache_dir: str | Path, seed: int = 0, progress: bool = True,
                 recipe: DemoRecipe = DEFAULT_RECIPE, num_threads: int | None = None) -> dict[str, Path]:
    """HF dirs of the demo's SFT student and teacher, trained on the first call and cached after.

    `num_threads` (default: every CPU) applies only while training. ``demo.json`` beside the returned dirs
    records parameter counts, SFT time and held-out accuracy (greedy and sampled at temperature 1).
    """
    cache_dir = Path(cache_dir)
    name = f"arith-{recipe_key(recipe, seed)}"

    def build(tmp: Path) -> None:
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"rlad_ds demo: training the SFT teacher and student once (about 2-3 min on 2 CPU cores), "
                       f"cached in {cache_dir / name}")
        with _threads(num_threads or os.cpu_count()):
            _build(tmp, recipe, seed, progress)

    root = build_cached(cache_dir, name, _complete, build)
    return {"student": root / "student", "teacher": root / "teacher"}


def demo_info(paths: dict[str, Path]) -> dict:
    """The demo.json record of a `prepare_demo` result."""
    return json.loads((Path(paths["teacher"]).parent / "demo.json").read_text())


if __name__ == "__main__":  # python -m rlad_ds.demo [CACHE_DIR]: build (or reuse) and print demo.json
    import sys

    start = time.perf_counter()
    result = prepare_demo(sys.argv[1] if len(sys.argv) > 1 else CACHE_DIR)
    print(json.dumps(demo_info(result), indent=2))
    print(f"prepare_demo: {time.perf_counter() - start:.1f} s; {result}")
