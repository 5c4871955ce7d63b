"""The vLLM rollout engine: a vLLM `LLM` inside every rank's own process, beside that rank's ZeRO-3 student, or
serving `launchers/eval.py` from a model dir on its own.

- Colocated and in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, vLLM's `external_launcher` backend over the
  ranks DeepSpeed started, tensor parallel size 1): each rank samples its own prompts, as with the other
  engines, and its weights can be handed to vLLM as tensors, with no disk and no server. Its start and size
  (`max_model_len` and batch limits from the run) are `rlad_ds.rollout.vllm_engine`'s.
- Weight sync: whenever the student's optimizer has stepped since the last sync (DeepSpeed's `global_steps`), or
  vLLM dropped its weights while asleep, the next rollout session (or the `sync_weights(step)` hook before it)
  gathers the ZeRO-3 partitions one decoder layer at a time and streams them into vLLM's in-place
  `reload_weights`, which processes each layer as it completes. A rank never holds more of the full model than
  one layer beyond vLLM's own copy. Entering a session is already a collective every rank makes (see
  `rlad_ds.generation`), so the gathers stay in step, and an evaluation after an update samples the updated
  weights too. From a model dir (`from_model_dir`) vLLM loads the real weights itself and never syncs.
- Memory on CUDA, beside the student: vLLM may take `--vllm_gpu_memory_utilization` of the device while awake and
  sleeps outside rollout sessions at `--vllm_sleep_level` (2: weights and KV cache dropped, since the next wake
  streams every weight in anyway; 1: weights kept in host memory). Waking follows the colocate order of TRL and
  verl: empty torch's cache (the training step's activation peak sits there, where vLLM's own allocator cannot
  reach it), wake the weights, stream the sync, empty the cache again (the gathered layers' copies), then wake
  the KV cache. On CPU (no sleep mode) the KV cache is `--vllm_kv_cache_gb`.
- ZeRO-3 replaces `F.linear` process-wide; vLLM's start-up (profiling, compilation, CUDA-graph capture), its
  generation and its weight loading run with torch's own (`rlad_ds.rollout.hf.plain_linear`).
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

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from deepspeed.runtime.rollout import RolloutEngine, RolloutRequest, SamplingConfig

from rlad_ds.distributed import before_end, world
from rlad_ds.errors import ConfigError
from rlad_ds.models import read_model_config
from rlad_ds.rollout.hf import plain_linear
from rlad_ds.rollout.output import finish_rollout
from rlad_ds.rollout.vllm_engine import engine_sizing, kv_capacity, memory_knob, start_llm, vllm_unavailable_reason

logger = logging.getLogger(__name__)
SLEEP_TAGS = ("weights", "kv_cache")  # vLLM's memory pools, in the order they wake


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


def empty_device_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


class VLLMRollout(RolloutEngine):
    """Sampling with a colocated vLLM engine whose weights follow the ZeRO-3 student's (or a model dir's)."""

    name = "vllm"
    collective_calls = False  # generate runs no collectives; only the weight sync at session entry does
    serves_frozen = False  # it follows a training engine's optimizer steps, or loads a model dir itself
    loads_model_dir = True  # launchers/eval.py's model: the real weights straight from the dir
    sampler_logprobs = True  # sampled rows carry vLLM's own log-probs of their tokens
    ds_config: dict = {}

    @staticmethod
    def unavailable_reason(model, device: str, rollout_cfg) -> str | None:
        return vllm_unavailable_reason(model.config, device)

    @staticmethod
    def model_dir_unavailable_reason(model_config, device: str, rollout_cfg) -> str | None:
        return vllm_unavailable_reason(model_config, device)

    @classmethod
    def from_run(cls, engine, tokenizer, model_path, rollout_cfg, seed: int, context=None):
        return cls(engine, tokenizer, model_path, rollout_cfg, seed=seed, context=context)

    @classmethod
    def from_model_dir(cls, model_path, tokenizer, rollout_cfg, seed: int, context, *, device: str, dtype):
        """vLLM alone, with the model dir's own weights (no ZeRO-3 engine, no sync, no sleep)."""
        return cls(None, tokenizer, model_path, rollout_cfg, seed=seed, context=context, device=device, dtype=dtype)

    def __init__(
        self, engine, tokenizer, model_path: Path, rollout_cfg, seed: int = 0, *, context=None, device=None, dtype=None
    ):
        """Beside `engine` (the student's ZeRO-3 engine: its device and dtype), or with `engine` None alone on
        `device` in `dtype` with the model dir's weights (`from_model_dir`)."""
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token")
        self.engine, self.tokenizer = engine, tokenizer
        self.device = engine.device.type if engine is not None else device
        dtype = next(engine.module.parameters()).dtype if engine is not None else dtype
        # Sleep mode only beside a student on CUDA (vLLM's CPU worker has none; eval.py's vLLM is alone).
        self.sleep_level = rollout_cfg.vllm_sleep_level if self.device == "cuda" and engine is not None else None
        self.synced_step: int | None = None
        self.sync_seconds = 0.0  # of the last sync that moved weights (benchmarks; the trainer times its own)
        self._in_session = False
        self._asleep: set[str] = set()
        self.llm = self._start(Path(model_path), rollout_cfg, seed, dtype, context)
        self._sleep()

    def _start(self, model_path: Path, cfg, seed: int, dtype, context):
        # In-process engine: the weights are loaded by reference; a spawned engine would need a copy through IPC.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        rank, world_size = world()
        for name, value in (
            ("RANK", rank),
            ("WORLD_SIZE", world_size),
            ("LOCAL_RANK", os.environ.get("LOCAL_RANK", 0)),
        ):
            os.environ.setdefault(name, str(value))
        group_rows = getattr(context, "group_rows", None) or cfg.group_size
        model_context = read_model_config(model_path).get("max_position_embeddings")
        sizing = engine_sizing(
            context,
            cfg.max_new_tokens,
            model_context if isinstance(model_context, int) else None,
            group_rows,
            "--group_size" if self.engine is not None else "--eval_samples",  # eval.py's groups are its samples
        )
        memory = (
            dict(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=self.sleep_level is not None)
            if self.device == "cuda"
            else dict(kv_cache_memory_bytes=int(cfg.vllm_kv_cache_gb * 2**30))
        )
        knob = memory_knob(self.device, cfg)
        llm, seconds = start_llm(
            dict(
                model=str(model_path),
                tokenizer=str(model_path),
                dtype=dtype,
                # Beside a student, dummy weights: the student's own arrive by the first sync, also after a resume.
                load_format="dummy" if self.engine is not None else "auto",
                seed=seed + rank,
                distributed_executor_backend="external_launcher" if world_size > 1 else None,
                tensor_parallel_size=1,
                enforce_eager=self.device == "cpu",
                disable_log_stats=True,
                trust_remote_code=bool(getattr(context, "trust_remote_code", False)),
                logprobs_mode="processed_logprobs",  # of the tempered, top-k / top-p distribution it samples
                **memory,
            ),
            sizing,
            knob,
            on_started=lambda started: before_end(lambda: self._shutdown_llm(started)),
        )
        self._log_ready(llm, seconds, dtype, knob)
        return llm

    def _log_ready(self, llm, seconds: float, dtype, knob: str) -> None:
        config, capacity = llm.llm_engine.vllm_config, kv_capacity(llm)
        logger.info(
            "rollout: vLLM %s engine ready in %.1f s (%s, %s): max_model_len %d, KV cache %s tokens (%s rows of "
            "max_model_len; %s), max_num_seqs %d%s",
            __import__("vllm").__version__,
            seconds,
            self.device,
            dtype,
            config.model_config.max_model_len,
            capacity and capacity.tokens,
            capacity and f"{capacity.rows:.1f}",
            knob,
            config.scheduler_config.max_num_seqs,
            f", sleep level {self.sleep_level}" if self.sleep_level else "",
        )

    # ---- memory: on CUDA beside a student, awake only inside rollout sessions ---------------------------------

    def _sleep(self) -> None:
        if self.sleep_level is not None and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = set(SLEEP_TAGS)
            if self.sleep_level == 2:
                self.synced_step = None  # the weights are gone: the next wake streams them all in again

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            # Memory torch's cache holds (the training step's activation peak, the sync's layer copies) is memory
            # vLLM's own allocator, outside torch's, cannot use.
            empty_device_cache(self.device)
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    # ---- weights -------------------------------------------------------------------------------------------

    def sync_weights(self, step: int | None = None) -> None:
        """Load the student's current weights into vLLM if its optimizer has stepped since the last load, or vLLM
        dropped them asleep; then vLLM is awake (weights first, KV cache after the sync).

        Collective (ZeRO-3 gathers): every rank calls it at the same point. `step` is the trainer's; the
        check uses DeepSpeed's own count of optimizer steps, so an extra call is free and none is missed.
        """
        if self.engine is None:  # weights from the model dir: nothing trains them
            return
        current = int(self.engine.global_steps)
        if current == self.synced_step:
            return
        start = time.perf_counter()
        self._wake("weights")
        with torch.no_grad(), plain_linear():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs=dict(weights_iterator=gathered_weights(self.engine.module), is_checkpoint_format=True),
            )
        self.synced_step = current
        self._wake("kv_cache")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.sync_seconds = time.perf_counter() - start

    @contextmanager
    def session(self):
        """vLLM awake, with the student's current weights, until the block ends (a collective to enter)."""
        if self._in_session:
            yield
            return
        self.sync_weights()
        for tag in SLEEP_TAGS:  # level 1 with no optimizer step since: the kept weights come back from host memory
            self._wake(tag)
        self._in_session = True
        try:
            with plain_linear():
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
        """End the engine (vLLM's own teardown; idempotent). That teardown ends torch's default process group too
        (vLLM's `cleanup_dist_env_and_memory`), so it comes last: `end_process_group` calls it after the ranks' last
        barrier."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            self._shutdown_llm(llm)

    @staticmethod
    def _shutdown_llm(llm) -> None:
        llm.llm_engine.engine_core.shutdown()
