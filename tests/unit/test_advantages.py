"""GRPO group advantages, per-token broadcast and the dynamic-sampling filter."""

import pytest
import torch

from megatron_gppo.algorithm import dynamic_sampling_mask, group_advantages, token_advantages

F64 = torch.float64


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0], dtype=F64)
    advantages = group_advantages(rewards, group_size=4, eps=0.0)
    std_first = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64).std()  # unbiased: sqrt(1/3)
    assert std_first.item() == pytest.approx((1 / 3) ** 0.5)
    expected_first = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=F64) / std_first
    torch.testing.assert_close(advantages[:4], expected_first)
    assert torch.equal(advantages[4:8], torch.zeros(4, dtype=F64))  # all equal: exact zeros
    third = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=F64)
    torch.testing.assert_close(advantages[8:], (third - 2.0) / third.std())
    assert advantages.dtype == F64


def test_eps_keeps_small_spread_finite():
    advantages = group_advantages(torch.tensor([0.0, 1e-9]), group_size=2)
    assert torch.isfinite(advantages).all() and advantages.abs().max() < 1e-2


def test_without_std_normalisation_only_centres():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    advantages = group_advantages(rewards, group_size=3, normalize_std=False)
    torch.testing.assert_close(advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3]))


def test_group_size_one_gives_zeros():
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 5.0]), group_size=1), torch.zeros(3))


@pytest.mark.parametrize(
    "rewards, group_size, match",
    [
        (torch.zeros(7), 4, "not a multiple of group_size"),
        (torch.zeros(2, 4), 4, "1-D"),
        (torch.zeros(4), 0, "group_size"),
    ],
)
def test_bad_shapes_raise(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size=group_size)
    with pytest.raises(ValueError, match=match):
        dynamic_sampling_mask(rewards, group_size=group_size)


def test_token_advantages_broadcast_over_the_mask():
    loss_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per_token = token_advantages(torch.tensor([0.5, -2.0]), loss_mask=loss_mask)
    assert per_token.tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="does not match"):
        token_advantages(torch.tensor([0.5, -2.0, 1.0]), loss_mask=loss_mask)


def test_dynamic_sampling_keeps_groups_with_spread():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    keep = dynamic_sampling_mask(rewards, group_size=3)
    assert keep.tolist() == [False, False, True]
    assert keep.repeat_interleave(3).tolist() == [False] * 6 + [True] * 3
