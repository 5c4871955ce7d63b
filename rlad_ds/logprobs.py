"""Per-token log-probs that never hold [B, T, V] fp32 logits (micro-batching and packing: `rlad_ds.microbatches`).

`token_logprobs` runs the model as usual but swaps the lm-head's forward for a chunked one: the lm-head
module is still *called*, so ZeRO-3's module hooks gather its (possibly tied) weight before the chunked
computation and gather it again before backward, and its gradient is reduce-scattered like any other.
The custom autograd function keeps only the hidden states and one fp32 log-sum-exp per token and
recomputes each chunk's logits in backward, so memory is bounded by one [chunk, V] block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy

# A chunk holds about this many logits (256 MiB in fp32), whatever the vocabulary: 441 rows at V = 151,936.
_CHUNK_ELEMENTS = 1 << 26


def auto_chunk_size(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab_size)


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log p(target) and entropy of softmax(hidden @ weight.T / temperature), one row chunk at a time.

    Work on a chunk's [chunk, V] block is done in place wherever the maths allows, so forward and
    backward each hold at most two such blocks at once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, with_entropy):
        ctx.set_materialize_grads(False)  # an unused output (e.g. entropy kept as a metric) costs no backward
        rows = hidden.shape[0]
        logp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        log_sum_exp = torch.empty_like(logp)
        entropy = torch.zeros_like(logp)
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            logits = _chunk_logits(hidden[start:end], weight, temperature)
            target = targets[start:end]
            # DeepSpeed's chunked CE gives -log p without an fp32 copy of the whole [chunk, V] block.
            neg_logp = chunked_cross_entropy(logits, target, reduction="none")
            logp[start:end] = -neg_logp
            lse = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1).float() + neg_logp
            log_sum_exp[start:end] = lse
            if with_entropy:
                # H = -sum_v p_v log p_v: log p in place of the (no longer needed) logits, one probability
                # block, and a batched dot product with no [chunk, V] temporary.
                log_probs = logits.float().sub_(lse[:, None])
                probs = log_probs.exp()
                entropy[start:end] = -torch.bmm(probs[:, None, :], log_probs[:, :, None]).view(-1)
        ctx.save_for_backward(hidden, weight, targets, log_sum_exp, entropy)
        ctx.chunk_size, ctx.temperature, ctx.with_entropy = chunk_size, temperature, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, log_sum_exp, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulated over chunks in fp32 (a bf16 sum over many chunks would lose the small ones).
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        if grad_logp is None:
            grad_logp = torch.zeros_like(log_sum_exp)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            g = grad_logp[start:end, None]
            # log p = z - lse, computed in place in the recomputed logits block.
            log_probs = _chunk_logits(hidden[start:end], weight, ctx.temperature).float()
            log_probs.sub_(log_sum_exp[start:end, None])
            # d log p_t / dz = onehot(t) - p ;  dH / dz = -p * (log p + H)
            if use_entropy:
                g_h = grad_entropy[start:end, None]
                grad_logits = log_probs.exp()
                log_probs.mul_(-g_h).sub_(g + g_h * entropy[start:end, None])
                grad_logits.mul_(log_probs)
            else:
                grad_logits = log_probs.exp_().mul_(-g)
            grad_logits.scatter_add_(-1, targets[start:end, None], g)
            if ctx.temperature != 1.0:
                grad_logits.div_(ctx.temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden[start:end])
                else:
                    grad_weight += (grad_logits.t() @ hidden[start:end]).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_logits(hidden, weight, temperature):
    logits = hidden @ weight.t()
    return logits.div_(temperature) if temperature != 1.0 else logits


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """(log p(targets) [..., ], entropy [...] or None) from hidden [..., H] and an lm-head weight [V, H].

    `chunk_size` rows of logits are alive at a time; None sizes chunks to about 2^26 logits.
    """
    chunk_size = auto_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    shape = targets.shape
    logp, entropy = _ChunkedTokenLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1).long(),
        int(chunk_size),
        float(temperature),
        bool(with_entropy),
    )
    return logp.view(shape), (entropy.view(shape) if with_entropy else None)


@dataclass
class TokenLogProbs:
    """logprobs[b, t] = log p(input_ids[b, t + 1] | input_ids[b, :t + 1]); entropy of that distribution if asked."""

    logprobs: torch.Tensor  # [B, T-1] fp32
    entropy: torch.Tensor | None = None  # [B, T-1] fp32


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only, as HF generate computes them for left-padded prompts."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    targets: torch.Tensor | None = None,
) -> TokenLogProbs:
    """Per-token log-probs of `input_ids` under `model` (an HF causal LM or a DeepSpeed engine around one).

    Positions follow the attention mask (left padding is skipped) unless `position_ids` is given; for a
    packed row (see `pack_rows`) pass its position_ids and no attention mask. Runs under the caller's
    grad mode: inside `torch.no_grad()` it is a pure scoring pass. With `targets` ([B, T], a shard of a longer
    sequence whose last target is the next shard's first token) every position is scored against its target,
    and the result is [B, T].
    """
    module = getattr(model, "module", model)
    lm_head = module.get_output_embeddings()
    scored = slice(None) if targets is not None else slice(None, -1)
    targets = input_ids[:, 1:] if targets is None else targets
    if position_ids is None and attention_mask is not None:
        position_ids = positions_from_mask(attention_mask)

    def chunked_head(hidden):
        logp, entropy = chunked_token_logprobs(
            hidden[:, scored],
            lm_head.weight,
            targets,
            chunk_size=chunk_size,
            temperature=temperature,
            with_entropy=with_entropy,
        )
        return torch.stack([logp, entropy], dim=-1) if with_entropy else logp

    # An instance attribute shadows the class's forward for this one call; nn.Module.__call__ still runs
    # ZeRO-3's pre/post hooks around it.
    lm_head.forward = chunked_head
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        del lm_head.forward
    if with_entropy:
        return TokenLogProbs(out.logits[..., 0], out.logits[..., 1])
    return TokenLogProbs(out.logits)
