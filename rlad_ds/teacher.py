"""The frozen teacher: a ZeRO-3 inference engine (parameters optionally offloaded to CPU) that only scores.

It never generates and never keeps full-vocabulary logits: it returns the log-probs of the tokens the
student sampled, micro-batch by micro-batch under a token budget.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlad_ds.logprobs import microbatch_logprobs, microbatch_slices, synced_microbatch_count, token_logprobs
from rlad_ds.models import check_tokenizers_match, load_causal_lm, load_tokenizer


class Teacher:
    """A DeepSpeed engine around a frozen causal LM, plus `score`."""

    def __init__(self, engine, tokenizer, *, chunk_size: int | None = None, max_tokens_per_microbatch: int = 16384,
                 packed: bool = False):
        self.engine = engine
        self.packed = packed
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.max_tokens_per_microbatch = max_tokens_per_microbatch

    @classmethod
    def load(cls, path: str | Path, ds_config: dict, *, student_tokenizer, attn_implementation: str = "sdpa",
             trust_remote_code: bool = False, **score_options) -> "Teacher":
        """Check the tokenizer against the student's, build the model partitioned, wrap it with no optimizer.

        `ds_config` comes from `rlad_ds.ds_config.teacher_config`.
        """
        import deepspeed

        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        check_tokenizers_match(student_tokenizer, tokenizer)
        model = load_causal_lm(path, ds_config, attn_implementation=attn_implementation, trainable=False,
                               trust_remote_code=trust_remote_code)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return cls(engine, tokenizer, **score_options)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """[B, T-1] fp32 log-probs of input_ids[:, 1:] under the teacher; 0 where the target is padding.

        Every rank runs the same number of forwards (ZeRO-3 gathers are collective), padding with
        throw-away forwards when its batch needs fewer micro-batches than another rank's.
        """
        device = self.engine.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = torch.zeros(input_ids.shape[0], max(input_ids.shape[1] - 1, 0), dtype=torch.float32, device=device)
        micro_batches = microbatch_slices(attention_mask, self.max_tokens_per_microbatch, self.packed)
        # Agreed before the first forward: a count exchanged between forwards would meet another rank's gathers.
        fillers = synced_microbatch_count(len(micro_batches)) - len(micro_batches)
        for rows, cols in micro_batches:
            inputs = slice(cols.start, cols.stop + 1)
            out[rows, cols] = microbatch_logprobs(self.engine, input_ids[rows, inputs], attention_mask[rows, inputs],
                                                  packed=self.packed, temperature=temperature,
                                                  chunk_size=self.chunk_size).logprobs
        for _ in range(fillers):
            filler = torch.full((1, 2), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
            token_logprobs(self.engine, filler, torch.ones_like(filler), chunk_size=self.chunk_size)
        return out * attention_mask[:, 1:]
