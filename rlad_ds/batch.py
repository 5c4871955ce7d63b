"""One step's rollouts on this rank and everything the loss reads, each field tagged by its role, so that a
micro-batch is cut from a batch generically (as OpenRLHF's `Experience` does):

- `input`: [B, T] token rows (prompt + response) that a forward pass reads;
- `token`: [B, T-1] next-token-aligned per-token values (`x[:, t]` is about the token at `t + 1`): loss masks and
  log-probs of the sampled tokens;
- `sample`: [B] one value per response (rewards, advantages).

Batches of several sampling rounds (`--dynamic_sampling`) are joined by role too (`concat_batches`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

INPUT, TOKEN, SAMPLE = "input", "token", "sample"


def _field(role: str):
    return dataclasses.field(default=None, metadata={"role": role})


@dataclass
class Batch:
    input_ids: torch.Tensor = _field(INPUT)
    attention_mask: torch.Tensor = _field(INPUT)
    loss_mask: torch.Tensor = _field(TOKEN)  # 1 where a token's loss counts (the method's choice of tokens)
    advantages: torch.Tensor = _field(SAMPLE)
    rewards: torch.Tensor = _field(SAMPLE)
    teacher_logp: torch.Tensor | None = _field(TOKEN)
    ref_logp: torch.Tensor | None = _field(TOKEN)
    old_logp: torch.Tensor | None = _field(TOKEN)  # None with one PPO epoch: see `old`
    rollout_logp: torch.Tensor | None = _field(TOKEN)  # the sampler's own log-probs of its tokens, if it gave them
    # The rollout correction's weights and kept tokens, when computed for the whole batch (rlad_ds.sampler_mismatch).
    correction_weights: torch.Tensor | None = _field(TOKEN)
    correction_keep: torch.Tensor | None = _field(TOKEN)

    def micro(self, rows: torch.Tensor, cols: slice) -> Batch:
        """Rows `rows` of every field; columns `cols` of the [B, T-1] token fields, and the input columns that
        predict them (`cols.start : cols.stop + 1` of the [B, T] rows)."""
        columns = {INPUT: slice(cols.start, cols.stop + 1), TOKEN: cols}
        parts = {}
        for f in dataclasses.fields(self):
            value, role = getattr(self, f.name), f.metadata["role"]
            parts[f.name] = None if value is None else value[rows] if role == SAMPLE else value[rows][:, columns[role]]
        return Batch(**parts)

    def rows(self, rows: torch.Tensor) -> Batch:
        """Rows `rows` of every field, all columns."""
        return self.micro(rows, slice(0, self.input_ids.shape[1] - 1))

    def old(self, logp: torch.Tensor) -> torch.Tensor:
        """The old policy's log-probs. With one PPO epoch the policy that sampled the batch is the one being
        trained, so old = logp (no grad) and no old-policy pass runs."""
        return logp.detach() if self.old_logp is None else self.old_logp


def concat_batches(batches: list[Batch]) -> Batch:
    """The rows of several batches in one: `input` and `token` fields right-padded with zeros to the widest (a
    row's real tokens stay contiguous, and its masks are 0 on the padding, so no forward or loss reads it), `sample`
    fields joined. A field must be set in every batch or in none."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.input_ids.shape[1] for b in batches)
    parts = {}
    for f in dataclasses.fields(Batch):
        values = [getattr(b, f.name) for b in batches]
        if all(v is None for v in values):
            parts[f.name] = None
            continue
        if any(v is None for v in values):
            raise ValueError(f"batch field {f.name} is set in some batches and not in others")
        role = f.metadata["role"]
        if role != SAMPLE:
            target = width if role == INPUT else width - 1
            values = [torch.nn.functional.pad(v, (0, target - v.shape[1])) for v in values]
        parts[f.name] = torch.cat(values)
    return Batch(**parts)
