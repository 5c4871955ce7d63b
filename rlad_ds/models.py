"""Loading HF models and tokenizers: partitioned at construction, attention backend, tokenizer check."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from rlad_ds.errors import ConfigError, error_line

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("flash_attention_2", "sdpa", "eager", "flex_attention")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class TokenizerMismatchError(ConfigError):
    """Teacher and student tokenize differently, so the teacher's log-probs of student tokens are meaningless."""


def check_model_dir(path: str | Path, role: str = "model", trust_remote_code: bool = False) -> Path:
    """Refuse, before anything loads, a model dir that from_pretrained would fail on or load unsafely: missing, no
    or unreadable config.json, no safetensors weights (pickled .bin only), a truncated or missing weight file, or
    a model type whose code only the dir itself provides (unless `trust_remote_code`)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{role} dir {path} does not exist; point the {role} path at a Hugging Face model dir")
    config = read_model_config(path, role)
    _check_weights(path, role)
    _check_model_code(path, role, config, trust_remote_code)
    return path


def read_model_config(path: str | Path, role: str = "model") -> dict:
    """A model dir's config.json as a dict; missing or unreadable is a ConfigError naming the file."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(_without_config(Path(path), role))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
        raise ConfigError(
            f"{file} is not valid JSON ({str(error).splitlines()[0]}); save the model again with save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"{file} holds a {type(config).__name__}, not a JSON object; save the model again with save_pretrained"
        )
    return config


def _without_config(path: Path, role: str) -> str:
    """What to do about a dir without config.json: a training run's output dir, or a dir inside one (its
    checkpoints), holds its trained student in `student_hf/`; anything else must be saved with save_pretrained."""
    from rlad_ds.checkpoint.run_dir import EXPORT_DIR, RUN_RECORD

    for run in [path, *path.resolve().parents[:3]]:
        if not (run / RUN_RECORD).is_file():
            continue
        where = "a training run's output dir" if run == path else f"inside the training run {run} (a checkpoint)"
        if (run / EXPORT_DIR / "config.json").is_file():
            return (
                f"{role} dir {path} is {where}, not a model dir; its trained student is {run / EXPORT_DIR}: pass that"
            )
        return (
            f"{role} dir {path} is {where}, not a model dir; the run writes its trained student to "
            f"{run / EXPORT_DIR} when it ends: finish the run (its command again resumes it), then pass that"
        )
    return f"{role} dir {path} has no config.json; save the model with save_pretrained"


def _check_weights(path: Path, role: str) -> None:
    """Safetensors only (a .bin is a pickle: loading it can run code), every file named by the shard index
    present, and every file whole: a safetensors header (read here, no tensor loaded) must cover the file."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if (path / SAFETENSORS_INDEX).is_file():
        try:
            names = set(json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(
                f"{role} dir {path}: {SAFETENSORS_INDEX} is not a shard index (JSON with a "
                f"weight_map); save the model again with save_pretrained"
            ) from None
        missing = sorted(name for name in names if not (path / name).is_file())
        if missing:
            raise ConfigError(
                f"{role} dir {path}: {SAFETENSORS_INDEX} names {missing[0]}, which is missing "
                f"({len(missing)} of {len(names)} shards); copy the missing shards there"
            )
        files = [path / name for name in sorted(names)]
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            convert = f"M.from_pretrained({str(path)!r}, dtype='auto').save_pretrained({str(path)!r})"
            raise ConfigError(
                f"{role} dir {path} has only pickled PyTorch weights ({pickles[0]}); only safetensors "
                f"are loaded. If you trust the file (unpickling can run code), convert it once: python "
                f'-c "from transformers import AutoModelForCausalLM as M; {convert}"'
            )
        raise ConfigError(f"{role} dir {path} has no weights (*.safetensors); save the model with save_pretrained")
    for file in files:
        try:
            with safe_open(str(file), "numpy"):
                pass
        except (SafetensorError, OSError) as error:
            raise ConfigError(
                f"{role} dir {path}: {file.name} is not a whole safetensors file ({error}); it is "
                f"truncated or damaged: copy or download it again"
            ) from None


def _check_model_code(path: Path, role: str, config: dict, trust_remote_code: bool) -> None:
    """A model_type transformers does not know is built by code in the dir (`auto_map`), run only when trusted; a
    known one is built by transformers' own code, as from_pretrained does without trust_remote_code."""
    import transformers

    model_type = config.get("model_type")
    if model_type in transformers.CONFIG_MAPPING:
        return
    what = f"model_type {model_type!r} is not one transformers {transformers.__version__} knows"
    if "auto_map" not in config:
        raise ConfigError(
            f"{role} dir {path}: {what} and config.json has no auto_map naming model code; upgrade "
            f"transformers or use a supported model"
        )
    if not trust_remote_code:
        raise ConfigError(
            f"{role} dir {path}: {what}, so it runs the model code in that dir (config.json auto_map); "
            f"pass --trust_remote_code, only if you trust that code"
        )


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
        raise TokenizerMismatchError(f"teacher tokenizer has {len(teacher)} tokens, student has {len(student)}; {fix}")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(student, name) != getattr(teacher, name):
            raise TokenizerMismatchError(
                f"teacher {name}={getattr(teacher, name)} but student {name}={getattr(student, name)}; {fix}"
            )
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        token = next(
            t for t in student_vocab.keys() | teacher_vocab.keys() if student_vocab.get(t) != teacher_vocab.get(t)
        )
        raise TokenizerMismatchError(
            f"token {token!r} has id {student_vocab.get(token)} for the student and "
            f"{teacher_vocab.get(token)} for the teacher; {fix}"
        )


