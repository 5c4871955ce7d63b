"""Ulysses sequence parallelism (DeepSpeed's Arctic Long Sequence Training) for every pass that reads whole
responses: the student's update, its old-policy scoring and the teacher's and reference's scoring.

The N ranks of a sequence-parallel group hold the same samples; each feeds the model 1/N of a sequence's tokens.
Inside attention DeepSpeed's `UlyssesSPAttentionHF` swaps the sequence shards for head shards (all-to-all), runs the
core attention over the whole sequence on H/N heads and swaps back, so everything else (embeddings, MLPs, the
chunked lm-head) holds only its shard. Each rank scores its shard's tokens against targets shifted before the
split, and the per-token log-probs are gathered over the group (`gather_sequence`): every rank then has the whole
sequence's log-probs, computes the same loss, and back-propagates into its own shard only. DeepSpeed sums the
group's gradients and averages over the data-parallel groups.

Three things here differ from `UlyssesSPAttentionHF.register_with_transformers`, each for a hazard it has:

- it fixes one wrapper to one model's head counts and micro-batch size; here one wrapper per head shape is made
  on first use (`_ulysses_for`), so the teacher, with other head counts, gets its own;
- its `disable_in_eval` ties sharding to `module.training`; here sharding follows `sharded_compute()`, which the
  scoring passes and the update enter and generation never does (a student sampling in training mode stays whole);
- it is global and always on; here the flag is process-wide rather than thread-local, because autograd may run
  the recomputation of checkpointed layers on its own threads during backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from rlad_ds.errors import ConfigError

_ACTIVE = {"on": False}  # process-wide (see the module docstring)
_ULYSSES: dict[tuple, object] = {}  # (attention, heads, KV heads, head dim, batch) -> UlyssesSPAttentionHF
ATTENTION = ("sdpa", "flash_attention_2")  # what DeepSpeed's wrapper drives without a 4D mask


@contextlib.contextmanager
def sharded_compute():
    """Attention runs sequence-parallel and MLPs tiled (`rlad_ds.long_context`) inside; whole outside."""
    previous, _ACTIVE["on"] = _ACTIVE["on"], True
    try:
        yield
    finally:
        _ACTIVE["on"] = previous


def active() -> bool:
    return _ACTIVE["on"]


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: `size` ranks sharing every sequence, and which data-parallel rank the
    group is (its ranks read the same prompts and seed their sampling alike)."""

    size: int = 1
    rank: int = 0  # within the group
    group: object = None  # the torch process group (None when size is 1)
    source: int = 0  # global rank of the group's first rank: what the group trains on is that rank's
    data_rank: int = 0
    data_size: int = 1

    @property
    def mpu(self):
        """DeepSpeed's sequence-parallel state, for `deepspeed.initialize(mpu=...)` (None without one)."""
        if self.size == 1:
            return None
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

        return mpu


def init_sequence_group(size: int) -> SequenceGroup:
    """Groups of `size` consecutive ranks (DeepSpeed's `parallel_state_sp`, built once per process)."""
    from rlad_ds.distributed import world

    rank, world_size = world()
    if size == 1:
        return SequenceGroup(data_rank=rank, data_size=world_size, source=rank)
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(size)
    elif mpu.get_sequence_parallel_world_size() != size:
        raise ConfigError(
            f"this process already has sequence-parallel groups of {mpu.get_sequence_parallel_world_size()}"
        )
    return SequenceGroup(
        size, rank % size, mpu.get_sequence_parallel_group(), rank - rank % size, rank // size, world_size // size
    )


