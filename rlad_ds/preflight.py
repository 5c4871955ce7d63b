"""Everything a user can get wrong, checked before any process group or model exists: the same on every rank, so
that all ranks stop together with one line naming the fix (exit 2), in seconds. DeepSpeed is imported only by the
last check, its own model of the student's DeepSpeed JSON."""

from __future__ import annotations

import os
from pathlib import Path

from rlad_ds.distributed import env_world_size
from rlad_ds.errors import VLLM_INSTALL, ConfigError, error_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Generated problems are all made before the first step and held by every rank: about 0.5 KB (arith) to 5 KB
# (rg:knights_knaves) each, made at 43,000 (arith) to 280 (rg:knights_knaves) a second on one core here.
MAX_GENERATED = 1_000_000


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
    from rlad_ds.ds_validation import check_student_file, check_with_deepspeed
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
    check_student_file(cfg.deepspeed)
    check_generated_sizes(cfg, train=True)
    if cfg.is_demo:
        check_demo_can_write(cfg)
    else:  # the demo's models are built (or found in the cache) after these checks
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
    check_vllm_knobs(cfg, None if cfg.is_demo else cfg.model.student, cfg.rollout.group_size, beside_student=True)
    # The logger is built after the models; a missing package must not cost their loading first.
    package = cfg.train.report_to
    if package != "none" and importlib.util.find_spec(package) is None:
        other = "tensorboard or none" if package == "wandb" else "none"
        raise ConfigError(
            f"--report_to {package} needs the {package} package: pip install {package}, or pass --report_to {other}"
        )
    # Last: DeepSpeed's own config model is the one check here that imports DeepSpeed (seconds).
    check_with_deepspeed(cfg, world)


def check_demo_can_write(cfg) -> None:
    """Refuse a task whose generated prompts the demo's tokenizer (digits and `+=|>`) cannot write, before the demo
    builds its models: trained on prompts it cannot see, it ends at accuracy 0 and looks like a finished run."""
    from rlad_ds.data import load_examples, unwritable
    from rlad_ds.demo.recipe import demo_tokenizer
    from rlad_ds.tasks import get_task

    task = get_task(cfg.data.task, cfg.data.task_args)
    if cfg.data.dataset is not None or task.generate is None:  # rows of a file are checked one by one as they load
        return
    tokenizer = demo_tokenizer()
    template = cfg.data.prompt_template
    examples = load_examples(
        task,
        None,
        n=4,
        seed=cfg.train.seed,
        tokenizer=None if template else tokenizer,
        template=template,
        system_prompt=cfg.data.system_prompt,
    )
    problems = unwritable(tokenizer, [example.text for example in examples])
    if problems:
        raise ConfigError(
            f"the demo's {len(tokenizer)}-token tokenizer cannot write {task.name}'s prompts "
            f"({problems[min(problems)]}); "
            "the demo trains --task arith: give --student and --teacher model dirs for other tasks"
        )


def check_generated_sizes(cfg, train: bool) -> None:
    """Refuse more generated problems than MAX_GENERATED, or than the task has (`Task.size`), before any is made."""
    from rlad_ds.tasks import get_task

    task = get_task(cfg.data.task, cfg.data.task_args)
    if task.generate is None:
        return
    wanted = [("--train_size", cfg.data.train_size, "train")] if train and cfg.data.dataset is None else []
    if cfg.eval.eval_dataset is None and cfg.eval.eval_size:
        wanted.append(("--eval_size", cfg.eval.eval_size, "test"))
    for flag, count, split in wanted:
        if count > MAX_GENERATED:
            drawn = cfg.train.max_steps * cfg.train.prompts_per_step
            raise ConfigError(
                f"{flag} {count:,}: generated problems are all made before training and held in memory, at most "
                f"{MAX_GENERATED:,}; this run draws {drawn:,} prompts (--max_steps x --prompts_per_step)"
            )
        if task.size is not None and count > task.size(split):
            raise ConfigError(
                f"{flag} {count:,}: {task.name}'s {split} split has {task.size(split):,} distinct problems; "
                f"ask for at most that many"
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


def expected_device() -> str:
    """The device DeepSpeed's accelerator will choose (DS_ACCELERATOR, else CUDA where torch sees a GPU), known
    before DeepSpeed is imported."""
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_vllm_knobs(cfg, model_dir, group_rows: int, *, beside_student: bool) -> None:
    """What can be refused about vLLM without vLLM, where it may sample (`--rollout vllm`, or `auto` with vLLM
    installed): on CUDA beside a student (sleep mode), an allocator setting it cannot work with; on CPU, a KV cache
    larger than the machine or (from `model_dir`'s config.json; None: not built yet) smaller than one group of
    `group_rows` rows of the shortest prompt. The engine's start checks the rest with the real prompts."""
    import importlib.util

    rollout = cfg.rollout.rollout
    if rollout not in ("vllm", "auto") or importlib.util.find_spec("vllm") is None:
        return
    device = expected_device()
    if device == "cuda" and beside_student:
        _refuse_expandable_segments(rollout)
    elif device == "cpu":
        _check_cpu_kv_cache(cfg, model_dir, group_rows)


def _refuse_expandable_segments(rollout: str) -> None:
    # vLLM's sleep mode allocates through a pluggable-allocator memory pool, which PyTorch's expandable segments do
    # not support; vLLM 0.32 switches the process-wide setting off only while it allocates in that pool. Refused
    # here rather than switched off and on around each rollout, as verl does.
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        conf = os.environ.get(name, "")
        if "expandable_segments:true" in conf.replace(" ", "").lower():
            raise ConfigError(
                f"{name}={conf} is incompatible with vLLM's sleep mode (--rollout {rollout} beside the student); "
                f"remove expandable_segments:True from {name}, or pass --rollout gathered"
            )


def _check_cpu_kv_cache(cfg, model_dir, group_rows: int) -> None:
    from types import SimpleNamespace

    from rlad_ds.ds_config import resolve_precision
    from rlad_ds.models import kv_cache_bytes_per_token, read_model_config

    gib, max_new = cfg.rollout.vllm_kv_cache_gb, cfg.rollout.max_new_tokens
    ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if gib * 2**30 * ranks > memory:
        raise ConfigError(
            f"--vllm_kv_cache_gb {gib:g} for each of {ranks} rank(s) here is more than this machine's "
            f"{memory / 2**30:.0f} GiB of memory; lower --vllm_kv_cache_gb"
        )
    config = {} if model_dir is None else read_model_config(model_dir)
    # Layers that attend to a window (or none) keep less per token: only plain decoders are bounded here.
    if not config or set(config.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        return
    try:
        per_token = kv_cache_bytes_per_token(
            SimpleNamespace(**config), 2 if resolve_precision(cfg.model.precision, "cpu") == "bf16" else 4
        )
    except (AttributeError, TypeError, ZeroDivisionError):  # a config.json of another shape: the engine's start checks
        return
    holds, need = int(gib * 2**30 // per_token), group_rows * (1 + max_new)
    if holds < need:
        raise ConfigError(
            f"--vllm_kv_cache_gb {gib:g} holds {holds} tokens of this model's KV cache ({per_token} bytes each); one "
            f"group needs at least {group_rows} rows x (1 + --max_new_tokens {max_new}) = {need} tokens "
            f"({need * per_token / 2**30:.3g} GiB); raise --vllm_kv_cache_gb"
        )
