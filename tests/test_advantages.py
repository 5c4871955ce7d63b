import itertools
import statistics

import pytest
import torch

from rlad_ds.advantages import group_advantages


def brute_force(rewards, group_size, eps=1e-6):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean, std = statistics.fmean(group), statistics.pstdev(group)
        out += [0.0 if std == 0 else (r - mean) / (std + eps) for r in group]
    return out


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_matches_brute_force_population_std(group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 3, (4 * group_size,), generator=g).float() / 2
    adv, stats = group_advantages(rewards, group_size)
    assert adv.tolist() == pytest.approx(brute_force(rewards.tolist(), group_size), abs=1e-6)
    assert adv.dtype == torch.float32


def test_every_binary_group_of_four():
    for pattern in itertools.product([0.0, 1.0], repeat=4):
        adv, stats = group_advantages(torch.tensor(pattern), 4)
        assert adv.tolist() == pytest.approx(brute_force(list(pattern), 4), abs=1e-6)
        assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)
        assert stats["zero_std_frac"] == (1.0 if len(set(pattern)) == 1 else 0.0)


def test_zero_spread_groups_are_zero_and_counted():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    adv, stats = group_advantages(rewards, 3)
    assert adv[:3].tolist() == [0.0] * 3 and adv[6:].tolist() == [0.0] * 3
    assert stats["zero_std_frac"] == pytest.approx(2 / 3)


def test_without_std_scaling_keeps_the_mean_baseline():
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale_by_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(5), 2)
