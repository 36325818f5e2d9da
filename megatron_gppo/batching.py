"""Samples -> padded `[B, T]` tensors for the policy, and the splits of a rollout batch.

Token `t` of a row is scored when it is a response token: the policy predicts
it from tokens `[0, t)`. Rows are right-padded with `pad_id`; padding is never
scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gppo.types import Sample


@dataclass(frozen=True, kw_only=True)
class RolloutTensors:
    """A rollout batch as tensors; every field is `[num_samples, max_len]`."""

    tokens: torch.Tensor
    """int64 prompt + response ids, right-padded."""
    loss_mask: torch.Tensor
    """bool: response tokens."""
    advantages: torch.Tensor
    """float32: each sample's advantage on its response tokens, 0 elsewhere."""
    rollout_log_probs: torch.Tensor
    """float32: the rollout engine's log-prob of each response token, 0 elsewhere."""

    def rows(self, index: slice | torch.Tensor) -> "RolloutTensors":
        return RolloutTensors(**{name: getattr(self, name)[index] for name in _FIELDS})

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


_FIELDS = ("tokens", "loss_mask", "advantages", "rollout_log_probs")


def pack_samples(samples: list[Sample], *, pad_id: int) -> RolloutTensors:
    """Pack samples whose `advantage` is set into right-padded tensors."""
    assert samples, "pack_samples needs at least one sample"
    max_len = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    shape = (len(samples), max_len)
    tokens = torch.full(shape, pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    advantages = torch.zeros(shape, dtype=torch.float32)
    rollout_log_probs = torch.zeros(shape, dtype=torch.float32)
    for row, sample in enumerate(samples):
        assert sample.advantage is not None, "compute advantages before packing"
        start, stop = len(sample.prompt_ids), len(sample.prompt_ids) + len(sample.response_ids)
        tokens[row, :stop] = torch.tensor(sample.prompt_ids + sample.response_ids)
        loss_mask[row, start:stop] = True
        advantages[row, start:stop] = sample.advantage
        rollout_log_probs[row, start:stop] = torch.tensor(sample.rollout_log_probs)
    # A prompt needs at least one token, so position 0 is never scored.
    assert not loss_mask[:, 0].any(), "every sample needs a non-empty prompt"
    return RolloutTensors(tokens=tokens, loss_mask=loss_mask, advantages=advantages,
                          rollout_log_probs=rollout_log_probs)


def shard_rows(num_rows: int, *, rank: int, world: int) -> slice:
    """The contiguous rows of `rank` out of `world` near-equal shards."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def minibatch_slices(num_rows: int, num_minibatches: int) -> list[slice]:
    """Near-equal contiguous row ranges; never more minibatches than rows."""
    num = max(1, min(num_minibatches, num_rows))
    return [shard_rows(num_rows, rank=i, world=num) for i in range(num)]
