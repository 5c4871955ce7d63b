"""Group-relative advantages (GRPO): A_i = (R_i - mean_j R_j) / (std_j R_j + eps), population std (1/G); which
groups carry a signal at all; and DAPO's soft overlong punishment, a shaping of the reward by response length."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, dict]:
    """Normalise rewards within consecutive groups of `group_size` responses to the same prompt.

    `rewards` is `[N]` with N a multiple of `group_size`, groups contiguous (prompt p owns rows
    p*G .. p*G+G-1). Groups whose rewards are all equal give exactly zero advantage: they carry no
    learning signal, and their fraction is returned as `zero_std_frac` (a dead-batch indicator).
    `scale_by_std=False` keeps only the mean baseline (Dr.GRPO).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.double().view(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, unbiased=False, keepdim=True)
    centred = grouped - mean
    advantages = centred / (std + eps) if scale_by_std else centred
    zero_std = ~informative_groups(rewards, group_size)
    advantages = advantages.masked_fill(zero_std.unsqueeze(-1), 0.0)
    stats = {"zero_std_frac": zero_std.double().mean().item(), "reward_group_std": std.mean().item()}
    return advantages.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32), stats


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N / group_size] bool: the groups whose rewards are not all equal, the only ones a group advantage can learn
    from (DAPO's dynamic sampling keeps these)."""
    return rewards.double().view(-1, group_size).std(-1, unbiased=False) != 0


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (its Eq. 13, TRL's `get_soft_overlong_punishment`): 0 up to `max_len - cache`
    tokens, then falling linearly to -1 at `max_len`, -1 beyond; all 0 when `cache` is 0."""
    lengths = lengths.double()
    if cache <= 0:
        return torch.zeros_like(lengths)
    inside = ((max_len - cache) - lengths) / cache
    return torch.where(lengths > max_len, -1.0, torch.clamp(inside, max=0.0))
