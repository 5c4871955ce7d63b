"""P8 worker, under the deepspeed launcher: per-rank peak memory of one full RLAD update at several response
lengths, with sequence parallelism of size N or without.

    deepspeed --num_gpus 2 benchmarks/sequence_memory.py --student DIR --teacher DIR --sequence_parallel_size N
        --lengths 4096,8192 --variants plain@4096,tiled@8192 --out FILE

The models come from `rlad_ds.run_models.build_run_models` (ZeRO-3 student engine, frozen teacher, fp32, sdpa).
Each data-parallel rank (N = 1) or sequence-parallel group (N = 2) holds one fixed, pre-generated response of L
tokens after a 64-token prompt (random ids, seeded by the data-parallel rank). One update is what the trainer runs
on it: the teacher's scoring pass and the student's old-policy scoring pass (`LogProbScorer`), then
`Trainer.update` (student forward, TRRD loss, backward, optimizer step) with both as inputs.

Memory: a thread reads this process's resident set (/proc/self/statm) every 2 ms; a phase's peak growth is its
highest reading minus the resident set just before the update began. A 256-token update runs first, so ZeRO-3's
gradient partitions, buckets and the optimizer state exist and sit in that baseline; what grows with L is
activations, saved tensors and the log-prob buffers. The launcher's environment fixes glibc's mmap threshold
(benchmarks.common.MEMORY_ENV) so freed blocks leave the resident set. `ru_maxrss` is recorded too, as a check of
the sampler on runs whose length is the largest so far.

Variants (each NAME@LENGTH, after the plain lengths): `tiled` (--tiled_mlp_shards 8), `checkpointing`
(gradient checkpointing), `offload` (checkpointing with --offload_activations).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from benchmarks.common import current_rss_bytes, peak_rss_bytes

PROMPT = 64
TILES = 8


class PeakRSS:
    """The highest resident set seen while the block runs, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak, self._thread = current_rss_bytes(), threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def make_batch(length: int, vocab: int, data_rank: int, device):
    import torch

    from rlad_ds.batch import Batch

    generator = torch.Generator().manual_seed(1000 * data_rank + length)
    ids = torch.randint(3, vocab, (1, PROMPT + length), generator=generator).to(device)
    loss_mask = torch.zeros(1, PROMPT + length - 1, dtype=torch.bool, device=device)
    loss_mask[:, PROMPT - 1 :] = True
    ones = torch.ones(1, device=device)
    return Batch(ids, torch.ones_like(ids), loss_mask, ones, ones)


def one_update(trainer, batch) -> dict:
    """Teacher and old-policy scoring, then the update; each phase's peak resident set."""
    from rlad_ds.step_metrics import StepMetrics
    from rlad_ds.timing import Timer

    models, peaks = trainer.models, {}
    with PeakRSS() as peak:
        batch.teacher_logp = models.teacher_scorer.logprobs(batch.input_ids, batch.attention_mask)
    peaks["teacher"] = peak.peak
    with PeakRSS() as peak:
        batch.old_logp = models.student_scorer.logprobs(batch.input_ids, batch.attention_mask)
    peaks["old_policy"] = peak.peak
    with PeakRSS() as peak:
        trainer.update(batch, Timer(), StepMetrics(models.device, trainer.world_size))
    peaks["train"] = peak.peak
    return peaks


def set_variant(models, variant: str) -> None:
    """Tiles, checkpointing and offload switched on the built models (what the flags do, without a rebuild)."""
    context, modules = models.long_context, [models.student.module, models.teacher_scorer.engine.module]
    for module in modules:
        for name, mlp in module.named_modules():
            if name.endswith("mlp"):
                vars(mlp).pop("forward", None)  # the class's own forward again: untiled
    context.tiled_mlp_shards = TILES if variant == "tiled" else 1
    if variant == "tiled":
        for module in modules:
            context.prepare(module)
    if variant in ("checkpointing", "offload"):
        models.student.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        models.student.module.gradient_checkpointing_disable()
    context.offload_activations = variant == "offload"


def build(args):
    from rlad_ds.config.parsing import parse_config
    from rlad_ds.methods import get_method
    from rlad_ds.models import load_tokenizer
    from rlad_ds.run_models import build_run_models
    from rlad_ds.trainer import Trainer

    flags = ["--student", args.student, "--teacher", args.teacher, "--method", "rlad", "--precision", "fp32"]
    flags += ["--sequence_parallel_size", str(args.sequence_parallel_size), "--output_dir", args.workdir]
    flags += ["--micro_batch_tokens", str(1 << 20), "--logprob_chunk_size", "1024", "--lr", "1e-6"]
    flags += ["--param_persistence_threshold", "0", "--attn_implementation", "sdpa"]
    cfg, _ = parse_config(flags)
    tokenizer, method = load_tokenizer(args.student), get_method("rlad")
    models = build_run_models(cfg, method, Path(args.student), Path(args.teacher), tokenizer)
    return Trainer(cfg, method, models, tokenizer, None, None, [], [])


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--student", "--teacher", "--out", "--workdir"):
        parser.add_argument(name, required=True)
    parser.add_argument("--sequence_parallel_size", type=int, default=1)
    parser.add_argument("--lengths", required=True, help="comma-separated response lengths, ascending")
    parser.add_argument("--variants", default="", help="comma-separated NAME@LENGTH")
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank

    import torch.distributed as dist

    from rlad_ds.distributed import end_process_group, init_process_group

    init_process_group(3600)
    trainer = build(args)
    models, vocab = trainer.models, trainer.models.student.module.config.vocab_size
    group = models.long_context.group
    one_update(trainer, make_batch(256, vocab, group.data_rank, models.device))  # warm-up
    runs = [("plain", int(n)) for n in args.lengths.split(",")]
    runs += [(v.split("@")[0], int(v.split("@")[1])) for v in args.variants.split(",") if v]
    records, maxrss_so_far = [], peak_rss_bytes()
    for variant, length in runs:
        set_variant(models, variant)
        batch = make_batch(length, vocab, group.data_rank, models.device)
        baseline, start = current_rss_bytes(), time.perf_counter()
        peaks = one_update(trainer, batch)
        seconds, maxrss = time.perf_counter() - start, peak_rss_bytes()
        record = {"variant": variant, "length": length, "seconds": seconds, "baseline_bytes": baseline}
        record.update({f"{phase}_peak_growth_bytes": value - baseline for phase, value in peaks.items()})
        record["peak_growth_bytes"] = max(peaks.values()) - baseline
        # ru_maxrss is a high-water mark: it measures this run only when the run set a new one.
        record["maxrss_growth_bytes"] = maxrss - baseline if maxrss > maxrss_so_far else None
        maxrss_so_far = maxrss
        records.append(record)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() == 0:
        result = {"sequence_parallel_size": group.size, "ranks": gathered}
        Path(args.out).write_text(json.dumps(result, indent=1))
    end_process_group()


if __name__ == "__main__":
    main()
