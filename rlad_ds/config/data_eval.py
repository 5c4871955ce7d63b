"""The data and evaluation sections of the config tree (`rlad_ds.config.schema` assembles the tree): where the
training prompts and held-out problems come from, how they are scored, and how the student is evaluated."""

from __future__ import annotations

from dataclasses import dataclass

from rlad_ds.config.fields import check as _check
from rlad_ds.config.fields import field_help as _help


@dataclass
class DataConfig:
    task: str = _help(
        "kk, math, arith, rg:<dataset> (any reasoning-gym dataset), or module:function returning a Task",
        scope="both",
        default="kk",
    )
    task_args: str | None = _help(
        "the task's config: JSON object or key=value,key=value (reasoning-gym dataset "
        "config, e.g. n_people=3; keyword arguments of a module:function task)",
        scope="both",
        default=None,
    )
    dataset: str | None = _help(
        "training data: local jsonl/json/parquet/csv file or saved dataset dir (or a hub "
        "name when online); none = the task's generated prompts",
        default=None,
    )
    columns: str | None = _help("column mapping, e.g. prompt=question,answer=answer", scope="both", default=None)
    system_prompt: str | None = _help("system message for the chat template", scope="both", default=None)
    prompt_template: str | None = _help(
        "raw template with {prompt} instead of the tokenizer's chat template", scope="both", default=None
    )
    skip_bad_rows: bool = _help(
        "skip malformed dataset rows (counted) instead of stopping", scope="both", default=False
    )
    train_size: int = _help("generated training prompts when no dataset is given", default=10000)
    reward_timeout_s: float = _help(
        "seconds one reward call may take; a slower call is stopped, scores 0 and is counted in reward_errors",
        scope="both",
        default=10.0,
    )
    reward_workers: int = _help("verifier processes per rank", scope="both", default=2)

    def __post_init__(self):
        for name in ("reward_timeout_s", "reward_workers", "train_size"):
            _check(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    eval_size: int | None = _help(
        "held-out problems: the first N usable rows of the eval data, or N generated; "
        "0 = no evaluation; none = every row",
        scope="both",
        default=64,
    )
    eval_steps: int = _help("evaluate every N training steps (0: at the start and the end only)", default=0)
    eval_dataset: str | None = _help(
        "held-out data file or saved dataset dir; none = the task's generated test "
        "split, or the test split of a saved --dataset",
        scope="both",
        default=None,
    )
    eval_split: str = _help("split of a saved dataset dict (or hub dataset) to evaluate", scope="both", default="test")
    eval_samples: int = _help("samples per problem (n of Mean@k / Pass@k)", scope="both", default=1)
    eval_k: tuple[int, ...] = _help(
        "comma-separated k of Mean@k / Pass@k (each <= eval_samples)", scope="both", default=(1,)
    )
    eval_temperature: float = _help("sampling temperature of evaluation (0: greedy)", scope="both", default=0.0)
    eval_top_p: float = _help("nucleus sampling of evaluation", scope="both", default=1.0)
    eval_top_k: int = _help("top-k sampling of evaluation (<= 0: off)", scope="both", default=0)
    eval_offload: bool = _help(
        "parameters of the evaluated model on CPU (launchers/eval.py)", scope="eval", default=False
    )

    def __post_init__(self):
        _check(self.eval_size is None or self.eval_size >= 0, "--eval_size must be >= 0, or none for every row")
        _check(self.eval_steps >= 0, "--eval_steps must be >= 0")
        _check(self.eval_samples >= 1, f"--eval_samples must be >= 1, got {self.eval_samples}")
        _check(
            bool(self.eval_k) and min(self.eval_k) >= 1 and max(self.eval_k) <= self.eval_samples,
            f"every --eval_k must be in 1..eval_samples={self.eval_samples}, got {list(self.eval_k)}",
        )
        _check(self.eval_temperature >= 0, f"--eval_temperature must be >= 0, got {self.eval_temperature}")
        _check(0 < self.eval_top_p <= 1, f"--eval_top_p must be in (0, 1], got {self.eval_top_p}")
