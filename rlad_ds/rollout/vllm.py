"""The vLLM rollout engine: a vLLM `LLM` inside every rank's own process, beside that rank's ZeRO-3 student.

- Colocated and in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, vLLM's `external_launcher` backend over the
  ranks DeepSpeed started, tensor parallel size 1): each rank samples its own prompts, as with the other
  engines, and its weights can be handed to vLLM as tensors, with no disk and no server.
- Weight sync: whenever the student's optimizer has stepped since the last sync (DeepSpeed's
  `global_steps`), the next rollout session (or the `sync_weights(step)` hook before it) gathers the ZeRO-3
  partitions one decoder layer at a time and streams them into vLLM's in-place `reload_weights`, which
  processes each layer as it completes. A rank never holds more of the full model than one layer beyond
  vLLM's own copy. Entering a session is already a collective every rank makes (see `rlad_ds.generation`),
  so the gathers stay in step, and an evaluation after an update samples the updated weights too.
- Memory: on CUDA vLLM may take `--vllm_gpu_memory_utilization` of the device while awake, and sleeps
  outside rollout sessions (level 1: weights to host memory, KV cache dropped), so the student trains in the
  memory it had before. On CPU (no sleep mode) the KV cache is bounded by `--vllm_kv_cache_gb`.
- Sampling: each generate call maps `SamplingConfig` one to one onto vLLM's `SamplingParams`, with a seed
  drawn from torch's generator. Sampled (not greedy) rows come back with vLLM's log-prob of each token it drew,
  taken from the distribution it drew from (the engine's `logprobs_mode="processed_logprobs"`: after the
  temperature and top-k / top-p; the default raw mode would give the untempered log-probs), for the rollout
  correction (`rlad_ds.sampler_mismatch`). The trainer seeds that generator per rank, checkpoints restore it, and
  evaluation seeds it per problem, so vLLM's samples follow the same seeding as the HF rollouts' and a
  resumed run draws the same seeds.

The returned batch is the same `RolloutOutput` as every other rollout's (`rlad_ds.rollout.output`).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from deepspeed.runtime.rollout import RolloutEngine, RolloutRequest, SamplingConfig

from rlad_ds.distributed import world
from rlad_ds.errors import VLLM_INSTALL, ConfigError
from rlad_ds.rng import forked_rng
from rlad_ds.rollout.output import finish_rollout

logger = logging.getLogger(__name__)


def head_dim(model_config) -> int:
    return getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads


# vLLM's CPU attention kernels (`CPUAttentionBackend.get_supported_head_sizes()` in vLLM 0.32; a test keeps the
# two equal). Kept here so that a model vLLM cannot run is told apart without importing vLLM (seconds per rank).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


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
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
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


@contextmanager
def _kept_process_state():
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


def layer_groups(module: torch.nn.Module) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The model's named parameters in gather groups: one per decoder layer (`...layers.N.`), one per other
    parameter, in the model's own order."""
    groups, keys = [], {}
    for name, param in module.named_parameters():
        head, sep, tail = name.partition(".layers.")
        key = f"{head}.layers.{tail.split('.')[0]}" if sep else name
        if key not in keys:
            keys[key] = len(groups)
            groups.append([])
        groups[keys[key]].append((name, param))
    return groups


def gathered_weights(module: torch.nn.Module):
    """(name, full tensor) of every parameter, gathered from ZeRO-3 one group at a time (a collective on
    every rank). Each tensor is a copy, since vLLM may keep it until its layer is complete."""
    import deepspeed

    for group in layer_groups(module):
        with deepspeed.zero.GatheredParameters([p for _, p in group]):
            copies = [(name, p.detach().clone()) for name, p in group]
        yield from copies


