"""The embedded demo's assets: the arith task, the demo tokenizer and a miniature prepare_demo."""

import dataclasses
import json

import pytest
from conftest import ROOT

from rlad_ds.demo import cache, recipe, sft
from rlad_ds.errors import ConfigError
from rlad_ds.tasks import arith
from rlad_ds.tasks.arith import TASK

# A recipe small enough to train in a second: the real one's code path with tiny models and few steps.
MINI = recipe.DemoRecipe(
    teacher=recipe.ModelSpec(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
    teacher_sft=recipe.SFTSpec(steps=3, batch_size=8, warmup_steps=1),
    student=recipe.ModelSpec(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32),
    student_sft=recipe.SFTSpec(steps=2, batch_size=8, warmup_steps=1),
    eval_examples=4,
    student_target=0.0,
    student_check_every=1,
    student_check_examples=4,
)


# ---- the arith task -------------------------------------------------------------------------------------


def test_task_interface_and_worked_example():
    example = arith.make_example(347, 285)
    assert TASK.name == "arith" and TASK.generate is arith.generate
    assert TASK.prompt(example) == "347+285="
    assert arith.solution(example) == "7+5+0=12|4+8+1=13|3+2+1=06|>0632"
    assert example == {"a": 347, "b": 285, "answer": 632, "carries": 2}
    assert TASK.subset(example) == "carries2"
    assert TASK.subset(arith.make_example(100, 100)) == "carries0"
    assert TASK.subset(arith.make_example(950, 100)) == "carries1"
    assert TASK.subset(arith.make_example(999, 999)) == "carries3"
    assert arith.solution(arith.make_example(999, 999)) == "9+9+0=18|9+9+1=19|9+9+1=19|>1998"
    with pytest.raises(ValueError):
        arith.make_example(99, 100)


def test_generation_is_deterministic_by_seed():
    for split in ("train", "test"):
        first = TASK.generate(split, 200, 7)
        assert first == TASK.generate(split, 200, 7)
        assert first != TASK.generate(split, 200, 8)
        assert len({(e["a"], e["b"]) for e in first}) == 200  # distinct within a call
        assert all(100 <= e["a"] <= 999 and 100 <= e["b"] <= 999 and e["answer"] == e["a"] + e["b"] for e in first)
    with pytest.raises(ValueError):
        TASK.generate("validation", 1, 0)


def test_train_and_test_are_disjoint_even_with_operands_swapped():
    train = {frozenset((e["a"], e["b"])) for seed in range(3) for e in TASK.generate("train", 3000, seed)}
    test = {frozenset((e["a"], e["b"])) for seed in range(3) for e in TASK.generate("test", 1000, seed)}
    assert train and test and not train & test
    assert all(arith.split_of(a, b) == arith.split_of(b, a) for a, b in [(347, 285), (100, 999), (512, 511)])
    # the test split is ~10% of all pairs, and every carry count occurs in it
    assert 0.08 < len(test) / (len(test) + len(train)) < 0.4
    assert {TASK.subset(e) for e in TASK.generate("test", 400, 0)} == {f"carries{k}" for k in range(4)}


def test_split_sizes_are_the_counted_pairs():
    """The sizes that --train_size / --eval_size are checked against before anything loads."""
    pairs = [(a, b) for a in range(arith.LOW, arith.HIGH + 1) for b in range(arith.LOW, arith.HIGH + 1)]
    test = sum(arith.split_of(a, b) == "test" for a, b in pairs)
    assert arith.SPLIT_SIZES == {"train": len(pairs) - test, "test": test} and TASK.size("test") == test
    with pytest.raises(ConfigError, match="the arith test split has 80,773 distinct problems, asked for 80,774"):
        TASK.generate("test", test + 1, 0)


def test_score_grades_only_the_final_answer():
    example = arith.make_example(347, 285)
    right = "7+5+0=12|4+8+1=13|3+2+1=06|>0632"
    assert TASK.score(right, example) == 1.0
    assert TASK.score(right + "<|im_end|>", example) == 1.0  # EOS decoded as text
    assert TASK.score(right + "<|im_end|>9+9=>1", example) == 1.0  # anything after EOS is ignored
    assert TASK.score(" " + right + "\n", example) == 1.0
    assert TASK.score(">632", example) == 1.0  # steps are not graded ...
    assert TASK.score("1+1+1=99|>0632", example) == 1.0  # ... even when wrong
    for wrong in ["7+5+0=12|4+8+1=13|3+2+1=06|>0633", ">0000", ">1632"]:
        assert TASK.score(wrong, example) == 0.0
    for malformed in [
        "",
        "0632",
        "7+5+0=12|4+8+1=13|3+2+1=06|",
        ">",
        ">06x2",
        ">0632|",
        ">0632>",
        ">00632",
        ">-632",
        ">06 32",
        "7+5+0=12|4+8+1=13|3+2+1=06|>06",
    ]:
        assert TASK.score(malformed, example) == 0.0, malformed


def test_solution_round_trips_through_score():
    examples = TASK.generate("train", 300, 1) + TASK.generate("test", 300, 1)
    for example in examples:
        assert TASK.score(arith.solution(example), example) == 1.0
        other = arith.make_example(example["a"], 100 if example["b"] != 100 else 101)
        assert TASK.score(arith.solution(other), example) == 0.0
        assert len(arith.solution(example)) == 32


# ---- the demo tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_covers_every_prompt_and_solution_character():
    tokenizer = recipe.demo_tokenizer()
    assert len(tokenizer) == 17 and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    vocab = tokenizer.get_vocab()
    examples = TASK.generate("train", 200, 0) + TASK.generate("test", 200, 0)
    for example in examples:
        text = TASK.prompt(example) + arith.solution(example)
        assert set(text) <= set(vocab)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert set(arith.ALPHABET) == {c for e in examples for c in TASK.prompt(e) + arith.solution(e)}


def test_raw_chat_template_renders_the_bare_prompt():
    tokenizer = recipe.demo_tokenizer()
    messages = [{"role": "user", "content": "347+285="}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "347+285="
    assert recipe.render_prompt(tokenizer, "347+285=") == "347+285="
    full = messages + [{"role": "assistant", "content": ">0632"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == "347+285=>0632<|im_end|>"


def test_sft_batch_masks_the_prompt_and_ends_with_eos():
    tokenizer = recipe.demo_tokenizer()
    example = arith.make_example(347, 285)
    input_ids, attention_mask, labels = sft.sft_batch(tokenizer, [example])
    assert tokenizer.decode(input_ids[0]) == "347+285=7+5+0=12|4+8+1=13|3+2+1=06|>0632<|im_end|>"
    assert (labels[0, :8] == -100).all() and (labels[0, 8:] == input_ids[0, 8:]).all()
    assert attention_mask.all()


# ---- prepare_demo ---------------------------------------------------------------------------------------


def test_prepare_demo_builds_loadable_dirs_and_reuses_the_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = cache.prepare_demo(tmp_path, seed=0, progress=False, recipe=MINI)
    assert set(paths) == {"student", "teacher"}
    sizes = {}
    for role, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "qwen3" and (path / "model.safetensors").is_file()
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 0
        assert (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "1+2="}], add_generation_prompt=True, tokenize=False
            )
            == "1+2="
        )
        sizes[role] = recipe.count_parameters(model)
    assert sizes["teacher"] > sizes["student"]
    info = cache.demo_info(paths)
    assert info["recipe"] == dataclasses.asdict(MINI) and info["teacher"]["parameters"] == sizes["teacher"]
    assert 0.0 <= info["student"]["heldout_sampled_t1"] <= 1.0
    # a student target of 0 is met at the first check: the student's SFT stops after one of its two steps
    assert info["teacher"]["sft_steps"] == 3 and info["student"]["sft_steps"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the temporary build dir is gone

    # Second call: served from the cache, no training.
    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache was complete")

    monkeypatch.setattr(cache, "train_sft", no_training)
    assert cache.prepare_demo(tmp_path, seed=0, progress=False, recipe=MINI) == paths

    # A recipe change (or a seed change) trains anew, into a different dir.
    calls = []
    monkeypatch.setattr(cache, "train_sft", lambda *args, **kwargs: calls.append(args[2].steps) or [0.0])
    changed = dataclasses.replace(MINI, student_sft=dataclasses.replace(MINI.student_sft, steps=1))
    other = cache.prepare_demo(tmp_path, seed=0, progress=False, recipe=changed)
    assert other["student"] != paths["student"] and calls == [3, 1]
    assert json.loads((other["student"].parent / "demo.json").read_text())["recipe"]["student_sft"]["steps"] == 1
    cache.prepare_demo(tmp_path, seed=1, progress=False, recipe=changed)
    assert calls == [3, 1, 3, 1]


def test_an_interrupted_build_leaves_no_cache_that_is_reused(tmp_path, monkeypatch):
    real = sft.train_sft

    def dies_on_the_student(model, tokenizer, spec, seed, progress=True, desc="", **kwargs):
        if "student" in desc:
            raise KeyboardInterrupt
        return real(model, tokenizer, spec, seed, progress, desc, **kwargs)

    monkeypatch.setattr(cache, "train_sft", dies_on_the_student)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare_demo(tmp_path, progress=False, recipe=MINI)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(cache, "train_sft", real)
    stale = tmp_path / f".arith-{recipe.recipe_key(MINI, 0)}.tmp-999999"  # as a SIGKILLed build leaves it
    (stale / "teacher").mkdir(parents=True)
    paths = cache.prepare_demo(tmp_path, progress=False, recipe=MINI)
    assert not stale.exists()
    assert (paths["student"] / "model.safetensors").is_file() and (paths["teacher"] / "model.safetensors").is_file()


def test_sft_reduces_the_loss():
    tokenizer = recipe.demo_tokenizer()
    model = recipe.build_model(MINI.student, tokenizer, seed=0)
    losses = sft.train_sft(
        model, tokenizer, recipe.SFTSpec(steps=30, batch_size=16, lr=1e-2, warmup_steps=2), seed=0, progress=False
    )
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5]) and not model.training


