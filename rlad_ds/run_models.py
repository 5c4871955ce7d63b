"""The one place that builds a run's models from the config: the student (ZeRO-3 training engine and its rollout),
the frozen teacher and reference with their log-prob scorers, and the model `launchers/eval.py` evaluates (a rollout
that loads the model dir itself where one can, vLLM; else a frozen ZeRO-3 engine and a rollout over it).

What gets built follows the method object (`rlad_ds.methods`): a teacher only for methods that read or sample from
one, a reference only with `--beta_ref > 0`, old-policy scoring of the student always available. The rollout kind
comes from `rlad_ds.rollout.registry`, and learns what the run will ask of it (`rollout_context`: the longest prompt,
the rows of one generate call). Every scorer takes log-probs at the rollout temperature. The trainer, the
demo, the study and the benchmarks receive a `RunModels` and never build one themselves.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from rlad_ds.distributed import world
from rlad_ds.ds_config import frozen_ds_config, jit_built_ops, resolve_precision, student_ds_config
from rlad_ds.hygiene import announce_op_build
from rlad_ds.logprob_scorer import LogProbScorer
from rlad_ds.long_context import LongContext
from rlad_ds.models import check_tokenizers_match, choose_attention, load_causal_lm, load_tokenizer, read_model_config
from rlad_ds.rollout.registry import RolloutContext, choose_model_dir_rollout, choose_rollout
from rlad_ds.sequence_parallel import check_heads, init_sequence_group, install_attention


@dataclass
class RunModels:
    """Every model of a run, each with what the trainer calls on it."""

    student: object  # DeepSpeed's training engine (ZeRO-3) of the student
    student_rollout: object  # samples from the student (a RolloutEngine of rlad_ds.rollout)
    student_scorer: LogProbScorer  # the student with no grad: old-policy log-probs
    teacher_scorer: LogProbScorer | None = None
    teacher_rollout: object = None  # samples from the teacher (sft trains on them; the demo evaluates it)
    reference_scorer: LogProbScorer | None = None
    packed: bool = False  # micro-batches run padding-free
    long_context: LongContext = field(default_factory=LongContext)  # sequence parallelism, tiled MLPs, offload

    @property
    def device(self):
        return self.student.device


def _rows_per_call(problems: int, world_size: int, batch_size: int, samples: int) -> int:
    """Rows of one generate call on one rank: its shard of `problems`, `batch_size` at a time (0: all at once)."""
    shard = math.ceil(problems / world_size)
    return min(batch_size or shard, shard) * samples


def longest_prompt_tokens(tokenizer, records) -> int | None:
    """The most tokens any record's "prompt_text" takes, counted as generation tokenizes it (no special tokens
    added); None for no records."""
    if not records:
        return None
    return max(map(len, tokenizer([r["prompt_text"] for r in records], add_special_tokens=False)["input_ids"]))


def rollout_context(
    cfg, tokenizer=None, records=(), eval_problems: int = 0, *, evaluation_only: bool = False
) -> RolloutContext:
    """What the run will ask of its rollout: prompts no longer than the longest of `records` (every prompt the run
    samples from; none: not known), training calls of `--prompts_per_step` x `--group_size` rows over the ranks,
    evaluation calls over `eval_problems` problems x `--eval_samples` (`evaluation_only`: `launchers/eval.py`)."""
    prompt_tokens = longest_prompt_tokens(tokenizer, records) if tokenizer is not None else None
    world_size, batch = world()[1], cfg.rollout.rollout_batch_size
    rows = _rows_per_call(eval_problems, world_size, batch, cfg.eval.eval_samples) if eval_problems else 0
    if not evaluation_only:
        rows = max(rows, _rows_per_call(cfg.train.prompts_per_step, world_size, batch, cfg.rollout.group_size))
    return RolloutContext(
        prompt_tokens=prompt_tokens,
        rows_per_call=rows or None,
        group_rows=cfg.eval.eval_samples if evaluation_only else cfg.rollout.group_size,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def _device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _attention(cfg, device: str) -> str:
    override = cfg.model.attn_implementation
    return choose_attention(
        device, resolve_precision(cfg.model.precision, device), None if override == "auto" else override
    )


def load_frozen(
    path: str | Path,
    ds_config: dict,
    *,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    long_context: LongContext | None = None,
):
    """A frozen model as a ZeRO-3 inference engine (no optimizer), built partitioned, in eval mode; `ds_config`
    comes from `rlad_ds.ds_config.frozen_ds_config`."""
    import deepspeed

    model = load_causal_lm(
        path, ds_config, attn_implementation=attn_implementation, trainable=False, trust_remote_code=trust_remote_code
    )
    mpu = None
    if long_context is not None:
        long_context.prepare(model)
        mpu = long_context.group.mpu
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu)
    engine.eval()
    return engine


def _frozen_rollout(cfg, engine, tokenizer, device: str, role: str):
    rollout = choose_rollout("auto", engine.module, device, cfg.rollout, role=role, frozen=True)
    return rollout.from_run(engine, tokenizer, None, cfg.rollout, cfg.train.seed)


def _student(cfg, path: Path, device: str, world_size: int, attn: str, long_context: LongContext):
    """The student's ZeRO-3 training engine, built with the DeepSpeed-config patch of the rollout it will use, and
    that rollout's class (chosen before `deepspeed.initialize`: the patch changes how the engine is built)."""
    import deepspeed

    student_ds = student_ds_config(cfg, world_size, device)
    model = load_causal_lm(
        path,
        student_ds,
        attn_implementation=attn,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    rollout = choose_rollout(cfg.rollout.rollout, model, device, cfg.rollout)
    for builder, why in jit_built_ops(student_ds):  # compiled inside deepspeed.initialize, silently otherwise
        announce_op_build(builder, why)
    long_context.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config={**student_ds, **copy.deepcopy(rollout.ds_config)},
        mpu=long_context.group.mpu,
    )
    engine.train()  # from_pretrained leaves a model in eval mode, where transformers skips gradient checkpointing
    return engine, rollout