class VLLMRollout(RolloutEngine):
    """Sampling with a colocated vLLM engine whose weights follow the ZeRO-3 student's."""

    name = "vllm"
    collective_calls = False  # generate runs no collectives; only the weight sync at session entry does
    serves_frozen = False  # its weights follow a training engine's optimizer steps
    sampler_logprobs = True  # sampled rows carry vLLM's own log-probs of their tokens
    ds_config: dict = {}

    @staticmethod
    def unavailable_reason(model, device: str, rollout_cfg) -> str | None:
        return vllm_unavailable_reason(model.config, device)

    @classmethod
    def from_run(cls, engine, tokenizer, model_path, rollout_cfg, seed: int):
        return cls(engine, tokenizer, model_path, rollout_cfg, seed=seed)

    def __init__(self, engine, tokenizer, model_path: Path, rollout_cfg, seed: int = 0):
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token")
        self.engine, self.tokenizer = engine, tokenizer
        self.device = engine.device.type
        self.synced_step: int | None = None
        self.sync_seconds = 0.0  # of the last sync that moved weights (benchmarks; the trainer times its own)
        self._in_session = False
        self.llm = self._start(model_path, rollout_cfg, seed)
        self._asleep = False
        self._sleep()

    def _start(self, model_path: Path, cfg, seed: int):
        # In-process engine: the weights are loaded by reference; a spawned engine would need a copy through IPC.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        rank, world_size = world()
        for name, value in (
            ("RANK", rank),
            ("WORLD_SIZE", world_size),
            ("LOCAL_RANK", os.environ.get("LOCAL_RANK", 0)),
        ):
            os.environ.setdefault(name, str(value))
        dtype = next(self.engine.module.parameters()).dtype
        memory = (
            dict(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=True)
            if self.device == "cuda"
            else dict(kv_cache_memory_bytes=int(cfg.vllm_kv_cache_gb * 2**30))
        )
        start = time.perf_counter()
        with _kept_process_state():
            # Dummy weights: the student's own arrive by the first sync, also after a resume.
            llm = LLM(
                model=str(model_path),
                tokenizer=str(model_path),
                dtype=dtype,
                load_format="dummy",
                seed=seed + rank,
                distributed_executor_backend="external_launcher" if world_size > 1 else None,
                tensor_parallel_size=1,
                enforce_eager=self.device == "cpu",
                disable_log_stats=True,
                trust_remote_code=False,
                logprobs_mode="processed_logprobs",  # of the tempered, top-k / top-p distribution it samples
                **memory,
            )
        # The engine's many long-lived objects would be re-scanned by every full garbage collection of the training
        # loop: move them (and everything before) out of the collector's generations.
        gc.collect()
        gc.freeze()
        logger.info(
            "rollout: vLLM %s engine ready in %.1f s (%s, %s)",
            __import__("vllm").__version__,
            time.perf_counter() - start,
            self.device,
            dtype,
        )
        return llm

    # ---- memory: awake only inside rollout sessions (CUDA) ----------------------------------------------------

    def _sleep(self) -> None:
        if self.device == "cuda" and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ---- weights -------------------------------------------------------------------------------------------

    def sync_weights(self, step: int | None = None) -> None:
        """Load the student's current weights into vLLM if its optimizer has stepped since the last load.

        Collective (ZeRO-3 gathers): every rank calls it at the same point. `step` is the trainer's; the
        check uses DeepSpeed's own count of optimizer steps, so an extra call is free and none is missed.
        """
        current = int(self.engine.global_steps)
        if current == self.synced_step:
            return
        start = time.perf_counter()
        self._wake()
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs=dict(weights_iterator=gathered_weights(self.engine.module), is_checkpoint_format=True),
            )
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.synced_step = current
        self.sync_seconds = time.perf_counter() - start

    @contextmanager
    def session(self):
        """vLLM awake, with the student's current weights, until the block ends (a collective to enter)."""
        if self._in_session:
            yield
            return
        self.sync_weights()
        self._wake()
        self._in_session = True
        try:
            yield
        finally:
            self._in_session = False
            self._sleep()

    # ---- sampling ------------------------------------------------------------------------------------------

    def sampling_params(self, sampling: SamplingConfig, **extra):
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0.0
        # ignore_eos: stop at the tokenizer's EOS only (stop_token_ids), as the HF rollouts do, not also at ids
        # the model's generation_config adds.
        # vLLM refuses n > 1 with greedy decoding: one greedy sample per prompt, repeated by `generate`.
        # logprobs=0: the sampled token's own log-prob only (none for greedy rows, which have no sampler ratio).
        extra = {"logprobs": None if greedy else 0, **extra}
        return SamplingParams(
            n=1 if greedy else sampling.n_samples_per_prompt,
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy or sampling.top_k <= 0 else sampling.top_k,
            seed=int(torch.randint(0, 2**31 - 1, ())),
            stop_token_ids=self._eos_ids(),
            ignore_eos=True,
            detokenize=False,
            skip_special_tokens=False,
            **extra,
        )

    def _eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def generate_raw(self, request: RolloutRequest, params) -> list:
        """vLLM's RequestOutputs for the request's prompts (padding stripped), in order."""
        prompts = [
            {"prompt_token_ids": ids[mask.bool()].tolist()}
            for ids, mask in zip(request.prompt_ids.cpu(), request.prompt_attention_mask.cpu())
        ]
        with self.session():
            return self.llm.generate(prompts, params, use_tqdm=False)

    @torch.no_grad()
    def generate(self, request: RolloutRequest, sampling: SamplingConfig):
        n = sampling.n_samples_per_prompt
        outputs = self.generate_raw(request, self.sampling_params(sampling))
        copies = n if sampling.temperature <= 0.0 else 1
        samples = [
            sample for out in outputs for sample in sorted(out.outputs, key=lambda s: s.index) for _ in range(copies)
        ]
        width = max(1, max(len(sample.token_ids) for sample in samples))
        pad = self.tokenizer.pad_token_id
        response_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        logprobs = torch.zeros(len(samples), width) if samples[0].logprobs is not None else None
        for row, sample in enumerate(samples):
            response_ids[row, : len(sample.token_ids)] = torch.tensor(sample.token_ids, dtype=torch.long)
            if logprobs is not None:  # one {token: Logprob} per position, holding the sampled token
                chosen = [entry[token].logprob for entry, token in zip(sample.logprobs, sample.token_ids)]
                logprobs[row, : len(chosen)] = torch.tensor(chosen)
        prompt_ids = request.prompt_ids.repeat_interleave(n, dim=0)
        output_ids = torch.cat([prompt_ids, response_ids.to(prompt_ids.device)], dim=1)
        if logprobs is not None:
            logprobs = logprobs.to(prompt_ids.device)
        return finish_rollout(request.prompt_attention_mask, output_ids, n, self._eos_ids(), pad, logprobs)

    def shutdown(self) -> None:
        del self.llm
