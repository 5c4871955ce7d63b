"""The entry points: `launchers/train.py` (console script `rlad-train`) and `launchers/eval.py` (`rlad-eval`).

Each parses the one config tree, checks everything a user can get wrong before any process group or model
exists (the same on every rank, so all ranks stop together, with one line printed once), then builds the
run's models (`rlad_ds.run_models`) and runs the trainer loop or the evaluation path. Nothing imports this module.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from rlad_ds.distributed import end_process_group, env_rank, env_world_size, single_process_env
from rlad_ds.errors import ConfigError, TrainingError, error_line
from rlad_ds.preflight import check_generated_sizes, check_train_inputs, check_writable, checked_tokenizer
from rlad_ds.signals import guard_signals

logger = logging.getLogger("rlad_ds")

# How long a rank other than 0 waits, after an error, for rank 0 to report it and end the job.
RANK0_REPORT_GRACE_S = 10.0


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run an entry point: a user mistake (ConfigError) is one line on stderr from rank 0 and exit code 2, a
    run that cannot go on (TrainingError) one line and exit code 1 (from another rank only if rank 0 did not meet
    it); `--debug` shows the traceback instead."""
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
        asked_stop = hasattr(error, "exit_code")  # a stop that was asked for is no error
        if env_rank() != 0 and not asked_stop:
            # Only rank 0 reports, and DeepSpeed's launcher ends every rank as soon as one exits with an error: a
            # rank that met bad input before rank 0 did took rank 0 down before it said why. Every rank reads the
            # same input, so this one waits for rank 0 to report and end the job (whose SIGTERM then ends this rank
            # silently); an error rank 0 did not meet is still this rank's to report when the wait is over.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(RANK0_REPORT_GRACE_S)
        if env_rank() == 0 or not asked_stop:
            print(f"rlad_ds: {'' if asked_stop else 'error: '}{error}", file=sys.stderr)
        end_process_group(barrier=False)
        return 2 if isinstance(error, ConfigError) else getattr(error, "exit_code", 1)
    finally:  # an entry point called in-process (tests, notebooks) leaves the caller's handlers as they were
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def train_main(argv: list[str] | None = None) -> int:
    return run_main(_train, argv)


def eval_main(argv: list[str] | None = None) -> int:
    return run_main(_eval, argv)


def export_main(argv: list[str] | None = None) -> int:
    return run_main(_export, argv)


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
    paths = prepare_demo(
        cache_dir(cfg.model.cache_dir), seed=0, progress=env_rank() == 0, shipped=not cfg.model.demo_build
    )
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
    from rlad_ds.checkpoint.lock import OutputDirLock
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.demo.recipe import demo_profile
    from rlad_ds.methods import get_method
    from rlad_ds.tasks import get_task

    cfg, _ = parse_config(argv, profile=demo_profile)
    method, task = get_method(cfg.loss.method), get_task(cfg.data.task, cfg.data.task_args)
    check_train_inputs(cfg)
    # One run per output dir: rank 0 holds its lock for the life of the run; a second run stops here, in one line.
    lock = OutputDirLock(cfg.train.output_dir).acquire() if env_rank() == 0 else None
    try:
        return _checked_training(cfg, method, task, lock)
    except BaseException:
        if lock is not None:
            lock.abandon()  # a run refused here leaves no output dir behind
        raise
    finally:
        if lock is not None:
            lock.release()


def _checked_training(cfg, method, task, lock) -> int:
    from rlad_ds.checkpoint.run_dir import resume_point
    from rlad_ds.models import check_tokenizers_match, prompt_budget
    from rlad_ds.rewards import RewardRunner

    # This run's newest checkpoint whose files have their recorded sizes; refused here, before any model: a finished
    # run, another run's checkpoint, --resume PATH with --overwrite_output_dir.
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
        paths = (student_path, teacher_path)
        return _run_training(
            cfg, method, task, paths, tokenizer, rewards, train_examples, eval_examples, resume_from, lock
        )


def _run_training(
    cfg, method, task, paths, tokenizer, rewards, train_examples, eval_examples, resume_from, lock
) -> int:
    # Imported only now, so that bad input is reported without waiting for DeepSpeed's import.
    import random

    import torch

    from rlad_ds.checkpoint.manifest import write_json_atomic
    from rlad_ds.checkpoint.run_dir import RUN_RECORD, run_identity, settle_output_dir
    from rlad_ds.distributed import init_process_group
    from rlad_ds.run_models import build_run_models, rollout_context
    from rlad_ds.trainer import Trainer

    init_process_group(cfg.train.collective_timeout_s)
    resume_from = settle_output_dir(cfg, lock, resume_from)
    data_rank = env_rank() // cfg.train.sequence_parallel_size  # a sequence-parallel group's ranks sample alike
    random.seed(cfg.train.seed + data_rank)
    torch.manual_seed(cfg.train.seed + data_rank)
    # The rollout is sized by the prompts it will see (vLLM reserves KV cache per token), not by the model's context.
    context = rollout_context(cfg, tokenizer, [*train_examples, *eval_examples], len(eval_examples))
    models = build_run_models(cfg, method, *paths, tokenizer, context)
    output_dir = Path(cfg.train.output_dir)
    if env_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Atomic: a run killed mid-write must not leave a truncated record that blocks its own resumption.
        write_json_atomic(output_dir / RUN_RECORD, run_identity(cfg))
    trainer = Trainer(cfg, method, models, tokenizer, task, rewards, train_examples, eval_examples)
    if resume_from is not None:
        trainer.resume(resume_from)
    history = _fit(cfg, trainer, output_dir)
    end_process_group()
    if env_rank() == 0:
        print(_final_line(cfg, trainer, history), flush=True)
    return 0


