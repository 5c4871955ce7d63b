"""`launchers/train.py`'s entry point: validate everything, set up, train, export, summarise.

All user mistakes are found before any model is loaded and end as one line on stderr (printed by
rank 0 only, so the user reads it once under the deepspeed launcher) with exit code 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

from rlad_ds.errors import ConfigError

logger = logging.getLogger("rlad_ds")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEMO_CACHE = Path(os.environ.get("RLAD_CACHE", Path.home() / ".cache" / "rlad_ds")) / "demo"


def _single_process_env() -> None:
    """`python launchers/train.py` without a launcher: act as rank 0 of 1 (DeepSpeed would look for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def _validate(cfg) -> None:
    """Checks that need no model and no process group: the same on every rank, so all ranks stop together."""
    from rlad_ds.ds_config import load_ds_config, require_zero_stage
    from rlad_ds.models import check_model_dir
    from rlad_ds.trainer import check_output_dir

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train.prompts_per_step % world:
        raise ConfigError(f"--prompts_per_step {cfg.train.prompts_per_step} does not divide by the {world} ranks; "
                          f"use a multiple of {world}")
    require_zero_stage(load_ds_config(cfg.deepspeed), 3, "student")
    if not cfg.is_demo:
        check_model_dir(cfg.model.student, "student")
        check_model_dir(cfg.model.teacher, "teacher")
    check_output_dir(cfg)


def _tokenizer(path, role: str, cfg):
    """The tokenizer of a model dir; one that transformers cannot read is a ConfigError naming the dir."""
    from rlad_ds.models import load_tokenizer

    # Checked first: transformers builds an (almost empty) tokenizer for a dir without these files, which
    # would surface later as a misleading tokenizer mismatch.
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{role} dir {path} has no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])}); save "
                          f"the tokenizer there with tokenizer.save_pretrained")
    try:
        return load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigError(f"{role} dir {path}: cannot load its tokenizer ({str(error).splitlines()[0]}); save it "
                          f"there with tokenizer.save_pretrained") from None


def _load_data(cfg, tokenizer, rank: int = 0):
    from rlad_ds.data import load_eval_examples, load_train_examples

    train = load_train_examples(cfg.data, tokenizer, seed=cfg.train.seed)
    if train.skipped and rank == 0:
        logger.warning("--skip_bad_rows: skipped %d bad dataset rows (first: %s)", train.skipped, train.messages[0])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The same condition as the trainer's sampler (drop_last shards), found here before any model is loaded.
    if len(train) // world < cfg.train.prompts_per_step // world:
        raise ConfigError(f"{len(train)} training prompts are fewer than --prompts_per_step "
                          f"{cfg.train.prompts_per_step}; add data or lower --prompts_per_step")
    return train, load_eval_examples(cfg.data, tokenizer, size=cfg.train.eval_size, seed=cfg.train.seed)


def _model_paths(cfg, rank: int):
    if not cfg.is_demo:
        return Path(cfg.model.student), Path(cfg.model.teacher)
    from rlad_ds.demo import prepare_demo

    # A file lock inside prepare_demo makes one process build the cache while the others wait for it.
    paths = prepare_demo(DEMO_CACHE, seed=0, progress=rank == 0)
    return paths["student"], paths["teacher"]


def apply_demo_defaults(cfg) -> None:
    """The demo's recipe (short responses, small batches, a higher lr) where the user left defaults."""
    from rlad_ds.config import Config
    from rlad_ds.demo import MAX_NEW_TOKENS

    defaults = Config()
    demo = {("data", "task"): "arith", ("rollout", "max_new_tokens"): MAX_NEW_TOKENS,
            ("train", "prompts_per_step"): 16, ("train", "lr"): 1e-5, ("train", "max_steps"): 60,
            ("train", "save_steps"): 0, ("train", "eval_size"): 200, ("train", "eval_steps"): 20,
            ("train", "output_dir"): "outputs/demo", ("model", "teacher_offload"): False}
    for (group, name), value in demo.items():
        if getattr(getattr(cfg, group), name) == getattr(getattr(defaults, group), name):
            setattr(getattr(cfg, group), name, value)


