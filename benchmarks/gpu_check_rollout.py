"""The GPU check's rollout section: after one optimizer step of the ZeRO-3 student, an RL-sized batch (16 prompts x
8 samples x 1K tokens) from the gathered engine and from a colocated vLLM (woken at --vllm_gpu_memory_utilization
0.5, the stepped weights streamed in); greedy tokens of both compared, vLLM's bf16 log-probs against the trainer's.

Each engine samples as a training step does, inside one rollout session: its entry (the gathered engine gathers the
whole model; vLLM wakes and streams the stepped weights in) is timed apart from the batch's generate call, whose
tokens/s are decoding alone. The gathered engine runs first and vLLM last, so that nothing vLLM does (a hang, an
out-of-memory) can lose the numbers before it.
"""

from __future__ import annotations

import gc
import time

from benchmarks.gpu_check_base import Check, init_distributed, median, model_dir, run_config, synchronize, token_ids

PROMPT_VOCAB = 100  # prompt ids in [3, 100): the character tokenizer's own tokens


def greedy_agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far two engines' greedy responses to the same prompts agree: rows identical, and where they differ,
    the first position that does (the prefix before it is shared)."""
    firsts, shared, longest = [], 0, 0
    for a, b in zip(ours, theirs):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a != b:
            firsts.append(first)
        shared += first if a != b else len(a)
        longest += max(len(a), len(b))
    return dict(
        greedy_rows=len(ours),
        greedy_equal_rows=len(ours) - len(firsts),
        greedy_first_divergence_median=median(firsts) if firsts else None,
        greedy_shared_prefix_frac=shared / max(longest, 1),
    )


def _one_step(check: Check, cfg, method, models, tokenizer) -> None:
    """One GRPO optimizer step through `Trainer.update` (advantages +1 / -1): the weights the engines then
    sample from are not the ones vLLM was started with."""
    import torch

    from rlad_ds.batch import Batch
    from rlad_ds.step_metrics import StepMetrics
    from rlad_ds.timing import Timer
    from rlad_ds.trainer import Trainer

    ids = token_ids(check, 2, 2 * check.sizes.rollout_prompt_len, PROMPT_VOCAB)
    mask = torch.ones_like(ids)
    advantages = torch.tensor([1.0, -1.0], device=ids.device)
    batch = Batch(ids, mask, mask[:, 1:].bool(), advantages=advantages, rewards=advantages)
    Trainer(cfg, method, models, tokenizer, None, None, [], []).update(batch, Timer(), StepMetrics(models.device))
    check.record(optimizer_steps=int(models.student.global_steps))


def _session(check: Check, name: str, rollout, request, sampled, greedy_fn):
    """As a training step samples: one rollout session (its entry gathers the model, or wakes vLLM and streams the
    stepped weights in), a short warm-up call, the timed RL batch, then `greedy_fn()`; its numbers recorded under
    `name`. Returns greedy_fn's result and the batch's tokens/s."""
    from deepspeed.runtime.rollout import SamplingConfig

    warmup = SamplingConfig(max_new_tokens=8, temperature=1.0, n_samples_per_prompt=sampled.n_samples_per_prompt)
    synchronize(check.device)
    start = time.perf_counter()
    with rollout.session():
        synchronize(check.device)
        check.record(**{f"{name}_session_entry_seconds": round(time.perf_counter() - start, 3)})
        rollout.generate(request, warmup)
        synchronize(check.device)
        start = time.perf_counter()
        out = rollout.generate(request, sampled)
        synchronize(check.device)
        tokens, seconds = int(out.response_lengths.sum()), time.perf_counter() - start
        del out
        check.record(
            **{
                f"{name}_tokens": tokens,
                f"{name}_seconds": round(seconds, 3),
                f"{name}_tokens_per_s": round(tokens / seconds, 1),
            }
        )
        return greedy_fn(), tokens / seconds


def _responses(out) -> list[list[int]]:
    return [row[mask].tolist() for row, mask in zip(out.input_ids, out.response_mask)]


def _trainer_logprobs(engine, prompts: list[list[int]], responses: list[list[int]], pad: int) -> list:
    """The trainer's log-prob of each response token (`token_logprobs` on the ZeRO-3 engine, no grad)."""
    import torch

    from rlad_ds.logprobs import token_logprobs

    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=engine.device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=engine.device)
    with torch.no_grad():
        logp = token_logprobs(engine, ids, mask).logprobs.cpu()
    return [logp[i, len(p) - 1 : len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))]


