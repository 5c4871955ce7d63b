"""The GPU check's model sections, each through the project's own code: attention backends on one packed
micro-batch of mixed lengths (`rlad_ds.microbatches`), an RLAD train step (`rlad_ds.run_models` + `Trainer.update`),
and the teacher scoring with parameter offload (`rlad_ds.run_models.load_frozen` + `LogProbScorer`)."""

from __future__ import annotations

import time

from benchmarks.gpu_check_base import (
    Check,
    init_distributed,
    matmul_params,
    median,
    mfu,
    model_dir,
    peak_tflops,
    random_model,
    run_config,
    synchronize,
    timed,
    token_ids,
    train_flops_per_token,
)

# (name, attn_implementation, packed): one micro-batch run padded as [rows, longest] or packed into one row.
ATTENTION_VARIANTS = (
    ("padded_sdpa", "sdpa", False),
    ("packed_sdpa", "sdpa", True),
    ("packed_flex_attention", "flex_attention", True),
    ("packed_flash_attention_2", "flash_attention_2", True),
)


def _attention_unavailable(check: Check, attn: str) -> str | None:
    from rlad_ds.models import flash_attention_unavailable_reason

    if attn == "flex_attention" and check.device != "cuda":
        return "flex_attention compiles its kernels with torch.compile (on CPU a C++ build of minutes): GPU only"
    if attn == "flash_attention_2":
        return flash_attention_unavailable_reason() if check.device == "cuda" else "flash-attn runs on CUDA only"
    return None


def _mixed_batch(check: Check, lengths, vocab: int):
    """Right-padded rows of `lengths` real tokens (pad id 0)."""
    import torch

    ids = token_ids(check, len(lengths), max(lengths), vocab)
    mask = torch.arange(max(lengths), device=ids.device)[None] < torch.tensor(lengths, device=ids.device)[:, None]
    return ids * mask, mask.long()


def _agreement(variants: dict) -> float:
    """Tolerance for every bf16 variant's log-probs against the fp32 reference: twice the padded sdpa's own bf16
    error (the rounding every variant shares), plus 1e-3 so that an exact baseline leaves room for reordering."""
    return 2 * variants["padded_sdpa"]["max_abs_diff"] + 1e-3


def attention(check: Check) -> None:
    """Log-probs of one micro-batch (e.g. 8K + 3K + 200 tokens) through `microbatch_logprobs`, padded and packed,
    per attention backend in bf16, against an fp32 padded sdpa reference; the median time of each."""
    import torch

    from rlad_ds.microbatches import microbatch_logprobs

    lengths, shape = check.sizes.attention_lengths, check.sizes.student
    model = random_model(check, shape, "float32").eval()
    ids, mask = _mixed_batch(check, lengths, shape["vocab_size"])
    real = mask[:, 1:].bool()
    check.record(lengths=list(lengths), layers=shape["num_hidden_layers"])
    with torch.no_grad():
        reference = microbatch_logprobs(model, ids, mask).logprobs
        model.to(torch.bfloat16)
        variants: dict = {}
        for name, attn, packed in ATTENTION_VARIANTS:
            why = _attention_unavailable(check, attn)
            if why is not None:
                check.skip(name, why)
                continue
            model.set_attn_implementation(attn)
            seconds, first, logp = timed(
                lambda p=packed: microbatch_logprobs(model, ids, mask, packed=p).logprobs,
                check.device,
                check.sizes.repeats,
            )
            diff = (logp - reference)[real].abs()
            variants[name] = dict(
                ms=round(median(seconds) * 1e3, 3),
                first_call_s=round(first, 3),
                tokens=sum(lengths) if packed else len(lengths) * max(lengths),
                mean_abs_diff=float(diff.mean()),
                max_abs_diff=float(diff.max()),
            )
            check.record(variants=variants)
    tolerance = _agreement(variants)
    check.record(tolerance=tolerance, summary=", ".join(f"{n} {v['ms']:.1f} ms" for n, v in variants.items()))
    off = {name: v["max_abs_diff"] for name, v in variants.items() if v["max_abs_diff"] > tolerance}
    if off:
        name, worst = max(off.items(), key=lambda item: item[1])
        raise RuntimeError(f"{name} log-probs are off the fp32 reference by {worst:.4f} > tolerance {tolerance:.4f}")


# ---- RLAD train step -------------------------------------------------------------------------------------------


