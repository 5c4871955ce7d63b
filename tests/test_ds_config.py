"""DeepSpeed JSON: loading errors, "auto" filling, stage checks, teacher inference configs, shipped files."""

import json

import pytest
import torch

from rlad_ds.ds_config import (CONFIG_DIR, dtype_of, fill_train_config, load_ds_config, require_zero_stage,
                               teacher_config)
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


def test_teacher_configs():
    offload = teacher_config(offload=True, world_size=2, micro_batch_size=3, device="cpu", persistence_threshold=0)
    assert offload["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert offload["train_batch_size"] == 6 and "optimizer" not in offload and offload["bf16"]["enabled"] is False
    plain = teacher_config(offload=False, world_size=2, micro_batch_size=3, device="cuda")
    assert "offload_param" not in plain["zero_optimization"] and plain["bf16"]["enabled"] is True
    # One file serves both: offload=False strips offload_param from the offload template.
    stripped = teacher_config(CONFIG_DIR / "teacher_offload.json", offload=False, world_size=1, micro_batch_size=1,
                              device="cpu")
    assert "offload_param" not in stripped["zero_optimization"]
    with pytest.raises(ConfigError, match="frozen"):
        teacher_config(load_ds_config(CONFIG_DIR / "zero3.json"), world_size=1, micro_batch_size=1, device="cpu")