def check_vocab_sizes(student: str | Path, teacher: str | Path, teacher_generates: bool) -> None:
    """Refuse a sampling model whose vocab_size (config.json) exceeds the scoring model's: it samples token ids over
    its whole embedding, padding rows included, and the scorer's log-probs index its own, smaller one."""
    sizes = {
        role: read_model_config(path, role).get("vocab_size")
        for role, path in (("student", student), ("teacher", teacher))
    }
    sampler, scorer = ("teacher", "student") if teacher_generates else ("student", "teacher")
    if all(isinstance(size, int) for size in sizes.values()) and sizes[sampler] > sizes[scorer]:
        raise ConfigError(
            f"{sampler} vocab_size {sizes[sampler]} is larger than the {scorer}'s {sizes[scorer]} "
            f"(config.json): the {scorer} cannot score token ids the {sampler} may sample; resize the "
            f"{sampler}'s embeddings to {sizes[scorer]} (resize_token_embeddings, then save_pretrained)"
        )


def prompt_budget(path: str | Path, max_new_tokens: int, role: str = "model") -> int | None:
    """The most tokens a prompt may have for it and `max_new_tokens` to fit the model's context
    (max_position_embeddings in config.json); None when the config does not say."""
    context = read_model_config(path, role).get("max_position_embeddings")
    if not isinstance(context, int) or isinstance(context, bool):
        return None
    if max_new_tokens >= context:
        raise ConfigError(
            f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the {role}'s context of "
            f"{context} tokens (max_position_embeddings in {Path(path) / 'config.json'}); lower "
            f"--max_new_tokens below {context}"
        )
    return context - max_new_tokens


def flash_attention_unavailable_reason() -> str | None:
    """Why flash-attn cannot run here, or None. Found by importing it: a wheel built for another torch or CUDA is
    found by `find_spec` and then fails with undefined symbols, which would surface in `from_pretrained`."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401  the kernel packed sequences use
    except Exception as error:  # ImportError, OSError (undefined symbol), RuntimeError from its CUDA checks
        import torch

        return (
            f"flash-attn is installed but does not import ({error_line(error, 200)}); install a wheel built for "
            f"torch {torch.__version__}"
        )
    return None


def choose_attention(device: str, precision: str, override: str | None = None) -> str:
    """`override` (one of ATTENTION_BACKENDS) if given, else flash_attention_2 where flash-attn imports on CUDA and
    the weights are bf16 (its kernels have no fp32), else sdpa, with a warning saying why on CUDA."""
    if override == "flash_attention_2":
        why = f"it needs CUDA, this run is on {device}" if device != "cuda" else flash_attention_unavailable_reason()
        if why is not None:
            raise ConfigError(f"--attn_implementation flash_attention_2: {why}; choose sdpa or fix the install")
        if precision != "bf16":
            raise ConfigError(
                "--attn_implementation flash_attention_2 has no fp32 kernels; pass --precision bf16 or choose sdpa"
            )
    if override is not None:
        return override
    if device == "cuda" and precision == "bf16":
        why = flash_attention_unavailable_reason()
        if why is None:
            return "flash_attention_2"
        logger.warning("attention: sdpa, not flash_attention_2 (%s): no padding-free packing", why)
    return "sdpa"


def kv_cache_bytes_per_token(config, bytes_per_value: int) -> int:
    """Bytes of KV cache one token takes in a decoder: keys and values of every layer's KV heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per_value


def param_bytes(model) -> int:
    """The full (unpartitioned) size of a model's parameters in bytes, also under ZeRO-3."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += getattr(param, "ds_numel", param.numel()) * param.element_size()
    return total


def load_causal_lm(
    path: str | Path,
    ds_config: dict,
    *,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    trainable: bool = True,
    trust_remote_code: bool = False,
):
    """An HF causal LM built directly into ZeRO-3 partitions (no rank ever holds the whole model).

    `ds_config` is a filled config (see `rlad_ds.ds_config`); its precision sets the dtype. Pass the same
    dict to `deepspeed.initialize`. transformers' own DeepSpeed integration (`HfDeepSpeedConfig`) makes
    `from_pretrained` construct the model inside `deepspeed.zero.Init` and copy the checkpoint into the
    partitions. A frozen model (`trainable=False`) is in eval mode with `requires_grad` off.
    """
    import torch._dynamo  # noqa: F401  imported first: its import inside zero.Init fails (new_tensor signature)
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from rlad_ds.ds_config import dtype_of, require_zero_stage

    path = check_model_dir(path, trust_remote_code=trust_remote_code)
    require_zero_stage(ds_config, 3, "model")
    # transformers holds the HfDeepSpeedConfig by weak reference: it must live until loading ends, and is
    # unset after so that no global state leaks into the next model load.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype_of(ds_config),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model
