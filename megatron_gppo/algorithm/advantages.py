"""GRPO group-relative advantages and the DAPO dynamic-sampling filter.

Rewards arrive as one flat `[num_groups * group_size]` tensor in which
consecutive samples answer the same prompt (one group). A group whose rewards
are all equal carries no learning signal: its advantages are zero, and dynamic
sampling drops it from the batch.
"""

from __future__ import annotations

import torch


def _grouped(rewards: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """`[num_groups * group_size]` -> `[num_groups, group_size]`, with a clear error on bad input."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size})")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages (paper eq. 2): (r - group mean) / (group std + eps).

    The std is the unbiased (Bessel-corrected) sample std, as in verl and the
    official CE-GPPO code. With `normalize_std=False` the advantage is just
    r - group mean (Dr. GRPO). A group whose rewards are all equal gets exact
    zeros (also when group_size is 1).

    Args:
        rewards: `[num_groups * group_size]`; consecutive samples form a group.
    Returns:
        `[num_groups * group_size]` advantages in the rewards' dtype.
    Raises:
        ValueError: rewards not 1-D, or not a multiple of `group_size`.
    """
    grouped = _grouped(rewards, group_size=group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if normalize_std and group_size > 1:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)
    all_equal = ~_has_spread(grouped).unsqueeze(-1)
    return torch.where(all_equal, torch.zeros_like(centred), centred).view(-1)


def _has_spread(grouped: torch.Tensor) -> torch.Tensor:
    """`[num_groups]` bool: True where a group's rewards are not all equal."""
    return grouped.amax(dim=-1) != grouped.amin(dim=-1)


def token_advantages(advantages: torch.Tensor, *, loss_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence advantages to every response token, zero off the mask.

    Args:
        advantages: `[batch]`.
        loss_mask: `[batch, response_len]`.
    Returns:
        `[batch, response_len]`.
    """
    if advantages.shape != loss_mask.shape[:1]:
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} does not match loss_mask batch {tuple(loss_mask.shape[:1])}"
        )
    per_token = advantages.unsqueeze(-1).expand(loss_mask.shape)
    return torch.where(loss_mask.bool(), per_token, torch.zeros_like(per_token))


def dynamic_sampling_mask(rewards: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: which groups to keep (their rewards are not all equal).

    Args:
        rewards: `[num_groups * group_size]`; consecutive samples form a group.
    Returns:
        `[num_groups]` bool keep mask; `mask.repeat_interleave(group_size)`
        gives the per-sample mask.
    Raises:
        ValueError: rewards not 1-D, or not a multiple of `group_size`.
    """
    return _has_spread(_grouped(rewards, group_size=group_size))
