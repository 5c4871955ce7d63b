"""The one configuration tree: its dataclasses, each field's default, help and validation.

Every field is a flag of the same name (`--alpha 0.3`, `--student PATH`) and a key of its section in a
`--config` file (`rlad_ds.config.parsing` reads both). Each field is validated once, in its group's
`__post_init__`; checks across groups that depend on the method are `rlad_ds.methods`'. Every mistake is a
one-line `ConfigError` that names the fix. The DeepSpeed JSON is built from this tree in `ds_config.py` only.

Both launchers read this tree: `launchers/train.py` every field, `launchers/eval.py` those marked `scope="both"`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rlad_ds.config.data_eval import DataConfig, EvalConfig
from rlad_ds.config.fields import Switch
from rlad_ds.config.fields import check as _check
from rlad_ds.config.fields import field_help as _help
from rlad_ds.loss_terms import KL_ESTIMATORS, LOSS_AGGS
from rlad_ds.methods import METHODS, check_config, get_method
from rlad_ds.models import ATTENTION_BACKENDS
from rlad_ds.rollout.registry import KINDS, ROLLOUT_CHOICES
from rlad_ds.sampler_mismatch import CORRECTION_CHOICES, PRESETS

ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)
# --seed reaches numpy (through vLLM), whose seeds are 32-bit; torch's and Python's take any of these too.
MAX_SEED = 2**32 - 1
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class ModelConfig:
    student: str | None = _help("student HF model dir; none = the built-in demo", default=None)
    teacher: str | None = _help(
        "teacher HF model dir (same tokenizer as the student), for methods with a teacher", default=None
    )
    precision: str = _help(
        "auto (bf16 on GPUs, fp32 on CPU), bf16 or fp32: weights and forward passes of every "
        "model; log-probs and losses are fp32 always",
        scope="both",
        default="auto",
    )
    attn_implementation: str = _help(
        "auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, eager, flash_attention_2, flex_attention",
        scope="both",
        default="auto",
    )
    gradient_checkpointing: bool = _help("recompute activations in backward (long responses)", default=False)
    offload_activations: bool = _help(
        "with --gradient_checkpointing: each layer's checkpointed input waits in host memory until backward",
        default=False,
    )
    tiled_mlp_shards: int = _help("MLPs of training and scoring passes run in this many sequence tiles", default=1)
    pack_sequences: Switch = _help(
        "auto (on with flash_attention_2), on, off (true / false read as on / off): run "
        "micro-batches padding-free, sequences packed into one row",
        default="auto",
    )
    teacher_offload: Switch = _help(
        "auto (on with accelerators, off on CPU, where parameters are in host memory "
        "already), on, off (true / false read as on / off): teacher parameters on CPU "
        "(ZeRO-3 offload_param), gathered per layer",
        default="auto",
    )
    reference_offload: bool = _help("reference model (--beta_ref > 0) parameters on CPU", default=False)
    param_persistence_threshold: int | None = _help(
        "ZeRO-3: parameters with fewer elements stay whole on every rank (every model); none = the DeepSpeed "
        "JSON's stage3_param_persistence_threshold",
        scope="both",
        default=None,
    )
    trust_remote_code: bool = _help(
        "allow model code from the model dir (off: only transformers' own code)", scope="both", default=False
    )
    cache_dir: str = _help("where the built-in demo's SFT models are built once and reused", default="~/.cache/rlad_ds")
    demo_build: bool = _help(
        "the built-in demo trains its SFT models on this machine (once, cached under --cache_dir) instead of "
        "loading those shipped with the package; an SFT build's floats differ between CPUs",
        default=False,
    )
    logprob_chunk_size: int = _help(
        "tokens per lm-head chunk when computing log-probs (bounds logits memory); 0 = about 2^26 logits per chunk",
        default=0,
    )

    def __post_init__(self):
        _check(self.precision in PRECISIONS, f"--precision {self.precision!r} is unknown; use auto, bf16 or fp32")
        _check(
            self.attn_implementation in ATTENTION_CHOICES,
            f"--attn_implementation {self.attn_implementation!r} is unknown; use {', '.join(ATTENTION_CHOICES)}",
        )
        _check(
            self.precision != "fp32" or self.attn_implementation != "flash_attention_2",
            "--attn_implementation flash_attention_2 has no fp32 kernels; pass --precision bf16 or choose sdpa",
        )
        _check(self.pack_sequences in ("auto", "on", "off"), "--pack_sequences must be auto, on or off")
        _check(self.teacher_offload in ("auto", "on", "off"), "--teacher_offload must be auto, on or off")
        _check(self.logprob_chunk_size >= 0, "--logprob_chunk_size must be >= 0 (0 = automatic)")
        _check(
            not self.demo_build or self.student is None,
            "--demo_build trains the built-in demo's models; with --student there is no demo: drop it",
        )
        _check(
            self.tiled_mlp_shards >= 1, f"--tiled_mlp_shards must be >= 1 (1: no tiling), got {self.tiled_mlp_shards}"
        )
        _check(
            self.gradient_checkpointing or not self.offload_activations,
            "--offload_activations offloads the inputs gradient checkpointing keeps: add --gradient_checkpointing",
        )
        _check(
            self.param_persistence_threshold is None or self.param_persistence_threshold >= 0,
            "--param_persistence_threshold must be >= 0, or none",
        )


@dataclass
class RolloutConfig:
    rollout: str = _help(
        "how the student samples: auto (the first that can serve the model, in this order: "
        + "; ".join(f"{k.name}: {k.help}" for k in KINDS.values())
        + ")",
        scope="both",
        default="auto",
    )
    vllm_gpu_memory_utilization: float = _help(
        "vllm on GPUs: fraction of device memory vLLM may take while it samples, its weights included (it sleeps "
        "while the student trains; the arithmetic behind the default: docs/gpu.md)",
        scope="both",
        default=0.3,
    )
    vllm_kv_cache_gb: float = _help("vllm on CPU: GiB of KV cache per rank", scope="both", default=1.0)
    vllm_sleep_level: int = _help(
        "vllm on GPUs, while the student trains: 2 (weights and KV cache dropped; every wake streams the weights "
        "in anyway) or 1 (weights kept in host memory)",
        default=2,
    )
    kv_cache_budget_gb: float | None = _help(
        "gathered and per-layer rollouts: GiB of KV cache one generate call may fill; a batch that needs more is "
        "generated in several calls of whole prompts (none: half the accelerator memory free when generation starts, "
        "a quarter of free host memory on CPU)",
        scope="both",
        default=None,
    )
    gather_budget_gb: float = _help(
        "largest model (GiB of parameters) a gathered rollout may materialise; above "
        "it --rollout auto takes the per-layer path",
        scope="both",
        default=32.0,
    )
    group_size: int = _help("G: responses sampled per prompt", default=8)
    max_new_tokens: int = _help(
        "response budget in tokens (training rollouts and evaluation)", scope="both", default=2048
    )
    temperature: float = _help(
        "sampling temperature of training rollouts; every log-prob in the loss is taken "
        "at it too (docs/method.md#temperature)",
        default=1.0,
    )
    top_p: float = _help("nucleus sampling of training rollouts", default=1.0)
    top_k: int = _help("top-k sampling of training rollouts (<= 0: off)", default=0)
    rollout_batch_size: int = _help(
        "prompts per generate call on each rank, in training and evaluation (0: all at once)", scope="both", default=0
    )

    def __post_init__(self):
        _check(
            self.rollout in ROLLOUT_CHOICES,
            f"--rollout {self.rollout!r} is unknown; use one of {', '.join(ROLLOUT_CHOICES)}",
        )
        for name in ("group_size", "max_new_tokens", "gather_budget_gb", "vllm_kv_cache_gb"):
            _check(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        _check(
            self.kv_cache_budget_gb is None or self.kv_cache_budget_gb > 0,
            f"--kv_cache_budget_gb must be > 0, or none for a share of the free memory, got {self.kv_cache_budget_gb}",
        )
        _check(self.vllm_sleep_level in (1, 2), f"--vllm_sleep_level must be 1 or 2, got {self.vllm_sleep_level}")
        _check(self.temperature > 0, f"--temperature must be > 0 for sampled rollouts, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}")
        _check(0 < self.vllm_gpu_memory_utilization < 1, "--vllm_gpu_memory_utilization must be in (0, 1)")
        _check(self.rollout_batch_size >= 0, "--rollout_batch_size must be >= 0 (0: all prompts at once)")


@dataclass
class LossConfig:
    method: str = _help(" | ".join(f"{m.name}: {m.help}" for m in METHODS.values()), default="rlad")
    alpha: float = _help(
        "TRRD mixing: log r = alpha*(logp-old) + (1-alpha)*clamp(logp-teacher); alpha=1 is GRPO", default=0.5
    )
    adaptive_alpha: bool = _help("adapt alpha each step from teacher-student agreement (rlad)", default=False)
    alpha_min: float = _help("lower bound of the adaptive alpha", default=0.1)
    alpha_max: float = _help("upper bound of the adaptive alpha", default=0.9)
    clip_low: float = _help("PPO clip below 1 (ratio >= 1 - clip_low)", default=0.2)
    clip_high: float = _help("PPO clip above 1 (ratio <= 1 + clip_high; clip-higher)", default=0.28)
    teacher_log_ratio_clip: float | None = _help(
        "clamp of logp - teacher_logp to [-c, c] (rlad); none = off", default=1.0
    )
    dual_clip: float | None = _help("dual-clip bound for negative advantages (> 1); none = off", default=None)
    beta_kd: float = _help("weight of KL(student || teacher) (kdrl, kd)", default=0.1)
    kl_estimator: str = _help(
        "estimator of KL(student || teacher) on sampled tokens: k1, k2, k3 (kdrl, kd)", default="k2"
    )
    beta_ref: float = _help("weight of the k3 KL to a frozen copy of the initial student (> 0 loads it)", default=0.0)
    loss_agg: str = _help(
        "seq-mean-token-mean (paper), token-mean (DAPO), seq-mean-token-sum-norm (Dr.GRPO)",
        default="seq-mean-token-mean",
    )
    scale_adv_by_std: bool = _help("divide group-centred rewards by the group std", default=True)
    rollout_correction: str = _help(
        "reweighting of tokens the sampler drew for the trainer's old policy (docs/rollout_correction.md): auto "
        "(tis when the rollout returns the sampler's log-probs, i.e. vllm; else none), none, "
        + ", ".join(f"{p.name} ({p.equals})" for p in PRESETS.values()),
        default="auto",
    )
    rollout_correction_low: float | None = _help("lower bound of the correction; none = the preset's", default=None)
    rollout_correction_high: float | None = _help("upper bound of the correction; none = the preset's", default=None)
    mask_truncated: bool = _help(
        "leave responses that hit max_new_tokens out of the loss (DAPO's overlong filtering)", default=False
    )
    soft_overlong_tokens: int = _help(
        "DAPO's soft overlong punishment: over the last N tokens of max_new_tokens the reward falls linearly by up "
        "to 1 (0: off)",
        default=0,
    )

    def __post_init__(self):
        get_method(self.method)
        _check(0 <= self.alpha <= 1, f"--alpha must be in [0, 1] (1 = GRPO), got {self.alpha}")
        _check(0 <= self.alpha_min <= self.alpha_max <= 1, "--alpha_min <= --alpha_max must lie in [0, 1]")
        _check(
            self.clip_low > 0 and self.clip_high > 0,
            f"--clip_low and --clip_high must be > 0, got {self.clip_low} and {self.clip_high}",
        )
        _check(
            self.teacher_log_ratio_clip is None or self.teacher_log_ratio_clip > 0,
            "--teacher_log_ratio_clip must be > 0, or none to turn the clamp off",
        )
        _check(self.dual_clip is None or self.dual_clip > 1, "--dual_clip must be > 1, or none")
        _check(self.beta_kd >= 0 and self.beta_ref >= 0, "--beta_kd and --beta_ref must be >= 0")
        _check(self.kl_estimator in KL_ESTIMATORS, f"--kl_estimator must be one of {', '.join(KL_ESTIMATORS)}")
        _check(self.loss_agg in LOSS_AGGS, f"--loss_agg {self.loss_agg!r} is unknown; use one of {LOSS_AGGS}")
        _check(
            self.rollout_correction in CORRECTION_CHOICES,
            f"--rollout_correction {self.rollout_correction!r} is unknown; use one of {', '.join(CORRECTION_CHOICES)}",
        )
        low, high = self.rollout_correction_low, self.rollout_correction_high
        _check(
            (low is None or low >= 0) and (high is None or high > 0) and (low is None or high is None or low <= high),
            "--rollout_correction_low must be >= 0 and --rollout_correction_high > 0, low <= high (none: the preset's)",
        )
        _check(self.soft_overlong_tokens >= 0, "--soft_overlong_tokens must be >= 0 (0: off)")


@dataclass
class TrainConfig:
    prompts_per_step: int = _help("prompts per optimizer step, all ranks together", default=32)
    ppo_epochs: int = _help("passes over each batch of rollouts", default=1)
    micro_batch_tokens: int = _help("token budget of one forward/backward micro-batch per rank", default=16384)
    sequence_parallel_size: int = _help(
        "ranks sharing each sequence (Ulysses): the data-parallel size is world / this", default=1
    )
    lr: float = _help('learning rate (fills the DeepSpeed config\'s "auto")', default=1e-6)
    weight_decay: float = _help('AdamW weight decay (fills the DeepSpeed config\'s "auto")', default=0.0)
    grad_clip: float = _help('gradient norm clipping (fills "auto")', default=1.0)
    max_steps: int = _help("optimizer steps", default=100)
    seed: int = _help("seed of data order, sampling, init and generated problems", scope="both", default=0)
    output_dir: str = _help("metrics, checkpoints and the exported student", default="outputs/rlad")
    overwrite_output_dir: bool = _help(
        "start at step 0 in an output dir that holds a run (moved aside to OUTPUT_DIR.old-<time>, never deleted)",
        default=False,
    )
    save_steps: int = _help("checkpoint every N steps and at the end (0: only at the end, -1: never)", default=50)
    keep_last: int = _help("checkpoints kept", default=2)
    checkpoint_verify: str = _help(
        "what each checkpoint's manifest records and a resume checks: size (every file's size: a crash mid-save, a "
        "full disk, a missing or cut file) or sha256 (every byte as well: also silent corruption; hashed while the "
        "files are written, and read again at each resume, the ranks sharing the work)",
        default="sha256",
    )
    resume: str = _help("auto (newest complete checkpoint in output_dir), none, or a checkpoint path", default="auto")
    max_bad_steps: int = _help("consecutive non-finite steps tolerated before stopping", default=3)
    max_failed_reward_steps: int = _help("steps in a row with every reward call failed: stop (0: never)", default=3)
    save_on_signal: bool = _help(
        "on SIGTERM / SIGINT (or the launcher's death) finish the step and save a "
        "checkpoint when that fits in --signal_grace_s; off: exit at once",
        default=True,
    )
    signal_grace_s: float = _help(
        "seconds a launcher waits after SIGTERM before SIGKILL (DeepSpeed's, SLURM's and Kubernetes' default: 30)",
        default=30.0,
    )
    report_to: str = _help("tensorboard, wandb, or none (metrics.jsonl is always written)", default="tensorboard")
    dynamic_sampling: bool = _help(
        "DAPO's dynamic sampling: leave out groups whose rewards are all equal and draw more prompts until the step "
        "holds --prompts_per_step groups that carry a signal",
        default=False,
    )
    max_sampling_rounds: int = _help("most rollout rounds a step draws with --dynamic_sampling", default=4)
    collective_timeout_s: int = _help(
        "seconds a collective may wait before the job fails (a dead rank)", scope="both", default=1800
    )

    def __post_init__(self):
        for name in (
            "prompts_per_step",
            "ppo_epochs",
            "micro_batch_tokens",
            "sequence_parallel_size",
            "max_steps",
            "keep_last",
            "collective_timeout_s",
            "lr",
            "max_bad_steps",
            "max_sampling_rounds",
        ):
            _check(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        _check(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {self.seed}")
        _check(self.save_steps >= -1, "--save_steps must be >= 0, or -1 for no checkpoints")
        _check(self.checkpoint_verify in ("size", "sha256"), "--checkpoint_verify must be size or sha256")
        _check(
            self.max_failed_reward_steps >= 0 and self.signal_grace_s >= 0,
            "--max_failed_reward_steps and --signal_grace_s must be >= 0",
        )
        _check(self.report_to in ("tensorboard", "wandb", "none"), "--report_to must be tensorboard, wandb or none")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: str = "ds_configs/zero3.json"

    def __post_init__(self):
        check_config(self)

    @property
    def is_demo(self) -> bool:
        return self.model.student is None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "eval": EvalConfig,
}
