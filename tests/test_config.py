"""The one config tree: layers (defaults < profile < file < flags), value types, flags, the demo profile."""

import dataclasses
import json
from pathlib import Path

import pytest

from rlad_ds.config.parsing import SECTIONS, build_parser, parse_config
from rlad_ds.demo.recipe import PROFILE, demo_profile
from rlad_ds.errors import ConfigError
from rlad_ds.methods import METHODS


def test_every_field_is_one_flag_with_help_and_a_unique_name():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    help_text = build_parser("train").format_help()
    for name in names:
        if name != "eval_offload":  # launchers/eval.py's own
            assert f"--{name}" in help_text, name


def test_every_flag_reaches_the_script_through_the_deepspeed_launcher():
    """The launcher's own parser must not take any of our flags for one of its own (it rejected `--n`)."""
    from deepspeed.launcher.runner import parse_args

    flags = [
        action.option_strings[0]
        for parser in (build_parser("train"), build_parser("eval"))
        for action in parser._actions
        if action.option_strings and action.dest not in ("help", "local_rank")
    ]
    for flag in flags:
        user_args = [flag, "1"]
        assert parse_args(["launchers/train.py", *user_args]).user_args == user_args, flag


def test_the_demo_profile_sits_under_the_users_values():
    cfg, _ = parse_config(["--max_steps", "7", "--lr", "1e-6"], profile=PROFILE)
    assert cfg.is_demo and cfg.data.task == "arith" and cfg.train.prompts_per_step == 16
    assert cfg.rollout.max_new_tokens == 48 and cfg.train.output_dir == "outputs/demo"
    # The user's choices win, also where they equal the field's default (1e-6) and the profile says otherwise.
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-6
    models, _ = parse_config(["--student", "s", "--teacher", "t"], profile=PROFILE)
    assert models.data.task == "kk" and models.rollout.max_new_tokens == 2048  # no profile with models given


def test_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "train:\n  lr: 1e-6\n  max_steps: 9\nloss:\n  alpha: 0.3\neval:\n  eval_k: [1, 4]\n  eval_samples: 4\n"
    )
    cfg, _ = parse_config(["--config", str(path), "--max_steps", "3"])
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-6 as a string
    assert cfg.train.max_steps == 3 and cfg.loss.alpha == 0.3 and cfg.eval.eval_k == (1, 4)
    (tmp_path / "run.json").write_text(json.dumps({"model": {"precision": "bf16"}}))
    assert parse_config(["--config", str(tmp_path / "run.json")])[0].model.precision == "bf16"


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  max_steps: 1.5\n", "--max_steps must be int, got 1.5"),
        # 'false' and false are read as booleans now (tests/test_validation.py); other words are still refused.
        ("model:\n  gradient_checkpointing: 'maybe'\n", "--gradient_checkpointing must be true or false, got 'maybe'"),
        ("model:\n  teacher_offload: 2\n", "--teacher_offload must be auto, on or off, got 2"),
        ("train:\n  lr: fast\n", "--lr must be float, got 'fast'"),
        ("train:\n  lr: .inf\n", "--lr must be a finite number, got inf"),
        ("train: [1, 2]\n", "section train must be a mapping of field: value"),
        ("train: 3\n", "section train must be a mapping of field: value"),
        ("trainer:\n  lr: 1\n", "unknown section(s) ['trainer']"),
        ("train:\n  learning_rate: 1\n", "unknown field(s) ['learning_rate'] in section train"),
        ("[1, 2]\n", "must hold a mapping of sections"),
        ("eval:\n  eval_k: one\n", "--eval_k must be int, got 'one'"),
        ("rollout:\n  engine: vllm\n", "--engine was renamed --rollout (in a --config file: rollout: rollout: ...)"),
        ("deepspeed: null\n", "deepspeed must be the path of a DeepSpeed JSON file, got None"),
        ("deepspeed: 5\n", "deepspeed must be the path of a DeepSpeed JSON file, got 5"),
    ],
)
def test_wrong_values_in_a_file_are_one_line_naming_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", str(path)])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_steps", "x"], "--max_steps must be int, got 'x'"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--report_to", "none", "--teacher_log_ratio_clip", "none", "--dataset", "none"], None),
        (["--precision", "fp16"], "--precision 'fp16' is unknown"),
        (["--engine", "vllm"], "--engine was renamed --rollout"),
        (
            ["--rollout", "fast"],
            "--rollout 'fast' is unknown; use one of auto, vllm, hybrid_engine, gathered, per_layer",
        ),
        (["--eval_temperature", "-1"], "--eval_temperature must be >= 0"),
        (["--save_steps", "-2"], "--save_steps must be >= 0, or -1"),
        (["--seed", "99999999999999999999999"], r"--seed must be in 0\.\.4294967295, got 99999999999999999999999"),
        (["--seed", "-1"], r"--seed must be in 0\.\.4294967295"),
    ],
)
def test_flags(flags, message):
    if message is None:
        cfg, _ = parse_config(flags)
        # "none" is a value of a text field, and None for an optional one
        assert cfg.train.report_to == "none" and cfg.data.dataset is None and cfg.loss.teacher_log_ratio_clip is None
        return
    with pytest.raises(ConfigError, match=message):
        parse_config(flags)


def test_a_file_suffix_in_capitals_is_read_as_that_format(tmp_path):
    path = tmp_path / "upper.YAML"
    path.write_text("train:\n  lr: 1e-6\n  seed: 4294967295\n")  # YAML, not JSON
    cfg, _ = parse_config(["--config", str(path)])
    assert cfg.train.lr == 1e-6 and cfg.train.seed == 2**32 - 1
    (tmp_path / "upper.JSON").write_text('{"train": {"lr": 2e-6}, "deepspeed": "ds.json"}')
    cfg, _ = parse_config(["--config", str(tmp_path / "upper.JSON")])
    assert cfg.train.lr == 2e-6 and cfg.deepspeed == "ds.json"


def test_the_run_record_round_trips():
    from rlad_ds.checkpoint.run_dir import run_identity

    cfg, _ = parse_config(["--eval_k", "1", "--max_steps", "5"])
    other, _ = parse_config(
        ["--eval_k", "1", "--max_steps", "50", "--eval_steps", "3", "--rollout", "vllm", "--vllm_kv_cache_gb", "2"]
    )
    assert json.loads(json.dumps(run_identity(cfg))) == run_identity(other)  # resumable fields left out
    assert run_identity(cfg) != run_identity(parse_config(["--alpha", "0.2"])[0])


EXAMPLES = Path(__file__).resolve().parents[1] / "launchers" / "configs"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_has_an_example_config_that_loads(method, tiny_models, tmp_path, monkeypatch):
    """launchers/configs/<method>.yaml: read through the same parser as any --config file (a field its method would
    ignore is refused there), and with its model paths pointed at real dirs it passes every check before loading."""
    from rlad_ds.methods import get_method
    from rlad_ds.preflight import check_train_inputs

    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(METHODS)
    path = EXAMPLES / f"{method}.yaml"
    assert f"--config launchers/configs/{method}.yaml" in path.read_text()  # its own command line
    cfg, _ = parse_config(["--config", str(path)], profile=demo_profile)
    assert cfg.loss.method == method and not cfg.is_demo and cfg.train.output_dir == f"outputs/kk-{method}"
    assert (cfg.model.teacher is not None) == get_method(method).needs_teacher
    models = ["--student", str(tiny_models["student"])]
    models += ["--teacher", str(tiny_models["teacher"])] if cfg.model.teacher else []
    flags = [*models, "--max_new_tokens", "12", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_train_inputs(parse_config(["--config", str(path), *flags])[0])
