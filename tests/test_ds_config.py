"""DeepSpeed JSON: loading errors, "auto" filling, stage checks, teacher inference configs, shipped files."""

import json

import pytest
import torch

from rlad_ds.config.parsing import config_from_layers
from rlad_ds.ds_config import (
    CONFIG_DIR,
    dtype_of,
    fill_train_config,
    frozen_ds_config,
    inference_config,
    load_ds_config,
    require_zero_stage,
    student_ds_config,
)
from rlad_ds.errors import ConfigError

TRAIN = dict(world_size=2, micro_batch_size=4, gradient_accumulation_steps=3, lr=2e-6, gradient_clipping=1.0)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as error:
        load_ds_config(tmp_path / "nope.json")
    assert "\n" not in str(error.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": }')
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 1") as error:
        load_ds_config(bad)
    assert "\n" not in str(error.value)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_ds_config(bad)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json"])
def test_fill_student_config(name):
    source = load_ds_config(CONFIG_DIR / name)
    config = fill_train_config(CONFIG_DIR / name, device="cpu", persistence_threshold=0, **TRAIN)
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["optimizer"]["params"]["lr"] == 2e-6 and config["gradient_clipping"] == 1.0
    assert config["optimizer"]["params"]["weight_decay"] == 0.0
    assert config["bf16"]["enabled"] is False and dtype_of(config) == torch.float32
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "auto" not in json.dumps(config)
    assert load_ds_config(CONFIG_DIR / name) == source  # the file and its dict are untouched
    gpu = fill_train_config(source, device="cuda", **TRAIN)
    assert gpu["bf16"]["enabled"] is True and dtype_of(gpu) == torch.bfloat16
    assert gpu["zero_optimization"]["stage3_param_persistence_threshold"] == 1e5
    if name == "zero3_offload.json":
        assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
        assert gpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def test_fixed_values_must_agree():
    config = load_ds_config(CONFIG_DIR / "zero3.json")
    config["train_micro_batch_size_per_gpu"] = 4
    assert fill_train_config(config, device="cpu", **TRAIN)["train_micro_batch_size_per_gpu"] == 4
    config["train_batch_size"] = 10
    with pytest.raises(ConfigError, match="train_batch_size=10 but the trainer needs 24"):
        fill_train_config(config, device="cpu", **TRAIN)
    fp16 = load_ds_config(CONFIG_DIR / "zero3.json") | {"fp16": {"enabled": True}}
    with pytest.raises(ConfigError, match="fp16"):
        fill_train_config(fp16, device="cuda", **TRAIN)


def test_stage_three_required():
    config = load_ds_config(CONFIG_DIR / "zero3.json")
    config["zero_optimization"]["stage"] = 2
    with pytest.raises(ConfigError, match="ZeRO stage 2; set zero_optimization.stage to 3"):
        fill_train_config(config, device="cpu", **TRAIN)
    assert fill_train_config(config, device="cpu", require_stage3=False, **TRAIN)["train_batch_size"] == 24
    with pytest.raises(ConfigError, match="teacher"):
        require_zero_stage({}, 3, "teacher")


def test_inference_configs():
    offload = inference_config(offload=True, world_size=2, micro_batch_size=3, device="cpu", persistence_threshold=0)
    assert offload["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert offload["train_batch_size"] == 6 and "optimizer" not in offload and offload["bf16"]["enabled"] is False
    plain = inference_config(offload=False, world_size=2, micro_batch_size=3, device="cuda")
    assert "offload_param" not in plain["zero_optimization"] and plain["bf16"]["enabled"] is True
    # One file serves both: offload=False strips offload_param from the offload template.
    stripped = inference_config(
        CONFIG_DIR / "teacher_offload.json", offload=False, world_size=1, micro_batch_size=1, device="cpu"
    )
    assert "offload_param" not in stripped["zero_optimization"]
    with pytest.raises(ConfigError, match="frozen"):
        inference_config(load_ds_config(CONFIG_DIR / "zero3.json"), world_size=1, micro_batch_size=1, device="cpu")


def test_the_config_tree_reaches_the_deepspeed_json():
    """Weight decay, precision and the persistence threshold are config fields that reach every engine's JSON."""
    cfg = config_from_layers(
        {
            "train": {"lr": 3e-6, "weight_decay": 0.05, "grad_clip": 0.5},
            "model": {"precision": "bf16", "param_persistence_threshold": 7},
        }
    )
    student = student_ds_config(cfg, world_size=2, device="cpu")
    assert student["optimizer"]["params"]["weight_decay"] == 0.05 and student["optimizer"]["params"]["lr"] == 3e-6
    assert student["gradient_clipping"] == 0.5 and student["bf16"]["enabled"] is True  # bf16 on CPU when asked
    assert student["zero_optimization"]["stage3_param_persistence_threshold"] == 7
    frozen = frozen_ds_config(cfg, offload=True, world_size=2, device="cpu")
    assert frozen["bf16"]["enabled"] is True and frozen["zero_optimization"]["stage3_param_persistence_threshold"] == 7
    auto = config_from_layers({})
    assert student_ds_config(auto, 1, "cpu")["bf16"]["enabled"] is False  # auto: fp32 on CPU ...
    assert student_ds_config(auto, 1, "cuda")["bf16"]["enabled"] is True  # ... bf16 on accelerators
    assert student_ds_config(auto, 1, "cuda")["zero_optimization"]["stage3_param_persistence_threshold"] == 1e5
    fp32 = config_from_layers({"model": {"precision": "fp32"}})
    assert frozen_ds_config(fp32, False, 1, "cuda")["bf16"]["enabled"] is False


def test_a_fixed_weight_decay_that_disagrees_is_refused():
    config = load_ds_config(CONFIG_DIR / "zero3.json")
    config["optimizer"]["params"]["weight_decay"] = 0.0
    assert fill_train_config(config, device="cpu", **TRAIN)["optimizer"]["params"]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="weight_decay=0.0 but the trainer needs 0.1"):
        fill_train_config(config, device="cpu", weight_decay=0.1, **TRAIN)


def test_adamw_is_torchs_own_on_every_device_so_nothing_is_compiled():
    """The shipped config's AdamW runs as torch's (no FusedAdam JIT build, no build lock to leave behind), fused on
    CUDA; a config's own choice and an offloaded optimizer (DeepSpeed's CPUAdam) are left alone."""
    cpu = fill_train_config(CONFIG_DIR / "zero3.json", device="cpu", **TRAIN)["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu
    cuda = fill_train_config(CONFIG_DIR / "zero3.json", device="cuda", **TRAIN)["optimizer"]["params"]
    assert cuda["torch_adam"] is True and cuda["fused"] is True
    own = load_ds_config(CONFIG_DIR / "zero3.json")
    own["optimizer"]["params"]["torch_adam"] = False
    for device in ("cpu", "cuda"):
        params = fill_train_config(own, device=device, **TRAIN)["optimizer"]["params"]
        assert params["torch_adam"] is False and "fused" not in params
    offload = fill_train_config(CONFIG_DIR / "zero3_offload.json", device="cuda", **TRAIN)
    assert "torch_adam" not in offload["optimizer"]["params"]


def test_bf16_accumulates_gradients_in_fp32_unless_the_config_says_otherwise():
    bf16 = fill_train_config(CONFIG_DIR / "zero3.json", device="cuda", **TRAIN)
    assert bf16["bf16"]["enabled"] is True and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in fill_train_config(CONFIG_DIR / "zero3.json", device="cpu", **TRAIN)  # fp32 already
    own = {**load_ds_config(CONFIG_DIR / "zero3.json"), "data_types": {"grad_accum_dtype": "bf16"}}
    assert fill_train_config(own, device="cuda", **TRAIN)["data_types"] == {"grad_accum_dtype": "bf16"}


def test_the_cpu_student_engine_uses_torch_adamw(monkeypatch):
    """What DeepSpeed builds from that config: torch.optim.AdamW inside ZeRO-3 (FusedAdam would need the build)."""
    import deepspeed
    from conftest import free_port

    from rlad_ds.distributed import end_process_group, init_process_group

    for key, value in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    ).items():
        monkeypatch.setenv(key, value)
    init_process_group(60)
    try:
        config = fill_train_config(CONFIG_DIR / "zero3.json", device="cpu", **{**TRAIN, "world_size": 1})
        model = torch.nn.Linear(4, 4)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        assert type(engine.optimizer.optimizer) is torch.optim.AdamW
    finally:
        end_process_group()


def _zero(config):
    return config["zero_optimization"]


# DeepSpeed JSON that each ended in a traceback, several after the models loaded: (edit of zero3.json, the line).
BAD_DS_CONFIGS = {
    "stage_as_text": (lambda c: _zero(c).update(stage="three"), "zero_optimization.stage = 'three'"),
    "stage_3.9": (lambda c: _zero(c).update(stage=3.9), "zero_optimization.stage = 3.9"),
    "zero_as_a_number": (lambda c: c.update(zero_optimization=3), "zero_optimization must be a JSON object, got 3"),
    "optimizer_as_text": (lambda c: c.update(optimizer="adamw"), "optimizer must be a JSON object, got 'adamw'"),
    "optimizer_without_type": (lambda c: c["optimizer"].pop("type"), 'optimizer needs a "type" name'),
    "no_optimizer": (lambda c: c.pop("optimizer"), "has no optimizer section, and the trainer builds none"),
    "nvme_without_path": (
        lambda c: _zero(c).update(offload_param={"device": "nvme"}),
        'zero_optimization.offload_param offloads to nvme without "nvme_path"',
    ),
    "lamb_on_cpu": (
        lambda c: c["optimizer"].update(type="Lamb"),
        "DeepSpeed cannot build optimizer 'Lamb' on the cpu accelerator without zero_optimization.offload_optimizer; "
        "it builds adagrad, adam, adamw,",
    ),
    "no_such_optimizer": (lambda c: c["optimizer"].update(type="Adamm"), "optimizer type 'Adamm' is neither"),
    "untested_torch_optimizer": (
        lambda c: c["optimizer"].update(type="SGD", params={"lr": "auto", "weight_decay": "auto"}),
        '"zero_allow_untested_optimizer": true',
    ),
    "deepspeeds_own_model": (  # a misspelt key: DeepSpeed's pydantic model speaks
        lambda c: _zero(c).update(stage3_prefetch_bucket_sise=1),
        "zero_optimization.stage3_prefetch_bucket_sise: Extra inputs are not permitted (DeepSpeed's "
        "DeepSpeedZeroConfig)",
    ),
    "offload_device_unknown": (
        lambda c: _zero(c).update(offload_optimizer={"device": "gpu"}),
        "zero_optimization.offload_optimizer.device: Input should be 'none', 'cpu' or 'nvme'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DS_CONFIGS))
def test_bad_deepspeed_json_is_one_line_before_any_model(case, tiny_models, tmp_path, no_init, capsys):
    from test_reliability import base_args, expect_one_line

    from rlad_ds.cli import train_main

    edit, piece = BAD_DS_CONFIGS[case]
    config = load_ds_config(CONFIG_DIR / "zero3.json")
    edit(config)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    args = base_args(tiny_models, tmp_path / "out", "--deepspeed", path)
    expect_one_line(train_main(args), capsys.readouterr(), piece)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json"])
def test_the_shipped_deepspeed_json_passes_deepspeeds_own_checks(name, tiny_models, tmp_path, no_init):
    from conftest import ReachedInit
    from test_reliability import base_args

    from rlad_ds.cli import train_main

    with pytest.raises(ReachedInit):
        train_main(base_args(tiny_models, tmp_path / "out", "--deepspeed", CONFIG_DIR / name))