def test_sft_stops_early_when_told():
    tokenizer = recipe.demo_tokenizer()
    model = recipe.build_model(MINI.student, tokenizer, seed=0)
    checks = []
    losses = sft.train_sft(
        model,
        tokenizer,
        recipe.SFTSpec(steps=20, batch_size=4),
        seed=0,
        progress=False,
        stop=lambda m: checks.append(m.training) or len(checks) == 2,
        check_every=3,
    )
    assert len(losses) == 6 and checks == [False, False] and not model.training


def test_evaluate_accuracy_matches_one_by_one_generation(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    paths = cache.prepare_demo(tmp_path, progress=False, recipe=dataclasses.replace(MINI, eval_examples=0))
    tokenizer = recipe.demo_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(paths["student"])
    examples = TASK.generate("test", 6, 0)
    # Prompts of different lengths exercise the left padding (arith prompts all have 8 characters).
    prompts = {id(e): TASK.prompt(e)[i:] for i, e in enumerate(examples)}
    monkeypatch.setattr(arith, "prompt", lambda e: prompts[id(e)])
    expected = []
    for example in examples:
        ids = tokenizer(prompts[id(example)], return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=recipe.MAX_NEW_TOKENS)
        expected.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    seen = []  # the scorer sees each completion with its example; every other one is "right"
    monkeypatch.setattr(arith, "score", lambda c, e: seen.append((c, e)) or float(len(seen) % 2))
    assert sft.accuracy(model, tokenizer, examples, greedy=True, batch_size=4) == 0.5
    assert seen == list(zip(expected, examples))
    seen.clear()
    assert sft.accuracy(paths["student"], None, examples, greedy=True) == 0.5
    assert seen == list(zip(expected, examples))
    assert tokenizer.padding_side == "right"  # restored after left-padded generation

    monkeypatch.setattr(arith, "score", lambda c, e: float(c == expected[examples.index(e)]))
    assert sft.accuracy(model, tokenizer, examples, greedy=True) == 1.0
    state = torch.random.get_rng_state()
    sampled = sft.accuracy(model, tokenizer, examples, greedy=False, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert sampled == sft.accuracy(model, tokenizer, examples, greedy=False, seed=3)
    assert sft.accuracy(model, tokenizer, [], greedy=True) == 0.0


# ---- the shipped build, each method's own dir, a resumed demo's summary, a model for vLLM --------------------------


def test_the_shipped_models_are_the_pinned_recipes_build_and_the_demo_loads_them(tmp_path, monkeypatch):
    """The package ships one build: the one the pinned recipe's key names, whose demo.json records that recipe, whose
    files SHA256SUMS pins (its own sum pinned in recipe.py), and which the demo loads without building anything."""
    import configparser
    import hashlib
    import shutil

    from transformers import AutoConfig

    from rlad_ds.cli import _model_paths
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.errors import ConfigError

    root = cache.SHIPPED_ROOT / f"arith-{recipe.recipe_key(recipe.DEFAULT_RECIPE, 0)}"
    assert sorted(cache.SHIPPED_ROOT.glob("arith-*")) == [root]
    info = json.loads((root / "demo.json").read_text())
    assert info["recipe"] == dataclasses.asdict(recipe.DEFAULT_RECIPE) and info["seed"] == 0
    assert info["format_version"] == recipe.FORMAT_VERSION and info["tokenizer_size"] == 17
    sums = (root / cache.SUMS).read_text()
    assert hashlib.sha256(sums.encode()).hexdigest() == recipe.SHIPPED_SHA256SUMS
    listed = {line.split("  ", 1)[1] for line in sums.splitlines()}
    assert listed == {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != cache.SUMS}
    for role in ("student", "teacher"):
        spec, config = getattr(recipe.DEFAULT_RECIPE, role), AutoConfig.from_pretrained(root / role)
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
            spec.hidden,
            spec.layers,
            spec.heads,
        )
    # setup.cfg's package data takes every shipped file into a wheel.
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in setup["options.package_data"]["rlad_ds.demo"].split(",")]
    packaged = {p for pattern in patterns for p in cache.SHIPPED_ROOT.parent.glob(pattern) if p.is_file()}
    assert packaged == {p for p in root.rglob("*") if p.is_file()}

    # The demo (no --student) loads them, and builds nothing in the cache; --demo_build takes the cache's build.
    cfg, _ = parse_config(["--cache_dir", str(tmp_path)], profile=recipe.demo_profile)
    assert _model_paths(cfg) == (root / "student", root / "teacher") and not any(tmp_path.iterdir())
    built = tmp_path / "demo" / root.name
    shutil.copytree(root, built)  # stands for this machine's build, complete in the cache
    cfg, _ = parse_config(["--cache_dir", str(tmp_path), "--demo_build"], profile=recipe.demo_profile)
    assert _model_paths(cfg) == (built / "student", built / "teacher")
    with pytest.raises(ConfigError, match="--demo_build trains the built-in demo's models; with --student"):
        parse_config(["--student", "s", "--demo_build"], profile=recipe.demo_profile)

    # A damaged (or swapped) file is refused by name of the check, never loaded.
    monkeypatch.setattr(cache, "SHIPPED_ROOT", tmp_path / "shipped")
    shutil.copytree(root, tmp_path / "shipped" / root.name)
    weights = tmp_path / "shipped" / root.name / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ConfigError, match=r"shipped in .* are damaged or not the pinned ones \(sha256sum -c"):
        cache.prepare_demo(tmp_path / "cache", progress=False)


