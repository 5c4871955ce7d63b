"""Starting vLLM beside a run: whether it can run here, how big it is sized, its log, and the one-line refusals.

- Availability (`vllm_unavailable_reason`): the installed build, the device, the model's architecture and (on CPU)
  its head size, told apart before any engine starts.
- Size (`engine_sizing`): from the run, not from the model's maximum context. `max_model_len` is the longest prompt
  in the run's data (`RolloutContext.prompt_tokens`, counted after data loading) plus `--max_new_tokens`; without
  it, the model's context (`max_position_embeddings`). `max_num_seqs` is the most rows one generate call submits on
  one rank; `max_num_batched_tokens` the prompt tokens of such a call, between `max_num_seqs` (a decode step
  schedules one token per running row) and `BATCHED_TOKENS_CAP`.
- Start (`start_llm`): vLLM's own sizing errors become one line naming this trainer's knob; a KV cache that cannot
  hold one group (group rows of `max_model_len` tokens each, as vLLM counts them) is refused; the engine-ready line
  states `max_model_len` and the KV cache's capacity in tokens. ZeRO-3's process-wide `F.linear` is swapped for
  torch's own while vLLM builds, profiles and (on CUDA) compiles and captures its forward
  (`rlad_ds.rollout.hf.plain_linear`).
- Log: vLLM logs at WARNING and above, less the warnings that describe how this trainer runs it on purpose
  (`QuietStartup`); everything else, and every error, still reaches the user.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlad_ds.errors import VLLM_INSTALL, ConfigError
from rlad_ds.rng import forked_rng
from rlad_ds.rollout.hf import plain_linear

logger = logging.getLogger(__name__)

# vLLM's CPU attention kernels (`CPUAttentionBackend.get_supported_head_sizes()` in vLLM 0.32; a test keeps the
# two equal). Kept here so that a model vLLM cannot run is told apart without importing vLLM (seconds per rank).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# vLLM 0.32's largest default max_num_seqs (the LLM class on GPUs of 70 GB or more): rows beyond it wait their turn.
MAX_SEQS_CAP = 1024
# vLLM 0.32's default max_num_batched_tokens on GPUs under 70 GB (verl's default too): the tokens of one engine step,
# which size the activations vLLM reserves at start-up. Chunked prefill splits longer prompt batches.
BATCHED_TOKENS_CAP = 8192


def head_dim(model_config) -> int:
    return getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads


class QuietStartup(logging.Filter):
    """Drops the vLLM warnings that describe how this trainer runs it on purpose (an in-process engine seeded per
    rank, eager mode, no Triton and no preloaded allocators on CPU, thread binding) and the reload's note on rotary
    embeddings, whose cache vLLM keeps (it has no weights to load); every other warning and every error passes."""

    EXPECTED = re.compile(
        r"global random seed is set|Enforce eager set|Inductor compilation was disabled|Triton is not installed"
        r"|Triton is installed, but doesn't include CPU backend|Model Runner V2 requires Triton"
        r"|is not found in LD_PRELOAD|doesn't allow to use `torch.set_num_threads`|sleep mode is not supported on CPU"
        r"|^\w*RotaryEmbedding: Failed to load weights$"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.EXPECTED.search(record.getMessage())


def quiet_vllm_logging() -> None:
    """Before vLLM is first imported: its log at WARNING (its INFO lines narrate every start, sleep and reload)
    through `QuietStartup`. vLLM 0.32 configures its logger when an engine starts, from the file named by
    `VLLM_LOGGING_CONFIG_PATH` (written here: vLLM's own format plus the filter); until then (its import) a plain
    handler with the same filter stands in. A level or a config file the user set is left alone."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")  # vLLM's use of deprecated torch APIs
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    vllm_logger = logging.getLogger("vllm")
    if not vllm_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.addFilter(QuietStartup())
        handler.setFormatter(logging.Formatter("(vLLM) %(levelname)s %(message)s"))
        vllm_logger.addHandler(handler)
        vllm_logger.setLevel(level)
        vllm_logger.propagate = False
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"quiet": {"()": f"{__name__}.QuietStartup"}},
        "formatters": {
            "vllm": {
                "()": "vllm.logging_utils.NewLineFormatter",
                "datefmt": "%m-%d %H:%M:%S",
                "format": "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s "
                "[%(fileinfo)s:%(lineno)d] %(message)s",
            }
        },
        "handlers": {
            "vllm": {
                "class": "logging.StreamHandler",
                "formatter": "vllm",
                "filters": ["quiet"],
                "level": level,
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }
    path = Path(tempfile.gettempdir()) / f"rlad_ds_vllm_logging_{os.getpid()}.json"
    path.write_text(json.dumps(config))
    atexit.register(path.unlink, missing_ok=True)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)


def vllm_unavailable_reason(model_config, device: str) -> str | None:
    """Why the installed vLLM cannot sample from this model on this device, or None if it can.

    The checks that need no vLLM import come first: importing it takes seconds, paid only when it will run.
    """
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed ({VLLM_INSTALL})"
    if device not in ("cuda", "cpu"):
        return f"rlad_ds runs vLLM on cuda and cpu only, not on {device}"
    if device == "cpu" and head_dim(model_config) not in CPU_HEAD_SIZES:
        return (
            f"vLLM's CPU attention supports head sizes {list(CPU_HEAD_SIZES)}; this model's is {head_dim(model_config)}"
        )
    quiet_vllm_logging()
    from vllm.platforms import current_platform

    if current_platform.device_type != device:
        return (
            f"the installed vLLM is a {current_platform.device_type or 'unknown-device'} build and this run "
            f"is on {device} ({VLLM_INSTALL})"
        )
    from vllm.model_executor.models.registry import ModelRegistry

    architectures = list(getattr(model_config, "architectures", None) or [])
    if not set(architectures) & set(ModelRegistry.get_supported_archs()):
        return f"vLLM {__import__('vllm').__version__} has no model class for {architectures or 'this model'}"
    return None


