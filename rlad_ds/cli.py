"""The entry points: `launchers/train.py` (console script `rlad-train`) and `launchers/eval.py` (`rlad-eval`).

Each parses the one config tree, checks everything a user can get wrong before any process group or model
exists (the same on every rank, so all ranks stop together, with one line printed once), then builds the
run's models (`rlad_ds.run_models`) and runs the trainer loop or the evaluation path. Nothing imports this module.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from rlad_ds.distributed import end_process_group, env_rank, env_world_size, single_process_env
from rlad_ds.errors import ConfigError, TrainingError, error_line
from rlad_ds.preflight import check_train_inputs, check_writable, checked_tokenizer
from rlad_ds.signals import guard_signals

logger = logging.getLogger("rlad_ds")


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run an entry point: a user mistake (ConfigError) is one line on stderr from rank 0 and exit code 2, a
    run that cannot go on (TrainingError) one line and exit code 1; `--debug` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # torch deprecates the collectives DeepSpeed 0.19 calls; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.basicConfig(
        level=logging.INFO if env_rank() == 0 else logging.WARNING,
        format="[rlad_ds %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    previous = guard_signals()
    try:
        return main(argv)
    except (ConfigError, TrainingError) as error:
        if "--debug" in argv:
            raise
        if env_rank() == 0:
            kind = "" if hasattr(error, "exit_code") else "error: "  # a stop that was asked for is no error
            print(f"rlad_ds: {kind}{error}", file=sys.stderr)
        end_process_group(barrier=False)
        return 2 if isinstance(error, ConfigError) else getattr(error, "exit_code", 1)
    finally:  # an entry point called in-process (tests, notebooks) leaves the caller's handlers as they were
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def train_main(argv: list[str] | None = None) -> int:
    return run_main(_train, argv)


def eval_main(argv: list[str] | None = None) -> int:
    return run_main(_eval, argv)


def _eval_examples(cfg, tokenizer, rewards, max_prompt_tokens: int | None = None):
    from rlad_ds.data import load_eval_examples

    try:
        examples = load_eval_examples(cfg, tokenizer, rewards, max_prompt_tokens)
    except ConfigError:
        raise
    except Exception as error:  # e.g. `datasets` cannot reach or parse a hub dataset
        if cfg.eval.eval_dataset is None:
            raise
        raise ConfigError(
            f"cannot load --eval_dataset {cfg.eval.eval_dataset!r} ({error_line(error)}); give a local "
            f"file or save_to_disk dir, or a hub name reachable from here"
        ) from None
    if examples.skipped and env_rank() == 0:
        logger.warning(
            "--skip_bad_rows: skipped %d bad held-out rows (first: %s)", examples.skipped, examples.messages[0]
        )
    return examples


# ---- training ----------------------------------------------------------------------------------------------------


def _model_paths(cfg) -> tuple[Path, Path | None]:
    if not cfg.is_demo:
        return Path(cfg.model.student), cfg.model.teacher and Path(cfg.model.teacher)
    from rlad_ds.demo.cache import cache_dir, prepare_demo

    # A file lock inside prepare_demo makes one process build the cache while the others wait for it.
    paths = prepare_demo(cache_dir(cfg.model.cache_dir), seed=0, progress=env_rank() == 0)
    return paths["student"], paths["teacher"]


def _train_examples(cfg, tokenizer, rewards, max_prompt_tokens: int | None):
    from rlad_ds.data import load_train_examples

    train = load_train_examples(
        cfg.data, tokenizer, seed=cfg.train.seed, rewards=rewards, max_prompt_tokens=max_prompt_tokens
    )
    if train.skipped and env_rank() == 0:
        logger.warning("--skip_bad_rows: skipped %d bad dataset rows (first: %s)", train.skipped, train.messages[0])
    world = env_world_size()
    # The same condition as the trainer's sampler (drop_last shards), found here before any model is loaded.
    if len(train) // world < cfg.train.prompts_per_step // world:
        raise ConfigError(
            f"{len(train)} training prompts are fewer than --prompts_per_step "
            f"{cfg.train.prompts_per_step}; add data or lower --prompts_per_step"
        )
    return train


def _train(argv: list[str]) -> int:
    from rlad_ds.checkpoint.run_dir import resume_point
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.demo.recipe import PROFILE
    from rlad_ds.methods import get_method
    from rlad_ds.models import check_tokenizers_match, prompt_budget
    from rlad_ds.rewards import RewardRunner
    from rlad_ds.tasks import get_task

    cfg, _ = parse_config(argv, profile=PROFILE)
    method, task = get_method(cfg.loss.method), get_task(cfg.data.task, cfg.data.task_args)
    check_train_inputs(cfg)
    # This run's newest checkpoint that verifies; refused here, before any model: a finished run, another run's
    # checkpoint, --resume PATH with --overwrite_output_dir.
    resume_from = resume_point(cfg)
    single_process_env()
    # Tokenizers and prompts need no process group: a tokenizer mismatch or a bad dataset row stops every rank
    # here, together, before any rank can wait in a collective for one that has already left.
    student_path, teacher_path = _model_paths(cfg)
    tokenizer = checked_tokenizer(student_path, "student", cfg)
    if method.needs_teacher:
        check_tokenizers_match(tokenizer, checked_tokenizer(teacher_path, "teacher", cfg))
    # The run's reward workers check every dataset row's gold as it loads, then score the rollouts.
    budget = prompt_budget(student_path, cfg.rollout.max_new_tokens, "student")
    with RewardRunner.from_config(cfg.data) as rewards:
        train_examples = _train_examples(cfg, tokenizer, rewards, budget)
        eval_examples = _eval_examples(cfg, tokenizer, rewards, budget)
        return _run_training(
            cfg,
            method,
            task,
            student_path,
            teacher_path,
            tokenizer,
            rewards,
            train_examples,
            eval_examples,
            resume_from,
        )


def _run_training(
    cfg, method, task, student_path, teacher_path, tokenizer, rewards, train_examples, eval_examples, resume_from
) -> int:
    # Imported only now, so that bad input is reported without waiting for DeepSpeed's import.
    import random

    import torch

    from rlad_ds.checkpoint.export import ExportHF
    from rlad_ds.checkpoint.manifest import write_json_atomic
    from rlad_ds.checkpoint.run_dir import move_aside, run_identity
    from rlad_ds.distributed import init_process_group
    from rlad_ds.metrics import MetricsLogger
    from rlad_ds.run_models import build_run_models
    from rlad_ds.trainer import Trainer

    init_process_group(cfg.train.collective_timeout_s)
    if cfg.train.overwrite_output_dir:  # the old run is renamed aside, never deleted; this one starts at step 0
        move_aside(cfg.train.output_dir)
    data_rank = env_rank() // cfg.train.sequence_parallel_size  # a sequence-parallel group's ranks sample alike
    random.seed(cfg.train.seed + data_rank)
    torch.manual_seed(cfg.train.seed + data_rank)
    models = build_run_models(cfg, method, student_path, teacher_path, tokenizer)
    output_dir = Path(cfg.train.output_dir)
    if env_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Atomic: a run killed mid-write must not leave a truncated record that blocks its own resumption.
        write_json_atomic(output_dir / "run_config.json", run_identity(cfg))
    trainer = Trainer(cfg, method, models, tokenizer, task, rewards, train_examples, eval_examples)
    if resume_from is not None:
        trainer.resume(resume_from)
    metrics = MetricsLogger(
        output_dir,
        rank=env_rank(),
        total_steps=cfg.train.max_steps,
        start_step=trainer.step,
        report_to=cfg.train.report_to,
        config=cfg.to_dict(),
    )
    callbacks = [metrics, ExportHF(output_dir / "student_hf")]
    if cfg.is_demo:
        from rlad_ds.demo.summary import DemoSummary

        callbacks.append(DemoSummary(output_dir))
    try:
        trainer.fit(callbacks)
    finally:
        metrics.close()
    end_process_group()
    return 0


# ---- evaluation --------------------------------------------------------------------------------------------------


def _eval(argv: list[str]) -> int:
    from rlad_ds.config.parsing import build_parser, config_from_layers, read_layers
    from rlad_ds.models import check_model_dir, prompt_budget
    from rlad_ds.rewards import RewardRunner
    from rlad_ds.tasks import get_task

    parser = build_parser(
        "eval",
        description="Mean@k and unbiased Pass@k of a causal LM on a task, per subset, "
        "under ZeRO-3 inference (any number of ranks).",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model dir (config.json + safetensors)")
    parser.add_argument("--output", default=None, help="write the results here as JSON")
    parser.add_argument("--save_completions", action="store_true", help="also store every completion in the JSON")
    args = parser.parse_args(argv)
    cfg = config_from_layers(read_layers(args))
    task = get_task(cfg.data.task, cfg.data.task_args)
    if args.output is not None:  # found now, not after the whole evaluation has run
        check_writable(args.output, "--output", directory=False)
    model_dir = check_model_dir(args.model, "model", cfg.model.trust_remote_code)
    budget = prompt_budget(model_dir, cfg.rollout.max_new_tokens)
    tokenizer = checked_tokenizer(model_dir, "model", cfg)
    with RewardRunner.from_config(cfg.data) as rewards:
        examples = _eval_examples(cfg, tokenizer, rewards, budget)
        if not examples:
            raise ConfigError(
                f"nothing to evaluate: task {task.name!r} generates no problems and no "
                "--eval_dataset was given (or --eval_size is 0)"
            )
        if cfg.eval.eval_temperature == 0 and cfg.eval.eval_samples > 1:
            logger.warning(
                "--eval_temperature 0 is greedy: all %d samples of a problem are the same", cfg.eval.eval_samples
            )
        single_process_env()
        return _run_evaluation(cfg, task, model_dir, tokenizer, examples, rewards, args)


def _run_evaluation(cfg, task, model_dir, tokenizer, examples, rewards, args) -> int:
    import time

    from rlad_ds.distributed import init_process_group
    from rlad_ds.evaluation import format_table, write_json
    from rlad_ds.generation import evaluate_examples
    from rlad_ds.run_models import build_eval_model

    start = time.perf_counter()
    init_process_group(cfg.train.collective_timeout_s)
    engine, rollout = build_eval_model(cfg, model_dir, tokenizer)
    load_seconds = time.perf_counter() - start
    results = evaluate_examples(
        rollout, tokenizer, task, examples, cfg, rewards, engine.device, keep_completions=args.save_completions
    )
    if env_rank() == 0:
        seconds, tokens = results.pop("generate_seconds"), results.pop("generated_tokens")
        results["run"] = {
            "model": str(model_dir),
            "eval_dataset": cfg.eval.eval_dataset,
            "size": len(examples),
            "skipped_rows": examples.skipped,
            "world_size": env_world_size(),
            "rollout": rollout.name,
            "generated_tokens": tokens,
            "load_seconds": round(load_seconds, 2),
            "generate_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "seconds": round(time.perf_counter() - start, 2),
            "config": cfg.to_dict(),
        }
        print(format_table(results), flush=True)
        print(
            f"\n{len(examples)} problems x {cfg.eval.eval_samples} samples, {env_world_size()} rank(s), "
            f"{rollout.name} generation: {tokens} tokens in {seconds:.1f} s",
            flush=True,
        )
        if results["score_errors"] or results["score_timeouts"]:
            print(
                f"scoring: {results['score_errors']} errors, {results['score_timeouts']} timeouts (scored 0; "
                f"first: {'; '.join(results['score_messages'])})"
            )
        if args.output:
            print(f"wrote {write_json(results, args.output)}", flush=True)
    end_process_group()
    return 0
