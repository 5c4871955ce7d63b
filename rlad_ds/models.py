"""Loading HF models and tokenizers: partitioned at construction, attention backend, tokenizer check."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from rlad_ds.errors import ConfigError

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("flash_attention_2", "sdpa", "eager", "flex_attention")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class TokenizerMismatchError(ConfigError):
    """Teacher and student tokenize differently, so the teacher's log-probs of student tokens are meaningless."""


def check_model_dir(path: str | Path, role: str = "model") -> Path:
    """Refuse a model dir that is missing, has no config.json or has no weight files."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{role} dir {path} does not exist; point the {role} path at a Hugging Face model dir")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{role} dir {path} has no config.json; save the model with save_pretrained")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(f"{role} dir {path} has no weights (*.safetensors or *.bin); save the model with "
                          f"save_pretrained")
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of an HF model dir; a missing pad token falls back to EOS (generation needs one)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer dir {path} does not exist; point it at a Hugging Face model dir")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizers_match(student, teacher) -> None:
    """Refuse a teacher whose vocabulary or special token ids differ from the student's."""
    fix = "use a teacher that shares the student's tokenizer (same vocabulary and special tokens)"
    if len(student) != len(teacher):
        raise TokenizerMismatchError(f"teacher tokenizer has {len(teacher)} tokens, student has {len(student)}; "
                                     f"{fix}")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(student, name) != getattr(teacher, name):
            raise TokenizerMismatchError(f"teacher {name}={getattr(teacher, name)} but student "
                                         f"{name}={getattr(student, name)}; {fix}")
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        token = next(t for t in student_vocab.keys() | teacher_vocab.keys()
                     if student_vocab.get(t) != teacher_vocab.get(t))
        raise TokenizerMismatchError(f"token {token!r} has id {student_vocab.get(token)} for the student and "
                                     f"{teacher_vocab.get(token)} for the teacher; {fix}")


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(device: str, override: str | None = None) -> str:
    """`override` (one of ATTENTION_BACKENDS) if given, else flash_attention_2 where flash-attn imports on CUDA,
    else sdpa."""
    if override is not None:
        if override == "flash_attention_2" and not (device == "cuda" and flash_attention_available()):
            raise ConfigError("attention backend flash_attention_2 needs CUDA and the flash-attn package; "
                              "install flash-attn or choose sdpa")
        return override
    if device == "cuda" and flash_attention_available():
        return "flash_attention_2"
    if device == "cuda":
        logger.info("flash-attn is not installed: using sdpa attention (no padding-free packing)")
    return "sdpa"


def param_bytes(model) -> int:
    """The full (unpartitioned) size of a model's parameters in bytes, also under ZeRO-3."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += getattr(param, "ds_numel", param.numel()) * param.element_size()
    return total


def load_causal_lm(path: str | Path, ds_config: dict, *, attn_implementation: str = "sdpa",
                   gradient_checkpointing: bool = False, trainable: bool = True, trust_remote_code: bool = False):
    """An HF causal LM built directly into ZeRO-3 partitions (no rank ever holds the whole model).

    `ds_config` is a filled config (see `rlad_ds.ds_config`); its precision sets the dtype. Pass the same
    dict to `deepspeed.initialize`. transformers' own DeepSpeed integration (`HfDeepSpeedConfig`) makes
    `from_pretrained` construct the model inside `deepspeed.zero.Init` and copy the checkpoint into the
    partitions. A frozen model (`trainable=False`) is in eval mode with `requires_grad` off.
    """
    import torch._dynamo  # noqa: F401  imported before zero.Init: importing it inside fails (CPU-NOTES)
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from rlad_ds.ds_config import dtype_of, require_zero_stage

    path = check_model_dir(path)
    require_zero_stage(ds_config, 3, "model")
    # transformers holds the HfDeepSpeedConfig by weak reference: it must live until loading ends, and is
    # unset after so that no global state leaks into the next model load.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype_of(ds_config),
                                                     attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forwards never need a KV cache; generate passes use_cache=True
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model