def test_each_methods_demo_has_its_own_default_output_dir(tmp_path, monkeypatch, no_init):
    """After the rlad demo, `--method grpo` (the README's next step) runs, in outputs/demo-grpo; an explicit
    --output_dir (flag or file) still wins."""
    from conftest import ReachedInit

    from rlad_ds.checkpoint.run_dir import run_identity
    from rlad_ds.cli import train_main
    from rlad_ds.config.parsing import parse_config

    def output_dir(*argv):
        return parse_config(list(argv), profile=recipe.demo_profile)[0].train.output_dir

    assert output_dir() == "outputs/demo" and output_dir("--method", "rlad") == "outputs/demo"
    assert [output_dir("--method", m) for m in ("grpo", "kdrl", "kd", "sft")] == [
        f"outputs/demo-{m}" for m in ("grpo", "kdrl", "kd", "sft")
    ]
    assert output_dir("--method", "grpo", "--output_dir", "mine") == "mine"
    (tmp_path / "run.yaml").write_text("loss:\n  method: grpo\ntrain:\n  output_dir: from_file\n")
    assert output_dir("--config", str(tmp_path / "run.yaml")) == "from_file"
    assert parse_config(["--student", "s", "--teacher", "t"], profile=recipe.demo_profile)[0].train.output_dir == (
        "outputs/rlad"
    )

    monkeypatch.chdir(tmp_path)
    small = ["--train_size", "64", "--eval_size", "4", "--report_to", "none"]
    small += ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json")]
    rlad = parse_config(small, profile=recipe.demo_profile)[0]
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "run_config.json").write_text(json.dumps(run_identity(rlad)))
    with pytest.raises(ReachedInit):  # not "holds a different run"
        train_main(["--method", "grpo", *small])


