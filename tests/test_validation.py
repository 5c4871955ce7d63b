"""Bad input that used to get past start-up: wrong value types, non-finite numbers, unwritable outputs, missing
optional packages, unsafe or damaged model dirs, mismatched vocabularies, prompts longer than the context,
undecodable data files, hub names offline, and the README's eval command.

Each case ends in one line `rlad_ds: error: ...` with exit code 2 before any process group or model exists
(`deepspeed.init_distributed` is replaced by a sentinel, as in test_reliability.py); each has a control that
gets through.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
from conftest import ROOT, ReachedInit
from test_reliability import DS_CONFIG, base_args, expect_one_line, write_jsonl

from rlad_ds.cli import eval_main, train_main
from rlad_ds.config.parsing import SECTIONS, parse_config
from rlad_ds.errors import ConfigError

SHARD = "model-0000{}-of-00002.safetensors"


def _copy(src: Path, dst: Path, **config) -> Path:
    """A copy of a model dir, its config.json updated with `config`."""
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**data, **config}))
    return dst


@pytest.fixture(scope="module")
def dirs(tiny_models, tmp_path_factory):
    """Model dirs and data files that are each wrong in one way, and their controls."""
    root, student = tmp_path_factory.mktemp("validation"), tiny_models["student"]
    pickle_only = _copy(student, root / "pickle_only")
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")  # never unpickled by the check
    truncated = _copy(student, root / "truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:-100])
    for name, shards in (("missing_shard", (1, 2)), ("sharded", (1,))):
        sharded = _copy(student, root / name)
        (sharded / "model.safetensors").rename(sharded / SHARD.format(1))
        index = {"metadata": {}, "weight_map": {f"w{i}": SHARD.format(i) for i in shards}}
        (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    auto_map = {"AutoConfig": "modeling_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.MineLM"}
    _copy(student, root / "remote_code", model_type="mine", auto_map=auto_map)
    _copy(student, root / "auto_map_known_type", auto_map=auto_map)  # transformers' own qwen3 code is used
    (_copy(student, root / "config_not_json") / "config.json").write_text('{"model_type": "qwen3",')
    (_copy(student, root / "tokenizer_damaged") / "tokenizer.json").write_text('{"model": 3}')  # JSON, not a tokenizer
    _copy(student, root / "big_vocab", vocab_size=4096)
    _copy(student, root / "context_12", max_position_embeddings=12)
    _copy(student, root / "context_64", max_position_embeddings=64)
    write_jsonl(
        root / "long.jsonl",
        [{"prompt": "d1:"}, {"prompt": "d" * 80}, {"prompt": "d2:"}, {"prompt": "d3:"}, {"prompt": "d4:"}],
    )
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (root / "latin1.jsonl").write_bytes('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (root / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(f'{{"prompt": "d{i}:"}}\n' for i in range(4)).encode())
    (root / "a_file").write_text("not a directory")
    return root


def run_train(models, tmp_path, *flags, **replace):
    """train_main on base_args, with `replace` ({"student": path}) substituted for a flag's value."""
    args = base_args(models, tmp_path / "out", *flags)
    for name, value in replace.items():
        args[args.index(f"--{name}") + 1] = str(value)
    return train_main(args)


# ---- 1, 2, 9: value types, finite numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "word, flag, offload",
    [
        ("'false'", False, "off"),
        ("false", False, "off"),
        ("'No'", False, "off"),
        ("'0'", False, "off"),
        ("'TRUE'", True, "on"),
        ("yes", True, "on"),
        ("1", True, "on"),
    ],
)
def test_boolean_words_read_alike_in_files_and_flags(tmp_path, word, flag, offload):
    """A quoted "false" used to be refused, or worse, be taken as a non-empty (true) string somewhere."""
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  gradient_checkpointing: {word}\n  teacher_offload: {word}\n  pack_sequences: {word}\n")
    models = ["--student", "s", "--teacher", "t"]
    cfg, _ = parse_config(["--config", str(path), *models])
    assert (cfg.model.gradient_checkpointing, cfg.model.teacher_offload, cfg.model.pack_sequences) == (
        flag,
        offload,
        offload,
    )
    text = word.strip("'")
    cfg, _ = parse_config([*models, "--gradient_checkpointing", text, "--teacher_offload", text])
    assert (cfg.model.gradient_checkpointing, cfg.model.teacher_offload) == (flag, offload)


