"""How a run computes over responses longer than one device holds: its sequence-parallel group
(`rlad_ds.sequence_parallel`), MLPs run in sequence tiles (DeepSpeed's `TiledMLP`) and checkpointed activations
offloaded to the host (DeepSpeed's `CheckpointHiddenStatesOffload`).

A `LongContext` is the one thing the trainer and the scorers ask how to cut a batch into micro-batches and how to
take a micro-batch's log-probs; with none of the options on it does exactly what `rlad_ds.microbatches` does.

- Micro-batches: with sdpa a sharded micro-batch holds one sequence, trimmed to its real tokens and padded to a
  multiple of N (DeepSpeed's wrapper drops the attention mask, so rows of different lengths, or packed rows, would
  attend across each other); with flash-attention's varlen path sequences are packed as usual, N times the
  per-rank token budget to a row.
- TiledMLP under ZeRO-3: every call of a tile gathers the MLP's parameters, a collective, so every rank must run
  as many tiles: the tile count is fixed per run (`--tiled_mlp_shards`), never derived from a micro-batch's
  length (RL batches have variable lengths), and a micro-batch is padded to a multiple of it so that
  `torch.chunk` always yields exactly that many tiles.
- Activation offload: DeepSpeed's `CheckpointHiddenStatesOffload`, one context per micro-batch, except that a layer
  input brought back in backward goes to its one consumer instead of a cache held until the context exits: with
  the cache every layer's input is back on the device by the end of backward, the very peak offloading is meant
  to remove (torch's non-reentrant checkpoint unpacks each saved input once). DeepSpeed offloads nothing on a CPU
  (the tensors are in host memory already).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from deepspeed.runtime.activation_checkpointing.offload_activations import (
    CheckpointHiddenStatesOffload,
    _OffloadedTensorRef,
)

from rlad_ds.logprobs import TokenLogProbs, token_logprobs
from rlad_ds.microbatches import microbatch_logprobs, microbatch_slices, pack_rows, row_spans, unpack_logprobs
from rlad_ds.sequence_parallel import (
    SequenceGroup,
    active,
    gather_sequence,
    init_sequence_group,
    same_in_group,
    shard_row,
    sharded_compute,
)


class LongContext:
    def __init__(
        self,
        group: SequenceGroup | None = None,
        tiled_mlp_shards: int = 1,
        offload_activations: bool = False,
        pad_token_id: int = 0,
    ):
        self._group = group
        self.tiled_mlp_shards = tiled_mlp_shards
        self.offload_activations = offload_activations
        self.pad_token_id = pad_token_id
        self._offload = None  # the last micro-batch's offload context

    @property
    def group(self) -> SequenceGroup:
        if self._group is None:  # none given: no sequence parallelism over the process group as it is now
            self._group = init_sequence_group(1)
        return self._group

    @property
    def offload_stats(self):
        """DeepSpeed's counters of the last micro-batch's activation offload (None before one)."""
        return None if self._offload is None else self._offload.stats

    @property
    def sharded(self) -> bool:
        return self.group.size > 1 or self.tiled_mlp_shards > 1

    def prepare(self, model) -> None:
        """Tile the model's dense MLPs (a no-op with one tile)."""
        if self.tiled_mlp_shards > 1:
            tile_mlps(model, self.tiled_mlp_shards)

    def compute(self):
        """The scope of the update and of each scoring pass: sharded attention and tiled MLPs inside."""
        return sharded_compute() if self.sharded else contextlib.nullcontext()

    def activation_offload(self):
        """One micro-batch's forward and backward with checkpointed layer inputs offloaded to the host."""
        if not self.offload_activations:
            return contextlib.nullcontext()
        from deepspeed.accelerator import get_accelerator

        self._offload = SingleUseOffload(use_pin_memory=get_accelerator().device_name() == "cuda")
        return self._offload

    def same_in_group(self, value):
        return same_in_group(value, self.group)

    def slices(self, attention_mask: torch.Tensor, max_tokens: int, packed: bool):
        """The micro-batches of a batch (see the module docstring)."""
        if self.group.size == 1:
            return microbatch_slices(attention_mask, max_tokens, packed)
        if packed:
            return microbatch_slices(attention_mask, max_tokens * self.group.size, packed=True)
        return microbatch_slices(attention_mask, 1)  # a budget of one token: every sequence alone

    def logprobs(self, model, input_ids, attention_mask, *, packed=False, spans=None, **options) -> TokenLogProbs:
        """`microbatch_logprobs` of one micro-batch, each rank of the group running 1/N of its tokens."""
        if self.group.size == 1:
            return microbatch_logprobs(model, input_ids, attention_mask, packed=packed, spans=spans, **options)
        spans = row_spans(attention_mask) if spans is None else spans
        if packed:
            rows = pack_rows(input_ids, attention_mask, spans)
            ids, positions = rows.input_ids, rows.position_ids
        else:
            if len(spans) != 1:  # one forward per micro-batch on every rank: ZeRO-3's gathers are collective
                raise ValueError(f"a sequence-parallel micro-batch without packing holds one row, not {len(spans)}")
            (start, length), width = spans[0], input_ids.shape[1]
            ids = input_ids[:, start : start + length]
            positions = torch.arange(length, device=ids.device)[None]
        local_ids, local_positions, targets = shard_row(ids, positions, self.group, self.pad_token_id)
        out = token_logprobs(model, local_ids, position_ids=local_positions, targets=targets, **options)
        logp, entropy = (gather_sequence(x, self.group) for x in (out.logprobs, out.entropy))
        if packed:
            return TokenLogProbs(
                unpack_logprobs(logp, rows), entropy if entropy is None else unpack_logprobs(entropy, rows)
            )

        def placed(values):
            full = values.new_zeros(1, width - 1)
            full[:, start : start + length - 1] = values[:, : length - 1]
            return full

        return TokenLogProbs(placed(logp), None if entropy is None else placed(entropy))


class SingleUseOffload(CheckpointHiddenStatesOffload):
    """DeepSpeed's offload of checkpointed layer inputs, each restored input handed over once, not cached."""

    def _unpack_tensor(self, maybe_ref):
        if isinstance(maybe_ref, _OffloadedTensorRef):
            return self.restore_input(maybe_ref.tensor_id)
        return maybe_ref


def tile_mlps(model, shards: int) -> None:
    """Run every dense MLP (a `*.mlp` module with a `down_proj`) through DeepSpeed's `TiledMLP` in `shards`
    sequence tiles while `sharded_compute()` is on (each tile's intermediate activations live one at a time, in
    forward and in backward, where TiledMLP recomputes them)."""
    for name, module in model.named_modules():
        if name.endswith("mlp") and hasattr(module, "down_proj") and "forward" not in vars(module):
            module.forward = functools.partial(_tiled_forward, module, type(module).forward, shards)


def _tiled_forward(module, forward, shards: int, x: torch.Tensor) -> torch.Tensor:
    if not active():
        return forward(module, x)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    length = x.shape[-2]
    padded = -(-length // shards) * shards  # torch.chunk then yields exactly `shards` tiles, in forward and backward
    if padded != length:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))
    out = TiledMLP.apply(forward, module, x, shards, list(module.parameters()))
    return out[..., :length, :] if padded != length else out
