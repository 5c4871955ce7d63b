"""How a batch of rollouts is cut into token-budget micro-batches and, padding-free, packed into one row.

Everything about a batch's layout that needs host values (each row's first real column and length) is read in
one transfer per batch (`row_spans`); slicing, packing and unpacking then index with those host integers, so a
step's host synchronisations do not grow with its number of micro-batches (they would stall ZeRO-3's overlap of
communication and compute on accelerators).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlad_ds.logprobs import TokenLogProbs, token_logprobs

Span = tuple[int, int]  # (first real column, number of real tokens) of a row


def row_spans(attention_mask: torch.Tensor) -> list[Span]:
    """Every row's span of real tokens, in one transfer to the host. A row's real tokens must be contiguous
    (padding only at the ends, as rollouts are: prompts left-padded, responses right-padded)."""
    mask = attention_mask.bool()
    width = mask.shape[1]
    lengths = mask.sum(-1)
    starts = torch.where(lengths > 0, mask.long().argmax(-1), 0)
    ends = torch.where(lengths > 0, width - mask.flip(-1).long().argmax(-1), 0)
    spans = []
    for start, length, end in torch.stack([starts, lengths, ends], dim=1).tolist():
        if end - start != length:
            raise ValueError("a row's real tokens must be contiguous (padding only at the ends) to be packed")
        spans.append((start, length))
    return spans


@dataclass(frozen=True)
class MicroBatchSlice:
    """One micro-batch of a padded [B, T] batch: its rows, the columns of the [B, T-1] next-token-aligned tensors
    (the inputs that produce them are `cols.start : cols.stop + 1`), and each row's span within those inputs."""

    rows: torch.Tensor
    cols: slice
    spans: tuple[Span, ...]


def token_budget_microbatches(lengths: Sequence[int], max_tokens: int, padded: bool = True) -> list[list[int]]:
    """Split row indices into micro-batches whose token cost stays within `max_tokens`.

    Rows are taken longest first, so a padded micro-batch costs rows x its first row's length; packed
    (`padded=False`) costs the sum of lengths. A row longer than the budget gets a micro-batch to itself.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    batches: list[list[int]] = []
    cost = 0
    for index in order:
        length = int(lengths[index])
        new_cost = (len(batches[-1]) + 1) * int(lengths[batches[-1][0]]) if padded and batches else cost + length
        if batches and new_cost <= max_tokens:
            batches[-1].append(index)
            cost = new_cost
        else:
            batches.append([index])
            cost = length
    return batches


def microbatch_slices(attention_mask: torch.Tensor, max_tokens: int, packed: bool = False) -> list[MicroBatchSlice]:
    """Token-budget micro-batches of a padded batch, each trimmed of its all-padding columns.

    Every slice spans at least two input columns, so that a forward always has a target. `packed` budgets real
    tokens (see `microbatch_logprobs`) instead of padded rectangles. One host transfer for the whole batch.
    """
    seq_len, spans = attention_mask.shape[1], row_spans(attention_mask)
    slices = []
    for rows in token_budget_microbatches([length for _, length in spans], max_tokens, padded=not packed):
        rows = sorted(rows)
        real = [spans[r] for r in rows if spans[r][1]]
        first, last = (min(s for s, _ in real), max(s + n for s, n in real)) if real else (0, 0)
        first = min(first, max(seq_len - 2, 0))
        last = min(max(last, first + 2), seq_len)
        inner = tuple((start - first, length) if length else (0, 0) for start, length in (spans[r] for r in rows))
        index = torch.tensor(rows, device=attention_mask.device)
        slices.append(MicroBatchSlice(index, slice(first, last - 1), inner))
    return slices


def synced_microbatch_count(count: int) -> int:
    """The largest micro-batch count over all ranks: under ZeRO-3 every rank must run as many forwards.

    Call it before the first forward of the phase: it is a collective itself, and must not meet another
    rank's parameter gathers.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=get_accelerator().current_device_name())
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


@dataclass
class PackedRows:
    """Rows of a padded batch packed padding-free into one row; position ids restart at 0 per sequence."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    spans: Sequence[Span]  # where each sequence's real tokens are in its padded row
    seq_len: int  # T of the padded batch


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, spans: Sequence[Span] | None = None) -> PackedRows:
    """Pack the real tokens of each row into one row; `spans` (from `row_spans`) spares reading the mask again."""
    spans = row_spans(attention_mask) if spans is None else spans
    pieces = [row[start : start + length] for row, (start, length) in zip(input_ids, spans)]
    positions = [torch.arange(length, device=input_ids.device) for _, length in spans]
    return PackedRows(torch.cat(pieces)[None], torch.cat(positions)[None], spans, input_ids.shape[1])


def unpack_logprobs(packed_values: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """Spread [1, N-1] per-token values of a packed row back to the padded [B, T-1] layout (zeros elsewhere).

    Values whose target is the first token of the next sequence cross a boundary and are dropped.
    """
    values = packed_values.reshape(-1)
    out = values.new_zeros(len(packed.spans), packed.seq_len - 1)
    offset = 0
    for row, (start, length) in enumerate(packed.spans):
        if length > 1:
            out[row, start : start + length - 1] = values[offset : offset + length - 1]
        offset += length
    return out


def microbatch_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, packed: bool = False, spans=None, **options
) -> TokenLogProbs:
    """[n, T-1] log-probs of one micro-batch: run as the padded [n, T] block, or `packed` padding-free into
    one row whose position ids restart per sequence (flash-attention's varlen path, and transformers'
    packed-sequence masks elsewhere), so long responses of mixed lengths cost only their real tokens.
    `options` are `token_logprobs`'s (temperature, chunk_size, with_entropy); `spans` as for `pack_rows`."""
    if not packed:
        return token_logprobs(model, input_ids, attention_mask, **options)
    rows = pack_rows(input_ids, attention_mask, spans)
    out = token_logprobs(model, rows.input_ids, position_ids=rows.position_ids, **options)
    entropy = unpack_logprobs(out.entropy, rows) if out.entropy is not None else None
    return TokenLogProbs(unpack_logprobs(out.logprobs, rows), entropy)