def test_boolean_flags_without_a_value_and_lr_as_yaml_text(tmp_path):
    assert parse_config(["--gradient_checkpointing"])[0].model.gradient_checkpointing is True
    assert parse_config(["--no-gradient_checkpointing"])[0].model.gradient_checkpointing is False
    assert parse_config([])[0].model.gradient_checkpointing is False
    assert (
        parse_config(["--student", "s", "--teacher", "t", "--teacher_offload", "AUTO"])[0].model.teacher_offload
        == "auto"
    )
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-6\n")  # YAML 1.1 reads it as the string "1e-6"
    assert parse_config(["--config", str(path)])[0].train.lr == 1e-6


FLOAT_FIELDS = sorted(
    f.name for cls in SECTIONS.values() for f in cls.__dataclass_fields__.values() if "float" in str(f.type)
)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_field_must_be_finite(name, value):
    with pytest.raises(ConfigError, match=f"^--{name} must be a finite number, got '{value}'$"):
        parse_config([f"--{name}={value}"])  # "=": argparse takes a bare -inf for an option


@pytest.mark.parametrize(
    "flags, piece",
    [
        (["--lr", "inf"], "--lr must be a finite number, got 'inf'"),
        (["--alpha", "nan"], "--alpha must be a finite number, got 'nan'"),
        (["--temperature", "inf"], "--temperature must be a finite number, got 'inf'"),
        (["--max_steps", "1.5"], "--max_steps must be int, got '1.5'"),
        (["--collective_timeout_s", "0"], "--collective_timeout_s must be > 0, got 0"),
    ],
)
def test_bad_numbers_are_one_line_before_any_model(flags, piece, tiny_models, tmp_path, no_init, capsys):
    expect_one_line(run_train(tiny_models, tmp_path, *flags), capsys.readouterr(), piece)


# ---- 3: output paths -----------------------------------------------------------------------------------------------


def test_output_dir_that_cannot_be_written(tiny_models, dirs, tmp_path, no_init, capsys):
    expect_one_line(
        run_train(tiny_models, tmp_path, output_dir=dirs / "a_file"),
        capsys.readouterr(),
        f"--output_dir {dirs / 'a_file'} is an existing file, not a directory",
    )
    expect_one_line(
        run_train(tiny_models, tmp_path, output_dir=dirs / "a_file" / "run"),
        capsys.readouterr(),
        f"{dirs / 'a_file'} is a file, not a directory",
    )
    # /proc takes no new files, for root too (root ignores the mode bits tried below).
    expect_one_line(
        run_train(tiny_models, tmp_path, output_dir="/proc/rlad_run/out"),
        capsys.readouterr(),
        "--output_dir /proc/rlad_run/out: cannot create files in /proc",
    )
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        expect_one_line(
            run_train(tiny_models, tmp_path, output_dir=locked / "run"),
            capsys.readouterr(),
            f"cannot create files in {locked}",
        )
    with pytest.raises(ReachedInit):  # the control: a dir several levels from being there
        run_train(tiny_models, tmp_path, output_dir=tmp_path / "a" / "b" / "run")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".rlad_write_probe_*"))


def eval_args(model, *extra):
    return [
        "--model",
        str(model),
        "--task",
        "toy_task:task",
        "--max_new_tokens",
        "12",
        "--eval_size",
        "4",
        "--param_persistence_threshold",
        "0",
        *map(str, extra),
    ]


def test_eval_output_is_checked_before_evaluating(tiny_models, tmp_path, no_init, capsys):
    model = tiny_models["student"]
    expect_one_line(
        eval_main(eval_args(model, "--output", tmp_path)),
        capsys.readouterr(),
        f"--output {tmp_path} is a directory; name a file to write",
    )
    expect_one_line(
        eval_main(eval_args(model, "--output", "/proc/rlad/results.json")),
        capsys.readouterr(),
        "--output /proc/rlad/results.json: cannot create files in /proc",
    )
    with pytest.raises(ReachedInit):
        eval_main(eval_args(model, "--output", tmp_path / "new" / "results.json"))


# ---- 4: optional packages --------------------------------------------------------------------------------------