def _fit(cfg, trainer, output_dir: Path) -> dict:
    """The training loop with the run's outputs as its callbacks: metrics, the exported student, the demo's summary."""
    from rlad_ds.checkpoint.export import ExportHF
    from rlad_ds.checkpoint.run_dir import EXPORT_DIR
    from rlad_ds.demo.summary import DemoSummary
    from rlad_ds.metrics import MetricsLogger

    metrics = MetricsLogger(
        output_dir,
        rank=env_rank(),
        total_steps=cfg.train.max_steps,
        start_step=trainer.step,
        report_to=cfg.train.report_to,
        config=cfg.to_dict(),
    )
    callbacks = [metrics, ExportHF(output_dir / EXPORT_DIR)]
    if cfg.is_demo:
        callbacks.append(DemoSummary(output_dir))
    try:
        return trainer.fit(callbacks)
    finally:
        metrics.close()


def _export(argv: list[str]) -> int:
    """A finished (or stopped) run's student from its checkpoint: the training command's flags, one process."""
    from rlad_ds.checkpoint.export import export_checkpoint
    from rlad_ds.checkpoint.lock import OutputDirLock
    from rlad_ds.checkpoint.run_dir import EXPORT_DIR, export_source
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.demo.recipe import demo_profile

    cfg, _ = parse_config(argv, profile=demo_profile)
    out = Path(cfg.train.output_dir)
    lock = OutputDirLock(out).acquire() if (out / "run_config.json").is_file() else None  # not while a run writes
    try:
        directory = export_source(cfg)
        student_path, _ = _model_paths(cfg)
        tokenizer = checked_tokenizer(student_path, "student", cfg)
        path = export_checkpoint(directory, student_path, tokenizer, out / EXPORT_DIR, cfg.model.trust_remote_code)
    finally:
        if lock is not None:
            lock.release()
    print(f"exported {directory} to {path}", flush=True)
    return 0


def _final_line(cfg, trainer, history: dict) -> str:
    """A run's last line: the step and held-out accuracy it reached, where its model and metrics are, and what its
    health still warns about."""
    from rlad_ds.checkpoint.run_dir import EXPORT_DIR
    from rlad_ds.metrics import initial_eval_accuracy

    out = Path(cfg.train.output_dir)
    resumed = f" (resumed at step {history['start_step']})" if history["start_step"] else ""
    parts = [f"rlad_ds: done: step {trainer.step} of {cfg.train.max_steps}, --method {cfg.loss.method}{resumed}"]
    if trainer.eval_examples:
        before = history["eval_before"] if history["eval_before"] is not None else initial_eval_accuracy(out)
        shown = [f"{a:.3f}" if a is not None else "not measured" for a in (before, history["eval_after"])]
        parts.append(f"held-out accuracy {shown[0]} -> {shown[1]} ({len(trainer.eval_examples)} prompts)")
    else:
        parts.append("held-out accuracy not measured (--eval_size 0)")
    if history.get("reward_mean") is not None:
        parts.append(f"training reward {history['reward_mean']:.3f} at the last step")
    parts.append(f"model {out / EXPORT_DIR}, metrics {out / 'metrics.jsonl'}")
    return "; ".join(parts + [f"warning: {w}" for w in trainer.health.warnings()])


# ---- evaluation --------------------------------------------------------------------------------------------------


def _eval(argv: list[str]) -> int:
    from rlad_ds.config.parsing import build_parser, config_from_layers, read_layers
    from rlad_ds.models import check_model_dir, prompt_budget
    from rlad_ds.preflight import check_vllm_knobs
    from rlad_ds.rewards import RewardRunner
    from rlad_ds.tasks import get_task

    parser = build_parser(
        "eval",
        description="Mean@k and unbiased Pass@k of a causal LM on a task, per subset, "
        "sampled by vLLM or under ZeRO-3 inference (--rollout; any number of ranks).",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model dir (config.json + safetensors)")
    parser.add_argument("--output", default=None, help="write the results here as JSON")
    parser.add_argument("--save_completions", action="store_true", help="also store every completion in the JSON")
    args = parser.parse_args(argv)
    cfg = config_from_layers(read_layers(args))
    task = get_task(cfg.data.task, cfg.data.task_args)
    check_generated_sizes(cfg, train=False)
    if args.output is not None:  # found now, not after the whole evaluation has run
        check_writable(args.output, "--output", directory=False)
    model_dir = check_model_dir(args.model, "model", cfg.model.trust_remote_code)
    check_vllm_knobs(cfg, model_dir, cfg.eval.eval_samples, beside_student=False)
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
    from rlad_ds.run_models import build_eval_model, rollout_context

    start = time.perf_counter()
    init_process_group(cfg.train.collective_timeout_s)
    context = rollout_context(cfg, tokenizer, examples, len(examples), evaluation_only=True)
    device, rollout = build_eval_model(cfg, model_dir, tokenizer, context)
    load_seconds = time.perf_counter() - start
    results = evaluate_examples(
        rollout, tokenizer, task, examples, cfg, rewards, device, keep_completions=args.save_completions
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
