"""Model dirs, tokenizers and their match check, attention backend choice."""

import sys

import pytest

from rlad_ds.config.parsing import config_from_layers
from rlad_ds.errors import ConfigError
from rlad_ds.models import (
    TokenizerMismatchError,
    check_model_dir,
    check_tokenizers_match,
    choose_attention,
    flash_attention_unavailable_reason,
    load_tokenizer,
    param_bytes,
)
from rlad_ds.tiny import char_tokenizer


def test_model_dir_errors(tmp_path, tiny_models):
    assert check_model_dir(tiny_models["student"]) == tiny_models["student"]
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_dir(tmp_path / "missing", "teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"no weights \(\*.safetensors"):
        check_model_dir(tmp_path / "empty")


def test_load_tokenizer_and_match(tiny_models):
    student = load_tokenizer(tiny_models["student"])
    teacher = load_tokenizer(tiny_models["teacher"])
    assert student.pad_token_id == 0 and student.eos_token_id == 2
    check_tokenizers_match(student, teacher)


@pytest.mark.parametrize(
    "other",
    [
        char_tokenizer("abc"),  # different size
        char_tokenizer(
            "".join(reversed(char_tokenizer().convert_ids_to_tokens(list(range(3, 98)))))
        ),  # same size, ids moved
    ],
)
def test_tokenizer_mismatch_refused(tiny_tokenizer, other):
    with pytest.raises(TokenizerMismatchError, match="use a teacher that shares the student's tokenizer") as error:
        check_tokenizers_match(tiny_tokenizer, other)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


def test_special_token_mismatch_refused(tiny_tokenizer):
    other = char_tokenizer()
    other.eos_token = other.pad_token  # same vocabulary, different EOS id
    with pytest.raises(TokenizerMismatchError, match="eos_token_id"):
        check_tokenizers_match(tiny_tokenizer, other)


def test_building_the_models_refuses_a_teacher_with_another_tokenizer_first(tmp_path, monkeypatch):
    import deepspeed
    from tiny_models import save_tiny_model

    from rlad_ds.methods import get_method
    from rlad_ds.run_models import build_run_models

    teacher_dir = save_tiny_model(tmp_path / "teacher", "qwen3", char_tokenizer("xyz"), hidden=16, layers=1)
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(TokenizerMismatchError):  # refused before any model is loaded
        build_run_models(
            config_from_layers({}), get_method("rlad"), tmp_path / "no-student", teacher_dir, char_tokenizer()
        )


def test_attention_choice():
    assert choose_attention("cpu", "fp32") == "sdpa"
    expected = "flash_attention_2" if flash_attention_unavailable_reason() is None else "sdpa"
    assert choose_attention("cuda", "bf16") == expected and choose_attention("cuda", "fp32") == "sdpa"
    assert choose_attention("cpu", "fp32", "eager") == "eager"
    with pytest.raises(ConfigError, match="--attn_implementation 'xformers' is unknown"):  # validated by the config
        config_from_layers({"model": {"attn_implementation": "xformers"}})
    with pytest.raises(ConfigError, match="flash_attention_2 has no fp32 kernels; pass --precision bf16 or choose"):
        config_from_layers({"model": {"attn_implementation": "flash_attention_2", "precision": "fp32"}})
    with pytest.raises(ConfigError, match="flash_attention_2: it needs CUDA, this run is on cpu; choose sdpa"):
        choose_attention("cpu", "bf16", "flash_attention_2")


def test_a_flash_attn_built_for_another_torch_falls_back_to_sdpa(tmp_path, monkeypatch, caplog):
    """find_spec finds such a build; only importing it fails (undefined symbols), as from_pretrained would later."""
    broken = tmp_path / "flash_attn"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    why = flash_attention_unavailable_reason()
    assert why.startswith("flash-attn is installed but does not import (ImportError: flash_attn_2_cuda.so: undef")
    with caplog.at_level("WARNING", logger="rlad_ds"):
        assert choose_attention("cuda", "bf16") == "sdpa"
    assert "attention: sdpa, not flash_attention_2 (flash-attn is installed but does not import" in caplog.text
    with pytest.raises(ConfigError, match="does not import .* install a wheel built for torch"):
        choose_attention("cuda", "bf16", "flash_attention_2")


def test_param_bytes_counts_tied_weights_once(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from rlad_ds.tiny import tiny_config

    tied = AutoModelForCausalLM.from_config(
        tiny_config("qwen3", len(tiny_tokenizer), hidden=16, layers=1, tie_embeddings=True)
    )
    assert param_bytes(tied) == 4 * sum(p.numel() for p in tied.parameters())
