"""Everything a user can get wrong, checked before any process group or model exists: the same on every rank, so
that all ranks stop together with one line naming the fix (exit 2), in seconds, before DeepSpeed is imported."""

from __future__ import annotations

from pathlib import Path

from rlad_ds.distributed import env_world_size
from rlad_ds.errors import VLLM_INSTALL, ConfigError, error_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def checked_tokenizer(path, role: str, cfg):
    """The tokenizer of a model dir; one that transformers cannot read is a ConfigError naming the dir."""
    from rlad_ds.models import load_tokenizer

    # Checked first: transformers builds an (almost empty) tokenizer for a dir without these files, which
    # would surface later as a misleading tokenizer mismatch.
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{role} dir {path} has no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])}); save "
            f"the tokenizer there with tokenizer.save_pretrained"
        )
    try:
        return load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    except ConfigError:
        raise
    except Exception as error:  # a damaged file surfaces as OSError, ValueError, KeyError, tokenizers' own Exception
        raise ConfigError(
            f"{role} dir {path}: cannot load its tokenizer ({error_line(error)}); save it there with "
            f"tokenizer.save_pretrained"
        ) from None


def check_train_inputs(cfg) -> None:
    """Checks that need no model and no process group: the same on every rank, so all ranks stop together."""
    import importlib.util

    from rlad_ds.checkpoint.run_dir import check_output_dir
    from rlad_ds.ds_config import load_ds_config, require_zero_stage
    from rlad_ds.methods import get_method
    from rlad_ds.models import check_model_dir, check_vocab_sizes, prompt_budget, read_model_config
    from rlad_ds.sequence_parallel import check_config, check_heads

    world = env_world_size()
    check_config(cfg, world)
    if cfg.train.prompts_per_step % world:
        raise ConfigError(
            f"--prompts_per_step {cfg.train.prompts_per_step} does not divide by the {world} ranks; "
            f"use a multiple of {world}"
        )
    require_zero_stage(load_ds_config(cfg.deepspeed), 3, "student")
    if not cfg.is_demo:  # the demo's models are built (or found in the cache) after these checks
        check_model_dir(cfg.model.student, "student", cfg.model.trust_remote_code)
        check_heads(read_model_config(cfg.model.student), cfg.train.sequence_parallel_size, "student")
        prompt_budget(cfg.model.student, cfg.rollout.max_new_tokens, "student")
        method = get_method(cfg.loss.method)
        if cfg.model.teacher is not None:
            check_model_dir(cfg.model.teacher, "teacher", cfg.model.trust_remote_code)
            check_heads(read_model_config(cfg.model.teacher), cfg.train.sequence_parallel_size, "teacher")
            if method.needs_teacher:
                check_vocab_sizes(cfg.model.student, cfg.model.teacher, method.teacher_generates)
    check_writable(cfg.train.output_dir, "--output_dir", directory=True)
    check_output_dir(cfg)
    if cfg.rollout.rollout == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"--rollout vllm needs vLLM: {VLLM_INSTALL}; or pass --rollout auto")
    # The logger is built after the models; a missing package must not cost their loading first.
    package = cfg.train.report_to
    if package != "none" and importlib.util.find_spec(package) is None:
        other = "tensorboard or none" if package == "wandb" else "none"
        raise ConfigError(
            f"--report_to {package} needs the {package} package: pip install {package}, or pass --report_to {other}"
        )


def check_writable(path, flag: str, directory: bool) -> None:
    """Refuse an output path the run could not write when it gets there: a file where a directory goes (or the
    reverse), or a place this process cannot create files in. Writing is tried, not inferred from mode bits,
    which root ignores; the probe leaves no file behind."""
    import tempfile

    path = Path(path).expanduser()
    place = path.absolute() if directory else path.absolute().parent
    try:  # exists() raises too, where a parent cannot be searched
        if directory and path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is an existing file, not a directory; choose another {flag}")
        if not directory and path.is_dir():
            raise ConfigError(f"{flag} {path} is a directory; name a file to write, e.g. {path / 'results.json'}")
        while not place.exists():  # the nearest existing ancestor: the run creates the rest inside it
            place = place.parent
        if not place.is_dir():
            raise ConfigError(f"{flag} {path}: {place} is a file, not a directory; choose another {flag}")
        tempfile.TemporaryFile(dir=place, prefix=".rlad_write_probe_").close()
    except OSError as error:
        raise ConfigError(
            f"{flag} {path}: cannot create files in {place} ({error.strerror or error}); choose a writable {flag}"
        ) from None