# ---- size ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSizing:
    """What vLLM is told to reserve for; None: vLLM's own default."""

    max_model_len: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    group_rows: int  # rows sampled from one prompt: one group must fit the KV cache
    group_flag: str = "--group_size"  # the flag that sets group_rows

    def llm_kwargs(self) -> dict:
        names = ("max_model_len", "max_num_seqs", "max_num_batched_tokens")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def engine_sizing(
    budget, max_new_tokens: int, context: int | None, group_rows: int, group_flag: str = "--group_size"
) -> EngineSizing:
    """vLLM's limits for a run whose generate calls carry at most `budget.rows_per_call` rows and prompts of at most
    `budget.prompt_tokens` tokens (`rlad_ds.rollout.registry.RolloutBudget`; None or unknown fields: the model's
    `context` bounds the prompt, vLLM's defaults the batch)."""
    prompt = getattr(budget, "prompt_tokens", None)
    if prompt is None and context is not None:
        prompt = context - max_new_tokens
    max_model_len = None if prompt is None else prompt + max_new_tokens
    if context is not None and max_model_len is not None:
        max_model_len = min(max_model_len, context)
    rows = getattr(budget, "rows_per_call", None)
    seqs = None if rows is None else max(1, min(rows, MAX_SEQS_CAP))
    tokens = None if seqs is None or prompt is None else max(seqs, min(seqs * max(prompt, 1), BATCHED_TOKENS_CAP))
    return EngineSizing(max_model_len, seqs, tokens, group_rows, group_flag)


# ---- start ---------------------------------------------------------------------------------------------------------


@contextmanager
def kept_process_state():
    """vLLM's worker seeds every generator and replaces torch.set_num_threads; the trainer's own stay as they were."""
    import numpy as np

    python_state, numpy_state, set_num_threads = random.getstate(), np.random.get_state(), torch.set_num_threads
    with forked_rng():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.set_num_threads = set_num_threads


# vLLM's own messages when the memory it was given cannot hold what it was asked to serve (vLLM 0.32:
# `_check_enough_kv_cache_memory`, `request_memory`, the CPU worker's `determine_available_memory`).
SIZING_ERRORS = re.compile(r"KV cache is needed|No available memory for the cache blocks|less than desired|kv cache")


def memory_knob(device: str, rollout_cfg) -> str:
    if device == "cuda":
        return f"--vllm_gpu_memory_utilization (now {rollout_cfg.vllm_gpu_memory_utilization:g})"
    return f"--vllm_kv_cache_gb (now {rollout_cfg.vllm_kv_cache_gb:g})"


@dataclass(frozen=True)
class KVCapacity:
    tokens: int  # blocks x block size
    rows: float  # requests of max_model_len tokens it holds at once (vLLM's own count, block rounding included)


def kv_capacity(llm) -> KVCapacity | None:
    """The started engine's KV cache: vLLM 0.32 records its blocks, block size and the requests of `max_model_len`
    it holds (`kv_cache_max_concurrency`, set by `update_kv_cache_capacity`) on its cache config after profiling."""
    config = llm.llm_engine.vllm_config
    cache = config.cache_config
    if not getattr(cache, "num_gpu_blocks", None):
        return None
    tokens = cache.num_gpu_blocks * cache.block_size
    rows = getattr(cache, "kv_cache_max_concurrency", None)
    return KVCapacity(tokens, rows if rows is not None else tokens / config.model_config.max_model_len)


def check_capacity(capacity: KVCapacity | None, sizing: EngineSizing, knob: str) -> None:
    if capacity is None or sizing.max_model_len is None or capacity.rows >= sizing.group_rows:
        return
    raise ConfigError(
        f"vLLM's KV cache holds {capacity.tokens} tokens, {capacity.rows:.2f} rows of max_model_len "
        f"{sizing.max_model_len}: fewer than one group of {sizing.group_rows} rows; raise {knob}, or lower "
        f"{sizing.group_flag} / --max_new_tokens"
    )


def start_llm(llm_kwargs: dict, sizing: EngineSizing, knob: str, on_started=lambda llm: None):
    """vLLM's `LLM(**llm_kwargs, **sizing)`, started with the trainer's random state and torch's own F.linear kept;
    a start that the memory knob cannot serve is a ConfigError naming `knob`, also when the engine came up with a KV
    cache too small for one group (`on_started(llm)` has run by then, so that it can be torn down in order).
    Returns (llm, seconds)."""
    quiet_vllm_logging()
    from vllm import LLM

    start = time.perf_counter()
    try:
        with kept_process_state(), plain_linear():
            llm = LLM(**llm_kwargs, **sizing.llm_kwargs())
    except ValueError as error:
        if not SIZING_ERRORS.search(str(error)):
            raise
        first = str(error).strip().split(". ")[0][:300]
        raise ConfigError(f"vLLM cannot start in the memory it was given ({first}); raise {knob}") from None
    seconds = time.perf_counter() - start
    on_started(llm)
    check_capacity(kv_capacity(llm), sizing, knob)
    # The engine's many long-lived objects would be re-scanned by every full garbage collection of the training
    # loop: move them (and everything before) out of the collector's generations.
    gc.collect()
    gc.freeze()
    return llm, seconds