def train_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # torch deprecates the collectives DeepSpeed 0.19 calls; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    debug = "--debug" in argv
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[rlad_ds %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return _train(argv)
    except ConfigError as error:
        if debug:
            raise
        if rank == 0:
            print(f"rlad_ds: error: {error}", file=sys.stderr)
        return 2


def _train(argv) -> int:
    from rlad_ds.checkpoint import export_hf, resolve_resume, write_json_atomic
    from rlad_ds.config import parse_config
    from rlad_ds.metrics import MetricsLogger
    from rlad_ds.models import check_tokenizers_match
    from rlad_ds.tasks import get_task
    from rlad_ds.trainer import Trainer, TrainingError, run_identity

    cfg, _ = parse_config(argv)
    if cfg.is_demo:
        apply_demo_defaults(cfg)
    if cfg.data.task is None:
        cfg.data.task = "kk"
    get_task(cfg.data.task)  # an unknown task fails here, before anything is loaded
    _validate(cfg)
    resume_from = resolve_resume(cfg.train.resume, cfg.train.output_dir)
    _single_process_env()
    rank = int(os.environ["RANK"])
    # Tokenizers and prompts need no process group: a tokenizer mismatch or a bad dataset row stops every
    # rank here, together, before any rank can wait in a collective for one that has already left.
    student_path, teacher_path = _model_paths(cfg, rank)
    tokenizer = _tokenizer(student_path, "student", cfg)
    check_tokenizers_match(tokenizer, _tokenizer(teacher_path, "teacher", cfg))
    train_examples, eval_examples = _load_data(cfg, tokenizer, rank)
    # Imported only now, so that bad input is reported without waiting for DeepSpeed's import.
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    torch_seed(cfg.train.seed + rank)

    trainer = Trainer(cfg)
    trainer.setup(student_path, teacher_path, cfg.data.task, train_examples, eval_examples, tokenizer)
    output_dir = Path(cfg.train.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Atomic: a run killed mid-write must not leave a truncated record that blocks its own resumption.
        write_json_atomic(output_dir / "run_config.json", run_identity(cfg))
    if resume_from is not None:
        trainer.resume(resume_from)
    metrics_logger = MetricsLogger(output_dir, rank=rank, total_steps=cfg.train.max_steps, start_step=trainer.step,
                                   report_to=cfg.train.report_to, config=cfg.to_dict())
    start = time.perf_counter()
    try:
        history = trainer.fit(metrics_logger)
    except TrainingError as error:
        if rank == 0:
            print(f"rlad_ds: error: {error}", file=sys.stderr)
        return 1
    finally:
        metrics_logger.close()
        trainer.rewards.close()
    export_hf(trainer.engine, tokenizer, output_dir / "student_hf")
    if cfg.is_demo:
        summarise_demo(trainer, history, output_dir, rank, time.perf_counter() - start)
    get_accelerator().synchronize()
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    return 0


def torch_seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def summarise_demo(trainer, history: dict, output_dir: Path, rank: int, seconds: float) -> None:
    """The demo's verdict: held-out accuracy of the student before and after, and of the teacher."""
    from rlad_ds.rollout import PerLayerRollout

    student_rollout = trainer.rollout
    trainer.rollout = PerLayerRollout(trainer.teacher.engine, trainer.tokenizer)
    teacher_accuracy = trainer.evaluate()  # the same held-out prompts, greedy, through the teacher
    trainer.rollout = student_rollout
    if rank != 0:
        return
    summary = {"student_before": history["eval_before"], "student_after": history["eval_after"],
               "teacher": teacher_accuracy, "method": trainer.cfg.loss.method, "steps": trainer.step,
               "train_seconds": round(seconds, 1), "eval_prompts": len(trainer.eval_examples)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
    print("\nheld-out accuracy (greedy, %d prompts)" % summary["eval_prompts"])
    print("| model | accuracy |\n|---|---|")
    for key in ("student_before", "student_after", "teacher"):
        print(f"| {key.replace('_', ' ')} | {summary[key]:.3f} |")
    print(f"\nwrote {output_dir / 'summary.json'}, {output_dir / 'curves.png'}, {output_dir / 'student_hf'}")


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training reward and held-out accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["reward_mean"]) for r in records if "reward_mean" in r]
    held_out = [(r["step"], r["eval_accuracy"]) for r in records if r.get("eval_accuracy") is not None]
    if train:
        ax.plot(*zip(*train), label="training reward (sampled)")
    if held_out:
        ax.plot(*zip(*held_out), marker="o", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