def test_resuming_a_finished_demo_keeps_the_student_before(tmp_path, capsys):
    """More steps for a finished demo resume it (no evaluation at step 0): summary.json keeps the initial student's
    accuracy from the run's metrics.jsonl instead of writing null."""
    from types import SimpleNamespace

    from rlad_ds.demo.summary import DemoSummary

    records = [{"step": 0, "eval_accuracy": 0.545}] + [{"step": s, "reward_mean": 0.5} for s in range(1, 81)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trainer = SimpleNamespace(
        models=SimpleNamespace(teacher_rollout=None),
        eval_examples=[{}] * 4,
        rank=0,
        method=SimpleNamespace(name="rlad"),
        step=80,
    )
    DemoSummary(tmp_path).on_train_end(trainer, {"eval_before": None, "eval_after": 0.9})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["student_before"] == 0.545 and summary["student_after"] == 0.9 and summary["steps"] == 80
    assert "| student before | 0.545 |" in capsys.readouterr().out


def test_one_command_makes_a_student_vllm_runs_and_says_how_to_train_it(tmp_path, no_init):
    """`python -m rlad_ds.demo --vllm` builds VLLM_RECIPE (the demo's student with head size 32, which vLLM's CPU
    attention runs) and prints `demo_command`: the same path, on a recipe that trains in a second, reaches the
    process group with --rollout vllm."""
    from conftest import ReachedInit
    from transformers import AutoConfig

    from rlad_ds.cli import train_main
    from rlad_ds.rollout.vllm_engine import CPU_HEAD_SIZES, head_dim

    spec = recipe.VLLM_RECIPE.student
    assert spec.hidden // spec.heads in CPU_HEAD_SIZES and recipe.DEFAULT_RECIPE.student.hidden == spec.hidden
    mini = dataclasses.replace(
        MINI, student=recipe.ModelSpec(hidden=32, layers=1, heads=1, kv_heads=1, intermediate=32)
    )
    paths = cache.prepare_demo(tmp_path / "cache", progress=False, recipe=mini, shipped=False)
    assert head_dim(AutoConfig.from_pretrained(paths["student"])) == 32
    command = recipe.demo_command(paths, str(tmp_path / "out"), "--rollout", "vllm")
    assert command[:2] == ["deepspeed", "launchers/train.py"]
    with pytest.raises(ReachedInit):
        train_main([*command[2:], "--train_size", "64", "--eval_size", "4", "--report_to", "none"])