def _long_context(cfg, attn: str, tokenizer, paths) -> LongContext:
    """The run's sequence-parallel groups (DeepSpeed's, before any engine), attention wrapped for them, tiles and
    offload; head counts checked first (the demo's models are only known here)."""
    size = cfg.train.sequence_parallel_size
    for role, path in zip(("student", "teacher"), paths):
        if path is not None:
            check_heads(read_model_config(path, role), size, role)
    group = init_sequence_group(size)
    if size > 1:
        install_attention(attn, group)
    return LongContext(group, cfg.model.tiled_mlp_shards, cfg.model.offload_activations, tokenizer.pad_token_id)


def build_run_models(
    cfg, method, student_path: Path, teacher_path: Path | None, tokenizer, context: RolloutContext | None = None
) -> RunModels:
    """Every model `method` needs, partitioned over the ranks of the (initialised) process group; the student's
    rollout sized by `context` (`rollout_context`; None: from the config alone)."""
    if method.needs_teacher:  # first: the log-probs of student tokens under another vocabulary would be meaningless
        check_tokenizers_match(tokenizer, load_tokenizer(teacher_path, trust_remote_code=cfg.model.trust_remote_code))
    device, world_size = _device(), world()[1]
    attn = _attention(cfg, device)
    long_context = _long_context(cfg, attn, tokenizer, [student_path, teacher_path if method.needs_teacher else None])
    student, rollout = _student(cfg, student_path, device, world_size, attn, long_context)
    # Padding-free packing needs attention that honours per-sequence position ids: flash-attention's varlen
    # kernels on GPU (transformers' sdpa/eager masks also do, which is how CPU tests cover it).
    packed = cfg.model.pack_sequences == "on" or (cfg.model.pack_sequences == "auto" and attn == "flash_attention_2")
    scoring = dict(
        temperature=cfg.rollout.temperature,
        chunk_size=cfg.model.logprob_chunk_size or None,
        max_tokens_per_microbatch=cfg.train.micro_batch_tokens,
        packed=packed,
        long_context=long_context,
    )
    models = RunModels(
        student,
        rollout.from_run(
            student, tokenizer, student_path, cfg.rollout, cfg.train.seed, context or rollout_context(cfg)
        ),
        LogProbScorer(student, tokenizer, **scoring),
        packed=packed,
        long_context=long_context,
    )

    def frozen(path: Path, offload: bool) -> object:
        return load_frozen(
            path,
            frozen_ds_config(cfg, offload, world_size, device),
            attn_implementation=attn,
            trust_remote_code=cfg.model.trust_remote_code,
            long_context=long_context,
        )

    if method.needs_teacher:
        teacher = frozen(teacher_path, {"on": True, "off": False}.get(cfg.model.teacher_offload, device != "cpu"))
        models.teacher_scorer = LogProbScorer(teacher, tokenizer, **scoring)
        models.teacher_rollout = _frozen_rollout(cfg, teacher, tokenizer, device, "teacher")
    if cfg.loss.beta_ref > 0:
        models.reference_scorer = LogProbScorer(frozen(student_path, cfg.model.reference_offload), tokenizer, **scoring)
    return models


def build_eval_model(cfg, model_path: Path, tokenizer, context: RolloutContext | None = None):
    """`launchers/eval.py`'s model as (device, rollout): a rollout that loads the model dir itself when one is asked
    for or `--rollout auto` finds one that can serve it (vLLM: the real weights, loaded once, no ZeRO-3 engine);
    else a frozen ZeRO-3 inference engine and its rollout, from the same builders as the teacher's."""
    import torch
    from transformers import AutoConfig

    device = _device()
    context = context or rollout_context(cfg, evaluation_only=True)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    role = "evaluated model"
    loader = choose_model_dir_rollout(cfg.rollout.rollout, config, device, cfg.rollout, role=role)
    if loader is not None:
        dtype = torch.bfloat16 if resolve_precision(cfg.model.precision, device) == "bf16" else torch.float32
        rollout = loader.from_model_dir(
            model_path, tokenizer, cfg.rollout, cfg.train.seed, context, device=device, dtype=dtype
        )
        return torch.device("cpu"), rollout  # vLLM takes the prompts' token ids from host memory
    engine = load_frozen(
        model_path,
        frozen_ds_config(cfg, cfg.eval.eval_offload, world()[1], device),
        attn_implementation=_attention(cfg, device),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    rollout = choose_rollout(
        cfg.rollout.rollout, engine.module, device, cfg.rollout, role=role, frozen=True, model_dir_tried=True
    )
    return engine.device, rollout.from_run(engine, tokenizer, model_path, cfg.rollout, cfg.train.seed, context)