def _compare_logprobs(check: Check, engine, prompts, outputs, pad: int) -> None:
    import torch

    samples = [out.outputs[0] for out in outputs]
    responses = [list(s.token_ids) for s in samples]
    theirs = [torch.tensor([entry[t].logprob for entry, t in zip(s.logprobs, s.token_ids)]) for s in samples]
    ours = _trainer_logprobs(engine, prompts, responses, pad)
    diff = torch.cat([(a - b).abs() for a, b in zip(ours, theirs)])
    check.record(
        logprob_tokens=int(diff.numel()),
        logprob_mean_abs_diff=float(diff.mean()),
        logprob_max_abs_diff=float(diff.max()),
    )


def _vllm(check: Check, cfg, models, tokenizer, student, request, sampled, greedy, reference, gathered_rate) -> str:
    """vLLM's part: start, then one session (wake, the stepped weights streamed in, the RL batch, greedy tokens with
    their log-probs), the log-probs against the trainer's."""
    import torch

    from rlad_ds.rollout.vllm import VLLMRollout

    if check.device == "cuda":
        torch.cuda.empty_cache()  # the gathered engine's cached blocks would count against vLLM's share
    start = time.perf_counter()
    vllm = VLLMRollout(models.student, tokenizer, student, cfg.rollout, seed=check.seed)
    try:
        check.record(vllm_startup_seconds=round(time.perf_counter() - start, 2))

        def greedy_with_logprobs():
            return vllm.generate_raw(request, vllm.sampling_params(greedy, logprobs=0))

        outputs, rate = _session(check, "vllm", vllm, request, sampled, greedy_with_logprobs)
        check.record(vllm_sync_seconds=round(vllm.sync_seconds, 3), vllm_over_gathered=round(rate / gathered_rate, 2))
        prompts = [row.tolist() for row in request.prompt_ids.cpu()]
        check.record(**greedy_agreement([list(o.outputs[0].token_ids) for o in outputs], reference))
        _compare_logprobs(check, models.student, prompts, outputs, tokenizer.pad_token_id)
    finally:
        vllm.shutdown()
    r = check.results
    return (
        f"vllm {rate:,.0f} tok/s ({r['vllm_over_gathered']}x), greedy equal {r['greedy_equal_rows']}/"
        f"{r['greedy_rows']}, logprob |diff| mean {r['logprob_mean_abs_diff']:.2e} max "
        f"{r['logprob_max_abs_diff']:.2e}"
    )


def rollout(check: Check) -> None:
    """One optimizer step, then the gathered engine's and vLLM's RL-sized batch, greedy tokens and log-probs."""
    import torch
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    from rlad_ds.methods import get_method
    from rlad_ds.models import load_tokenizer
    from rlad_ds.rollout.vllm import vllm_unavailable_reason
    from rlad_ds.run_models import build_run_models

    init_distributed()
    sizes, method = check.sizes, get_method("grpo")
    student = model_dir(check, "student", sizes.student)
    # lr 1e-3: one Adam step then moves most bf16 weights by more than their rounding step.
    rollout_cfg = {"vllm_gpu_memory_utilization": 0.5, "vllm_kv_cache_gb": 0.25}  # the first on GPU, the second CPU
    cfg = run_config(check, student, train={"lr": 1e-3}, rollout=rollout_cfg)
    tokenizer = load_tokenizer(student)
    models = build_run_models(cfg, method, student, None, tokenizer)
    _one_step(check, cfg, method, models, tokenizer)
    prompts = token_ids(check, sizes.rollout_prompts, sizes.rollout_prompt_len, PROMPT_VOCAB)
    request = RolloutRequest(prompt_ids=prompts, prompt_attention_mask=torch.ones_like(prompts))
    sampled = SamplingConfig(
        max_new_tokens=sizes.rollout_tokens, temperature=1.0, n_samples_per_prompt=sizes.rollout_samples
    )
    greedy = SamplingConfig(max_new_tokens=sizes.greedy_tokens, temperature=0.0, n_samples_per_prompt=1)
    check.record(
        batch=f"{sizes.rollout_prompts} prompts x {sizes.rollout_samples} samples x {sizes.rollout_tokens} new tokens"
    )
    gathered = models.student_rollout
    reference, rate = _session(
        check, "gathered", gathered, request, sampled, lambda: _responses(gathered.generate(request, greedy))
    )
    summary = f"gathered {rate:,.0f} tok/s"
    gc.collect()
    reason = vllm_unavailable_reason(models.student.module.config, check.device)  # on CPU: vLLM's CPU build
    if reason is not None:
        check.skip("vllm", reason)
    else:
        args = (cfg, models, tokenizer, student, request, sampled, greedy, reference, rate)
        summary += "; " + _vllm(check, *args)
    check.record(summary=summary)
