"""The one configuration tree: dataclasses, a YAML/JSON file, command-line overrides, validation.

Every field is a flag of the same name (`--alpha 0.3`, `--student PATH`); `--config FILE` reads a YAML
or JSON file with one section per group (`model:`, `rollout:`, `loss:`, `train:`, `data:`) and flags
override it. Each field is validated once, in its group's `__post_init__`, with a one-line
`ConfigError` that names the fix. The DeepSpeed JSON is built from this tree in `ds_config.py` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rlad_ds.errors import ConfigError

METHODS = ("rlad", "grpo", "kdrl", "sft")
ROLLOUT_ENGINES = ("auto", "gathered", "hybrid_engine", "per_layer")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


def _check(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    student: str | None = _help("student HF model dir; none = the built-in demo", default=None)
    teacher: str | None = _help("teacher HF model dir (same tokenizer as the student); none = the demo's",
                                default=None)
    use_reference: bool = _help("keep a frozen copy of the initial student for the beta_ref KL term", default=False)
    attn_implementation: str = _help("auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, eager, "
                                     "flash_attention_2, flex_attention", default="auto")
    gradient_checkpointing: bool = _help("recompute activations in backward (long responses)", default=False)
    pack_sequences: str = _help("auto (on with flash_attention_2), on, off: run micro-batches padding-free, "
                                "sequences packed into one row", default="auto")
    teacher_offload: bool = _help("teacher parameters on CPU (ZeRO-3 offload_param), gathered per layer",
                                  default=True)
    trust_remote_code: bool = _help("allow model code from the model dir (off: only transformers' own code)",
                                    default=False)
    logprob_chunk_size: int = _help("tokens per lm-head chunk when computing log-probs (bounds logits memory); "
                                    "0 = about 2^26 logits per chunk", default=0)

    def __post_init__(self):
        _check(self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"),
               f"--attn_implementation {self.attn_implementation!r} is unknown; use auto, sdpa, eager, "
               "flash_attention_2 or flex_attention")
        _check(self.pack_sequences in ("auto", "on", "off"), "--pack_sequences must be auto, on or off")
        _check(self.logprob_chunk_size >= 0, "--logprob_chunk_size must be >= 0 (0 = automatic)")
        _check((self.student is None) == (self.teacher is None),
               "give both --student and --teacher (HF model dirs), or neither to run the built-in demo")


@dataclass
class RolloutConfig:
    engine: str = _help("auto, gathered (full student gathered once per rollout), hybrid_engine (DeepSpeed "
                        "inference kernels), per_layer (ZeRO-3 gathers per layer, synced ranks)", default="auto")
    gather_budget_gb: float = _help("largest student (GB of parameters) the gathered rollout may materialise; "
                                    "above it the per-layer path is used", default=32.0)
    group_size: int = _help("G: responses sampled per prompt", default=8)
    max_new_tokens: int = _help("response budget in tokens", default=2048)
    temperature: float = _help("sampling temperature", default=1.0)
    top_p: float = _help("nucleus sampling", default=1.0)
    top_k: int = _help("top-k sampling (<= 0: off)", default=0)
    rollout_batch_size: int = _help("prompts per generate call on each rank (0: all at once)", default=0)

    def __post_init__(self):
        _check(self.engine in ROLLOUT_ENGINES, f"--engine {self.engine!r} is unknown; use one of {ROLLOUT_ENGINES}")
        _check(self.group_size >= 2, f"--group_size must be >= 2 (group-relative advantages), got {self.group_size}")
        _check(self.max_new_tokens > 0, f"--max_new_tokens must be > 0, got {self.max_new_tokens}")
        _check(self.temperature > 0, f"--temperature must be > 0 for sampled rollouts, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}")
        _check(self.gather_budget_gb > 0, "--gather_budget_gb must be > 0")
        _check(self.rollout_batch_size >= 0, "--rollout_batch_size must be >= 0")


@dataclass
class LossConfig:
    method: str = _help("rlad (TRRD), grpo, kdrl (GRPO + teacher KL), sft (offline distillation on "
                        "reward-filtered teacher traces)", default="rlad")
    alpha: float = _help("TRRD mixing: log r = alpha*(logp-old) + (1-alpha)*clamp(logp-teacher); alpha=1 is GRPO",
                         default=0.5)
    adaptive_alpha: bool = _help("adapt alpha each step from teacher-student agreement (see docs)", default=False)
    alpha_min: float = _help("lower bound of the adaptive alpha", default=0.1)
    alpha_max: float = _help("upper bound of the adaptive alpha", default=0.9)
    clip_low: float = _help("PPO clip below 1 (ratio >= 1 - clip_low)", default=0.2)
    clip_high: float = _help("PPO clip above 1 (ratio <= 1 + clip_high; clip-higher)", default=0.28)
    teacher_log_ratio_clip: float | None = _help("clamp of logp - teacher_logp to [-c, c]; none = off",
                                                 default=1.0)
    dual_clip: float | None = _help("dual-clip bound for negative advantages (> 1); none = off", default=None)
    beta_kd: float = _help("KDRL weight of KL(student || teacher)", default=0.1)
    kl_estimator: str = _help("KDRL KL estimator: k1, k2, k3", default="k2")
    beta_ref: float = _help("weight of the k3 KL to the frozen reference (needs --use_reference)", default=0.0)
    loss_agg: str = _help("seq-mean-token-mean (paper), token-mean (DAPO), seq-mean-token-sum-norm (Dr.GRPO)",
                          default="seq-mean-token-mean")
    scale_adv_by_std: bool = _help("divide group-centred rewards by the group std", default=True)

    def __post_init__(self):
        from rlad_ds.losses import KL_ESTIMATORS, LOSS_AGGS

        _check(self.method in METHODS, f"--method {self.method!r} is unknown; use one of {METHODS}")
        _check(0 <= self.alpha <= 1, f"--alpha must be in [0, 1] (1 = GRPO), got {self.alpha}")
        _check(0 <= self.alpha_min <= self.alpha_max <= 1, "--alpha_min <= --alpha_max must lie in [0, 1]")
        _check(self.clip_low > 0 and self.clip_high > 0,
               f"--clip_low and --clip_high must be > 0, got {self.clip_low} and {self.clip_high}")
        _check(self.teacher_log_ratio_clip is None or self.teacher_log_ratio_clip > 0,
               "--teacher_log_ratio_clip must be > 0, or none to turn the clamp off")
        _check(self.dual_clip is None or self.dual_clip > 1, "--dual_clip must be > 1, or none")
        _check(self.beta_kd >= 0 and self.beta_ref >= 0, "--beta_kd and --beta_ref must be >= 0")
        _check(self.kl_estimator in KL_ESTIMATORS, f"--kl_estimator must be one of {KL_ESTIMATORS}")
        _check(self.loss_agg in LOSS_AGGS, f"--loss_agg {self.loss_agg!r} is unknown; use one of {LOSS_AGGS}")


@dataclass
class TrainConfig:
    prompts_per_step: int = _help("prompts per optimizer step, all ranks together", default=32)
    ppo_epochs: int = _help("passes over each batch of rollouts", default=1)
    micro_batch_tokens: int = _help("token budget of one forward/backward micro-batch per rank", default=16384)
    lr: float = _help("learning rate (fills the DeepSpeed config's \"auto\")", default=1e-6)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    grad_clip: float = _help("gradient norm clipping (fills \"auto\")", default=1.0)
    max_steps: int = _help("optimizer steps", default=100)
    seed: int = _help("seed of data order, sampling and init", default=0)
    output_dir: str = _help("metrics, checkpoints and the exported student", default="outputs/rlad")
    overwrite_output_dir: bool = _help("reuse an output dir that holds a different run", default=False)
    save_steps: int = _help("checkpoint every N steps (0: only at the end)", default=50)
    keep_last: int = _help("checkpoints kept", default=2)
    resume: str = _help("auto (newest complete checkpoint in output_dir), none, or a checkpoint path",
                        default="auto")
    eval_steps: int = _help("held-out accuracy every N steps (0: only at the start and end)", default=0)
    eval_size: int = _help("held-out prompts for the accuracy curve", default=64)
    max_bad_steps: int = _help("consecutive non-finite steps tolerated before stopping", default=3)
    report_to: str = _help("tensorboard, wandb, or none (metrics.jsonl is always written)", default="tensorboard")
    collective_timeout_s: int = _help("seconds a collective may wait before the job fails (a dead rank)",
                                      default=1800)

    def __post_init__(self):
        for name in ("prompts_per_step", "ppo_epochs", "micro_batch_tokens", "max_steps", "keep_last"):
            _check(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        _check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(self.save_steps >= 0 and self.eval_steps >= 0, "--save_steps and --eval_steps must be >= 0")
        _check(self.max_bad_steps >= 1, "--max_bad_steps must be >= 1")
        _check(self.report_to in ("tensorboard", "wandb", "none"), "--report_to must be tensorboard, wandb or none")


@dataclass
class DataConfig:
    task: str | None = _help("kk, math, arith, or module:function returning a Task; none = arith for the demo, "
                             "kk otherwise", default=None)
    dataset: str | None = _help("local jsonl/json/parquet/csv file or saved dataset dir (or a hub name when "
                                "online); none = the task's generated prompts", default=None)
    columns: str | None = _help("column mapping, e.g. prompt=question,answer=answer", default=None)
    system_prompt: str | None = _help("system message for the chat template", default=None)
    prompt_template: str | None = _help("raw template with {prompt} instead of the tokenizer's chat template",
                                        default=None)
    skip_bad_rows: bool = _help("skip malformed dataset rows (counted) instead of stopping", default=False)
    train_size: int = _help("generated training prompts when no dataset is given", default=10000)
    reward_timeout_s: float = _help("seconds one reward call may take; a slower call is stopped, scores 0 and is "
                                    "counted in reward_errors", default=10.0)

    def __post_init__(self):
        _check(self.reward_timeout_s > 0, f"--reward_timeout_s must be > 0, got {self.reward_timeout_s}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: str = "ds_configs/zero3.json"

    def __post_init__(self):
        _check(self.loss.beta_ref == 0 or self.model.use_reference,
               "--beta_ref > 0 needs a reference model: add --use_reference")

    @property
    def is_demo(self) -> bool:
        return self.model.student is None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_GROUP_CLASSES = {"model": ModelConfig, "rollout": RolloutConfig, "loss": LossConfig, "train": TrainConfig,
                  "data": DataConfig}


def _parse_value(kind, text: str):
    """Parse a flag value by its annotation: 'none'/'off' gives None for optional fields."""
    optional = type(None) in typing.get_args(kind)
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if optional and text.lower() in ("none", "off", "null"):
        return None
    try:
        return base(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RLAD: distil a teacher into a student during GRPO with the TRRD objective, on DeepSpeed.")
    parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default=None,
                        help="DeepSpeed JSON for the student (ZeRO-3); default ds_configs/zero3.json")
    parser.add_argument("--config", default=None, help="YAML or JSON file with model/rollout/loss/train/data sections")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for configuration errors")
    for group_name, cls in _GROUP_CLASSES.items():
        group = parser.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if kind is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None,
                                   help=f"{f.metadata['help']} (default: {f.default})")
            else:
                group.add_argument(f"--{f.name}", type=lambda text, k=kind: _parse_value(k, text), default=None,
                                   metavar=typing.get_args(kind)[0].__name__.upper() if typing.get_args(kind)
                                   else kind.__name__.upper(), help=f"{f.metadata['help']} (default: {f.default})")
    return parser


def _read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML or JSON file to --config")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
        else:
            data = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise ConfigError(f"config file {path} is not valid {p.suffix.lstrip('.') or 'JSON'}: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, rollout, loss, train, data)")
    return data


def parse_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Build the Config from `--config FILE` (optional) then command-line flags. Raises ConfigError."""
    args = build_parser().parse_args(argv)
    file_values = _read_file(args.config) if args.config else {}
    unknown = set(file_values) - set(_GROUP_CLASSES) - {"deepspeed"}
    if unknown:
        raise ConfigError(f"config file {args.config}: unknown section(s) {sorted(unknown)}; "
                          f"use {sorted(_GROUP_CLASSES)}")
    groups = {}
    for group_name, cls in _GROUP_CLASSES.items():
        section = file_values.get(group_name) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(section) - names
        if bad:
            raise ConfigError(f"config file {args.config}: unknown field(s) {sorted(bad)} in section {group_name}")
        values = dict(section)
        values.update({name: getattr(args, name) for name in names if getattr(args, name) is not None})
        try:
            groups[group_name] = cls(**values)
        except TypeError as e:
            raise ConfigError(f"config section {group_name}: {e}") from None
    deepspeed = args.deepspeed or file_values.get("deepspeed") or Config.deepspeed
    return Config(**groups, deepspeed=deepspeed), args