def test_report_to_a_package_that_is_not_installed(tiny_models, tmp_path, no_init, capsys, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        expect_one_line(
            run_train(tiny_models, tmp_path, report_to="wandb"),
            capsys.readouterr(),
            "--report_to wandb needs the wandb package: pip install wandb, or pass --report_to tensorboard or none",
        )
    with pytest.raises(ReachedInit):  # installed here (a dependency of the package)
        run_train(tiny_models, tmp_path, report_to="tensorboard")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    expect_one_line(
        run_train(tiny_models, tmp_path, report_to="tensorboard"),
        capsys.readouterr(),
        "pip install tensorboard, or pass --report_to none",
    )


# ---- 5: model dirs ---------------------------------------------------------------------------------------------

MODEL_DIRS = {
    "pickle_only": (
        "has only pickled PyTorch weights (pytorch_model.bin); only safetensors are loaded. If you trust "
        'the file (unpickling can run code), convert it once: python -c "from transformers import'
    ),
    "truncated": "model.safetensors is not a whole safetensors file",
    "missing_shard": f"model.safetensors.index.json names {SHARD.format(2)}, which is missing (1 of 2 shards)",
    "remote_code": "model_type 'mine' is not one transformers",
    "config_not_json": "config.json is not valid JSON",
    "tokenizer_damaged": "cannot load its tokenizer (KeyError: 'added_tokens'); save it there with "
    "tokenizer.save_pretrained",
}


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("case", sorted(MODEL_DIRS))
def test_bad_model_dir_is_one_line(case, role, tiny_models, dirs, tmp_path, no_init, capsys):
    expect_one_line(
        run_train(tiny_models, tmp_path, **{role: dirs / case}),
        capsys.readouterr(),
        f"{role} dir {dirs / case}" if case != "config_not_json" else MODEL_DIRS[case],
    )
    capsys.readouterr()
    with pytest.raises(ConfigError, match=re.escape(MODEL_DIRS[case])):
        run_train(tiny_models, tmp_path, "--debug", **{role: dirs / case})


def test_remote_code_needs_the_flag_and_good_dirs_pass(tiny_models, dirs, tmp_path, no_init, capsys):
    expect_one_line(
        run_train(tiny_models, tmp_path, student=dirs / "remote_code"),
        capsys.readouterr(),
        f"student dir {dirs / 'remote_code'}: model_type 'mine' is not one transformers",
    )
    with pytest.raises(ReachedInit):
        run_train(tiny_models, tmp_path, "--trust_remote_code", student=dirs / "remote_code")
    for control in ("sharded", "auto_map_known_type"):
        with pytest.raises(ReachedInit):
            run_train(tiny_models, tmp_path, student=dirs / control)


def test_pickle_conversion_command_works_as_printed(dirs, tiny_models, tmp_path):
    """The command in the message converts the dir it names: run here, in this process to spare a Python start-up,
    on a real .bin written by torch."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlad_ds.models import check_model_dir

    model_dir = _copy(tiny_models["student"], tmp_path / "bin")
    (model_dir / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    with pytest.raises(ConfigError) as error:
        check_model_dir(model_dir)
    command = shlex.split(re.search(r"convert it once: (python -c \".*\")$", str(error.value)).group(1))
    assert command[:2] == ["python", "-c"]
    exec(command[2], {})
    assert check_model_dir(model_dir) == model_dir
    converted = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), converted.state_dict().values()))


# ---- 6: vocabulary sizes ---------------------------------------------------------------------------------------


def test_sampler_vocab_larger_than_the_scorers(tiny_models, dirs, tmp_path, no_init, capsys):
    size = json.loads((tiny_models["teacher"] / "config.json").read_text())["vocab_size"]
    expect_one_line(
        run_train(tiny_models, tmp_path, student=dirs / "big_vocab"),
        capsys.readouterr(),
        f"student vocab_size 4096 is larger than the teacher's {size} (config.json): the teacher cannot "
        f"score token ids the student may sample; resize the student's embeddings to {size}",
    )
    # sft: the teacher samples and the student scores.
    expect_one_line(
        run_train(tiny_models, tmp_path, "--method", "sft", teacher=dirs / "big_vocab"),
        capsys.readouterr(),
        f"teacher vocab_size 4096 is larger than the student's {size}",
    )
    with pytest.raises(ReachedInit):  # a larger scorer is fine
        run_train(tiny_models, tmp_path, teacher=dirs / "big_vocab")
    with pytest.raises(ReachedInit):
        run_train(tiny_models, tmp_path, "--method", "sft", student=dirs / "big_vocab")


# ---- 7: prompts and the context ---------------------------------------------------------------------------------


def test_max_new_tokens_alone_fills_the_context(tiny_models, dirs, tmp_path, no_init, capsys):
    expect_one_line(
        run_train(tiny_models, tmp_path, student=dirs / "context_12"),
        capsys.readouterr(),
        "--max_new_tokens 12 leaves no room for a prompt in the student's context of 12 tokens",
    )
    expect_one_line(
        eval_main(eval_args(dirs / "context_12")),
        capsys.readouterr(),
        "--max_new_tokens 12 leaves no room for a prompt in the model's context of 12 tokens",
    )


def _long_row_message(dirs, tiny_tokenizer):
    from rlad_ds.data import Renderer

    length = len(tiny_tokenizer(Renderer(tiny_tokenizer)("d" * 80), add_special_tokens=False)["input_ids"])
    return f"long.jsonl:2: the prompt is {length} tokens, more than the 52 that --max_new_tokens leaves"


def test_prompt_longer_than_the_context_in_evaluation(dirs, tiny_tokenizer, no_init, capsys, caplog):
    args = eval_args(dirs / "context_64", "--eval_dataset", dirs / "long.jsonl", "--eval_size", "none")
    expect_one_line(eval_main(args), capsys.readouterr(), _long_row_message(dirs, tiny_tokenizer))
    with pytest.raises(ReachedInit):
        eval_main(args + ["--skip_bad_rows"])
    assert "skipped 1 bad held-out rows" in caplog.text and "long.jsonl:2: the prompt is" in caplog.text
    with pytest.raises(ReachedInit):  # the generated held-out prompts fit
        eval_main(eval_args(dirs / "context_64"))


def test_prompt_budget_in_the_loaders(dirs, tiny_tokenizer):
    from rlad_ds.config.parsing import config_from_layers
    from rlad_ds.data import load_train_examples
    from rlad_ds.models import prompt_budget

    budget = prompt_budget(dirs / "context_64", 12)
    assert budget == 52 and prompt_budget(dirs / "sharded", 12) == 4096 - 12
    data = {"task": "toy_task:task", "dataset": str(dirs / "long.jsonl")}
    with pytest.raises(ConfigError, match=re.escape(_long_row_message(dirs, tiny_tokenizer))):
        load_train_examples(config_from_layers({"data": data}).data, tiny_tokenizer, max_prompt_tokens=budget)
    skipping = config_from_layers({"data": {**data, "skip_bad_rows": True}}).data
    examples = load_train_examples(skipping, tiny_tokenizer, max_prompt_tokens=budget)
    assert len(examples) == 4 and examples.skipped == 1
    generated = config_from_layers({"data": {"task": "toy_task:task", "train_size": 3}}).data
    with pytest.raises(ConfigError, match="generated train problem 1: the prompt is 28 tokens, more than the 20"):
        load_train_examples(generated, tiny_tokenizer, max_prompt_tokens=20)
    assert len(load_train_examples(data_cfg=generated, tokenizer=tiny_tokenizer, max_prompt_tokens=28)) == 3


def test_prompt_longer_than_the_context_in_training(tiny_models, dirs, tiny_tokenizer, tmp_path, no_init, capsys):
    rc = run_train(tiny_models, tmp_path, "--dataset", dirs / "long.jsonl", student=dirs / "context_64")
    expect_one_line(rc, capsys.readouterr(), _long_row_message(dirs, tiny_tokenizer))


def test_the_demo_prompts_fit_its_models(tmp_path, no_init):
    from rlad_ds.config.parsing import config_from_layers
    from rlad_ds.data import load_eval_examples, load_train_examples
    from rlad_ds.demo import cache, recipe
    from rlad_ds.models import prompt_budget

    student = cache.cache_dir() / f"arith-{recipe.recipe_key(recipe.DEFAULT_RECIPE, 0)}" / "student"
    if not (student / "config.json").is_file():
        pytest.skip("the demo's models are not built here (python -m rlad_ds.demo builds them, ~2 min)")
    cfg = config_from_layers(recipe.PROFILE)
    budget = prompt_budget(student, cfg.rollout.max_new_tokens, "student")
    tokenizer = recipe.demo_tokenizer()
    assert not load_train_examples(cfg.data, tokenizer, max_prompt_tokens=budget).skipped
    assert not load_eval_examples(cfg, tokenizer, max_prompt_tokens=budget).skipped
    with pytest.raises(ReachedInit):
        train_main(["--deepspeed", DS_CONFIG, "--output_dir", str(tmp_path / "demo"), "--report_to", "none"])


class BuildingTheDemo(Exception):
    """Raised instead of building (or loading) the demo's models: every check before them passed."""


@pytest.fixture
def no_demo_build(monkeypatch):
    from rlad_ds.demo import cache

    def refuse(*args, **kwargs):
        raise BuildingTheDemo

    monkeypatch.setattr(cache, "prepare_demo", refuse)


def demo_args(tmp_path, *flags):
    return ["--deepspeed", DS_CONFIG, "--output_dir", str(tmp_path / "demo"), "--report_to", "none", *flags]


def test_the_demo_refuses_a_task_its_tokenizer_cannot_write(tmp_path, no_init, no_demo_build, capsys):
    """Its 17-token tokenizer read "What is 3 + 4? Answer:" as "3+4": 60 steps at accuracy 0, exit 0."""
    expect_one_line(
        train_main(demo_args(tmp_path, "--task", "rg:basic_arithmetic")),
        capsys.readouterr(),
        "the demo's 17-token tokenizer cannot write rg:basic_arithmetic's prompts (it reads 'Calculate",
    )
    with pytest.raises(BuildingTheDemo):  # its own task goes on to the models
        train_main(demo_args(tmp_path))


@pytest.mark.parametrize(
    "flags, piece",
    [
        (["--train_size", "1000000"], "--train_size 1,000,000: arith's train split has 729,227 distinct problems"),
        (["--eval_size", "100000"], "--eval_size 100,000: arith's test split has 80,773 distinct problems"),
        (
            ["--task", "rg:basic_arithmetic", "--train_size", "100000000"],
            "--train_size 100,000,000: generated problems are all made before training and held in memory, at most "
            "1,000,000; this run draws 960 prompts",
        ),
    ],
)
@pytest.mark.timeout(45)  # generating 100,000,000 problems up front hung silently
def test_more_generated_problems_than_can_be_made(tmp_path, flags, piece, no_init, no_demo_build, capsys):
    expect_one_line(train_main(demo_args(tmp_path, *flags)), capsys.readouterr(), piece)


def test_a_prompt_the_tokenizer_cannot_write_is_a_bad_row(tiny_models, tmp_path, no_init, capsys):
    """The tiny models' tokenizer has printable ASCII only: a row with other characters would reach the model
    with them dropped."""
    rows = [{"prompt": f"digits {i}:"} for i in range(4)]
    path = write_jsonl(tmp_path / "accents.jsonl", rows[:1] + [{"prompt": "d\u00e9j\u00e0 9:"}] + rows[1:])
    rc, captured = run_train(tiny_models, tmp_path, "--dataset", path), capsys.readouterr()
    expect_one_line(rc, captured, f"{path}:2: the tokenizer cannot write this prompt: it reads 'tart|>user\\ndéjà 9:")
    assert (
        "back as 'tart|>user\\ndj 9:" in captured.err
        and "(it has no 'àé'); use a model whose tokenizer" in captured.err
    )
    with pytest.raises(ReachedInit):
        run_train(tiny_models, tmp_path, "--dataset", path, "--skip_bad_rows")


# ---- 8: data files -----------------------------------------------------------------------------------------------


def test_undecodable_data_files(tiny_models, dirs, tmp_path, no_init, capsys):
    expect_one_line(
        run_train(tiny_models, tmp_path, "--dataset", dirs / "binary.jsonl"),
        capsys.readouterr(),
        f"{dirs / 'binary.jsonl'}:1: not UTF-8 text (invalid start byte at byte 0); save the file as UTF-8",
    )
    expect_one_line(
        run_train(tiny_models, tmp_path, "--dataset", dirs / "latin1.jsonl"),
        capsys.readouterr(),
        "latin1.jsonl:3: not UTF-8 text",
    )
    with pytest.raises(ReachedInit):  # a UTF-8 byte-order mark is no bad row
        run_train(tiny_models, tmp_path, "--dataset", dirs / "bom.jsonl")


def test_hub_name_offline_fails_fast(tiny_models, tmp_path, no_init, capsys):
    start = time.perf_counter()
    rc = run_train(tiny_models, tmp_path, "--dataset", "math_train")
    expect_one_line(
        rc,
        capsys.readouterr(),
        "math_train: no such local file or directory, and the Hugging Face hub cannot be reached from here",
    )
    assert time.perf_counter() - start < 15  # datasets alone retries for ~25 s first


# ---- 10: the README's eval command -------------------------------------------------------------------------------


def test_the_readme_eval_command_parses(tmp_path, no_init, capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(deepspeed launchers/eval\.py .*?)\n```", text, re.S).group(1)
    args = shlex.split(block.replace("\\\n", " "))[2:]
    assert args[args.index("--model") + 1] and args[args.index("--output") + 1]
    args[args.index("--model") + 1] = str(tmp_path / "no_model")
    args[args.index("--output") + 1] = str(tmp_path / "kk.json")
    # Every flag and value was accepted: the first complaint is about the (absent) model.
    expect_one_line(eval_main(args), capsys.readouterr(), f"model dir {tmp_path / 'no_model'} does not exist")
