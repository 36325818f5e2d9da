"""Shared by the loss tests: a policy loss on some rows of a batch."""

import torch

from megatron_gppo.algorithm.losses import compute_policy_loss


def loss_on_rows(name: str, rows: slice, *, tensors: dict[str, torch.Tensor], **hparams):
    """`compute_policy_loss(name)` on `rows` of each `[batch, response_len]` tensor in `tensors`."""
    return compute_policy_loss(name, **{key: value[rows] for key, value in tensors.items()}, **hparams)