def _student_flops(module, lengths) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of the student, its ZeRO-3 partitions counted whole."""
    config, seen, total = module.config, set(), 0
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += getattr(param, "ds_numel", param.numel())
    n_matmul = matmul_params(total, config.vocab_size, config.hidden_size, config.tie_word_embeddings)
    attn_dim = config.num_attention_heads * config.head_dim
    return total, train_flops_per_token(n_matmul, config.num_hidden_layers, attn_dim, lengths)


def _rlad_batch(check: Check, models, tokens: int, vocab: int):
    """One row of `tokens`: the first eighth a prompt, the rest a response with advantage 1, the teacher's
    log-probs scored by the run's teacher scorer."""
    import torch

    from rlad_ds.batch import Batch

    ids = token_ids(check, 1, tokens, vocab)
    mask = torch.ones_like(ids)
    loss_mask = mask[:, 1:].bool().clone()
    loss_mask[:, : tokens // 8] = False
    one = torch.ones(1, device=ids.device)
    batch = Batch(ids, mask, loss_mask, advantages=one, rewards=one)
    batch.teacher_logp = models.teacher_scorer.logprobs(ids, mask)
    return batch


def train_step(check: Check) -> None:
    """Full RLAD steps (forward with entropy, TRRD loss, backward, torch AdamW step under ZeRO-3) on one row of
    `train_tokens`; tokens/s and MFU over the timed steps."""
    from rlad_ds.methods import get_method
    from rlad_ds.models import load_tokenizer
    from rlad_ds.run_models import build_run_models
    from rlad_ds.step_metrics import StepMetrics
    from rlad_ds.timing import Timer
    from rlad_ds.trainer import Trainer

    init_distributed()
    sizes, method = check.sizes, get_method("rlad")
    student = model_dir(check, "student", sizes.student)
    # The student scores as its own teacher (not offloaded): the teacher's cost is the `teacher` section's.
    cfg = run_config(check, student, teacher=student, method="rlad", model={"teacher_offload": "off"})
    tokenizer = load_tokenizer(student)
    models = build_run_models(cfg, method, student, student, tokenizer)
    batch = _rlad_batch(check, models, sizes.train_tokens, sizes.student["vocab_size"])
    trainer = Trainer(cfg, method, models, tokenizer, None, None, [], [])
    seconds, norm, timer = [], 0.0, None
    for step in range(sizes.warmup_steps + sizes.train_steps):
        timer = Timer()
        synchronize(check.device)
        start = time.perf_counter()
        norm = trainer.update(batch, timer, StepMetrics(models.device))
        synchronize(check.device)
        if step >= sizes.warmup_steps:
            seconds.append(time.perf_counter() - start)
            check.record(step_seconds=[round(s, 4) for s in seconds], grad_norm=norm)
    _record_mfu(check, models.student.module, median(seconds), timer.times)


def _record_mfu(check: Check, module, step_s: float, phases: dict) -> None:
    tokens = check.sizes.train_tokens
    params, flops = _student_flops(module, [tokens])
    rate = tokens / step_s
    check.record(
        tokens=tokens,
        params=params,
        attn=module.config._attn_implementation,
        tokens_per_s=round(rate, 1),
        flops_per_token=flops,
        phases={k: round(v, 4) for k, v in phases.items()},
    )
    if check.device != "cuda":
        check.skip("mfu", "no peak bf16 rate for a CPU")
        check.record(summary=f"{rate:,.0f} tok/s")
        return
    import torch

    peak = peak_tflops(torch.cuda.get_device_name(0), check.peak_tflops)
    value = mfu(rate, flops, peak)
    check.record(peak_tflops=peak, mfu=value)
    mfu_text = f"MFU {value:.3f}" if value is not None else "MFU unknown (pass --peak_tflops)"
    check.record(summary=f"{rate:,.0f} tok/s at {tokens} tokens, {mfu_text}")


# ---- the teacher with parameter offload --------------------------------------------------------------------------


def _h2d_gbps() -> float:
    """Pinned host-to-device copy rate of 1 GiB: the ceiling of what offloaded parameters can stream at."""
    import torch

    source = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(source, device="cuda")
    seconds, _, _ = timed(lambda: target.copy_(source, non_blocking=True), "cuda", repeats=5)
    return 2**30 / 1e9 / median(seconds)


def teacher_offload(check: Check) -> None:
    """The frozen teacher (Qwen3-1.7B-shaped) as a run builds it, with `--teacher_offload auto` (on with a GPU),
    scoring one row of `teacher_tokens`; its parameters' bytes over the scoring time as a transfer rate."""
    import torch

    from rlad_ds.ds_config import frozen_ds_config
    from rlad_ds.logprob_scorer import LogProbScorer
    from rlad_ds.models import choose_attention, load_tokenizer, param_bytes
    from rlad_ds.run_models import load_frozen

    init_distributed()
    teacher = model_dir(check, "teacher", check.sizes.teacher)
    cfg = run_config(check, teacher)
    offload = check.device != "cpu"
    start = time.perf_counter()
    ds_config = frozen_ds_config(cfg, offload, 1, check.device)
    engine = load_frozen(teacher, ds_config, attn_implementation=choose_attention(check.device, "bf16"))
    scorer = LogProbScorer(engine, load_tokenizer(teacher), max_tokens_per_microbatch=cfg.train.micro_batch_tokens)
    tokens, nbytes = check.sizes.teacher_tokens, param_bytes(engine.module)
    check.record(offload=offload, load_seconds=round(time.perf_counter() - start, 2), param_gib=nbytes / 2**30)
    ids = token_ids(check, 1, tokens, check.sizes.teacher["vocab_size"])
    seconds, first, _ = timed(lambda: scorer.logprobs(ids, torch.ones_like(ids)), check.device, check.sizes.repeats)
    score_s = median(seconds)
    check.record(
        tokens=tokens,
        score_seconds=round(score_s, 4),
        first_score_seconds=round(first, 4),
        tokens_per_s=round(tokens / score_s, 1),
    )
    if not offload:
        check.skip("offload", "--teacher_offload auto is off on CPU (parameters are in host memory already)")
        check.record(summary=f"{score_s * 1e3:.0f} ms for {tokens} tokens, no offload")
        return
    streamed = nbytes / 1e9 / score_s
    h2d = _h2d_gbps()
    check.record(offload_gbps=round(streamed, 2), h2d_pinned_gbps=round(h2d, 2))
    check.record(summary=f"{score_s:.2f} s for {tokens} tokens, params {streamed:.1f} GB/s (pinned copy {h2d:.1f})")