def check_heads(model_config: dict, size: int, role: str) -> None:
    """Refuse a model whose attention heads or KV heads do not divide by the sequence-parallel size (Ulysses splits
    both across the group), from its config.json, before anything loads."""
    text = model_config.get("text_config") or model_config
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    if size > 1 and isinstance(heads, int) and (heads % size or kv_heads % size):
        divisors = [n for n in range(2, heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise ConfigError(
            f"--sequence_parallel_size {size} must divide the {role}'s {heads} attention heads and {kv_heads} KV "
            f"heads (config.json): use {' or '.join(map(str, divisors)) or 1}"
        )


# ---- attention -------------------------------------------------------------------------------------------------


def install_attention(attn_implementation: str, group: SequenceGroup) -> None:
    """Wrap transformers' `attn_implementation` so that inside `sharded_compute()` it runs through a Ulysses wrapper
    made for the calling module's head shape; outside, the core attention runs untouched (once per process)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    core = ALL_ATTENTION_FUNCTIONS[attn_implementation]
    if getattr(core, "rlad_core_attention", None) is not None:
        return

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not active():
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        ulysses = _ulysses_for(core, attn_implementation, query, key, group)
        # Causality comes from the gathered position ids: the local shard's mask is meaningless after the exchange.
        return ulysses(module, query, key, value, None, *args, **kwargs)

    attention.rlad_core_attention = core
    ALL_ATTENTION_FUNCTIONS[attn_implementation] = attention


def _ulysses_for(core, attn_implementation: str, query, key, group: SequenceGroup):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    batch, heads, _, head_dim = query.shape
    shape = (attn_implementation, heads, key.shape[1], head_dim, batch)
    if shape not in _ULYSSES:
        _ULYSSES[shape] = UlyssesSPAttentionHF(
            attn=core,
            batch_size=batch,
            attn_head_count=heads,
            attn_head_size=head_dim,
            kv_head_count=key.shape[1],
            num_hidden_layers=1,  # only read by DeepSpeed's debug mode
            process_group=group.group,
            seq_length_is_variable=True,
            disable_in_eval=False,
        )
        _ULYSSES[shape].core_attn_implementation = attn_implementation
    return _ULYSSES[shape]


# ---- shards and their gathering --------------------------------------------------------------------------------


class _GatherSequence(torch.autograd.Function):
    """[B, S/N] per rank -> [B, S] on every rank; backward keeps the rank's own slice of the gradient, times N.

    Every rank computes the same loss from the gathered values, so a shard's gradient is whole on its own rank, and
    the group's shards add up to the sequence's gradient. ZeRO-3's reduce-scatter (`reduce_scatter: true`, which
    `rlad_ds.ds_config` requires with sequence parallelism) averages over every rank, the N of a group included:
    the factor N turns that average into the sum over the group and the mean over data-parallel ranks (verl's
    `grad_scaler` for FSDP, and ALST's differentiable all-gather of the loss, do the same)."""

    @staticmethod
    def forward(ctx, local, group, rank, size):
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        ctx.rank, ctx.size, ctx.width = rank, size, local.shape[1]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        own = grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width] * ctx.size
        return own, None, None, None


def gather_sequence(local: torch.Tensor | None, group: SequenceGroup) -> torch.Tensor | None:
    return None if local is None else _GatherSequence.apply(local, group.group, group.rank, group.size)


def shard_row(input_ids, position_ids, group: SequenceGroup, pad_token_id: int = 0):
    """This rank's shard of one row [1, L] (input ids, position ids, and the targets shifted before the split, so
    that a shard's last position is scored against the next shard's first token), padded at the end to a multiple
    of the group size. Padding comes after every real token, so causal attention never lets it in."""
    length = input_ids.shape[1]
    padded = -(-length // group.size) * group.size
    extra = padded - length
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, extra + 1), value=pad_token_id)
    input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=pad_token_id)
    tail = position_ids[:, -1:] + 1 + torch.arange(extra, device=position_ids.device)
    position_ids = torch.cat([position_ids, tail], dim=1)
    width = padded // group.size
    part = slice(group.rank * width, (group.rank + 1) * width)
    return input_ids[:, part], position_ids[:, part], targets[:, part]


def same_in_group(value, group: SequenceGroup):
    """`value` as the group's first rank has it, on every rank of the group (tensors of a dataclass travel through
    the host): the group trains on one rollout and one set of rewards, even where sampling or a verifier's timeout
    is not deterministic."""
    if group.size == 1:
        return value
    import torch.distributed as dist

    tensors = {}
    if dataclasses.is_dataclass(value):
        tensors = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        value = dataclasses.replace(value, **{k: v.cpu() for k, v in tensors.items()})
    payload = [value]
    dist.broadcast_object_list(payload, src=group.source, group=group.group)
    value = payload[0]
    if tensors:
        value = dataclasses.replace(value, **{k: getattr(value, k).to(v.device) for k, v in tensors.items()})
    return value


def check_config(cfg, world_size: int) -> None:
    """What sequence parallelism needs of the flags and the world, checked before anything loads."""
    size, model = cfg.train.sequence_parallel_size, cfg.model
    if size == 1:
        return
    if world_size % size:
        raise ConfigError(f"--sequence_parallel_size {size} does not divide the {world_size} ranks; use a divisor")
    if model.attn_implementation not in ("auto", *ATTENTION):
        raise ConfigError(
            f"--sequence_parallel_size {size} runs with sdpa or flash_attention_2 (DeepSpeed's Ulysses drops the "
            f"4D mask {model.attn_implementation} needs); pass --attn_implementation auto"
        )
    from rlad_ds.ds_config import load_ds_config

    if load_ds_config(cfg.deepspeed).get("zero_optimization", {}).get("reduce_scatter", True) not in (True, "auto"):
        raise ConfigError(
            f"--sequence_parallel_size {size} needs zero_optimization.reduce_scatter true in {cfg.deepspeed} (the "
            f"gradient averaging the sequence shards are scaled for); set it to true or remove it"
        )
    if model.pack_sequences == "on" and model.attn_implementation != "flash_attention_2":
        raise ConfigError(
            "--pack_sequences on with --sequence_parallel_size > 1 needs --attn_implementation flash_attention_2 "
            "(without its varlen kernels packed sequences would attend to each other); drop --pack_sequences"
        )
