"""Log-probs of sampled tokens under a model that does not train in that pass: the frozen teacher, the frozen
reference, and the student's old policy (its own training engine, no grad).

A `LogProbScorer` wraps a DeepSpeed engine and never keeps full-vocabulary logits: it returns the log-probs of the
tokens the student sampled, micro-batch by micro-batch under a token budget, at the rollout temperature (every
log-prob in the loss is of softmax(logits / T): docs/method.md#temperature).
"""

from __future__ import annotations

import torch

from rlad_ds.long_context import LongContext
from rlad_ds.microbatches import synced_microbatch_count


class LogProbScorer:
    """Per-token log-probs of given token ids under a (frozen, or no-grad) DeepSpeed engine."""

    def __init__(
        self,
        engine,
        tokenizer,
        *,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        max_tokens_per_microbatch: int = 16384,
        packed: bool = False,
        long_context: LongContext | None = None,
    ):
        self.engine = engine
        self.long_context = long_context if long_context is not None else LongContext()
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.max_tokens_per_microbatch = max_tokens_per_microbatch
        self.packed = packed

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T-1] fp32 log-probs of input_ids[:, 1:] at `temperature`; 0 where the target is padding.

        Every rank runs the same number of forwards (ZeRO-3 gathers are collective), padding with
        throw-away forwards when its batch needs fewer micro-batches than another rank's.
        """
        device = self.engine.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = torch.zeros(input_ids.shape[0], max(input_ids.shape[1] - 1, 0), dtype=torch.float32, device=device)
        long_context = self.long_context
        micro_batches = long_context.slices(attention_mask, self.max_tokens_per_microbatch, self.packed)
        # Agreed before the first forward: a count exchanged between forwards would meet another rank's gathers.
        fillers = synced_microbatch_count(len(micro_batches)) - len(micro_batches)
        with long_context.compute():
            for piece in micro_batches:
                rows, cols, inputs = piece.rows, piece.cols, slice(piece.cols.start, piece.cols.stop + 1)
                out[rows, cols] = long_context.logprobs(
                    self.engine,
                    input_ids[rows, inputs],
                    attention_mask[rows, inputs],
                    packed=self.packed,
                    spans=piece.spans,
                    temperature=self.temperature,
                    chunk_size=self.chunk_size,
                ).logprobs
            for _ in range(fillers):  # the same path as a real micro-batch: the same collectives on every rank
                filler = torch.full((1, 2), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
                long_context.logprobs(self.engine, filler, torch.ones_like(filler), chunk_size=self.chunk_size)
        return out * attention_mask[:, 1:]
