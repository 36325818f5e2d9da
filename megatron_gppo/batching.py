"""The one batch type of the policy (`PolicyBatch`), how samples become one, and how batches split.

Every per-token tensor is `[B, T]` and aligned with `tokens`: entry `t` is
about token `t`, predicted from `tokens[:, :t]`. Rows are right-padded;
padding is never scored, and position 0 never is (it has no prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from megatron_gppo.algorithm.advantages import token_advantages
from megatron_gppo.types import Sample


@dataclass(frozen=True, kw_only=True)
class PolicyBatch:
    """Sequences for the policy; every tensor is `[B, T]`, aligned with `tokens`."""

    tokens: torch.Tensor
    """int64 prompt + response token ids, right-padded (any id works as padding)."""

    loss_mask: torch.Tensor
    """bool: the response tokens to score (never position 0, which has no prediction)."""

    advantages: torch.Tensor | None = None
    """float: each sample's advantage on its response tokens (training only)."""

    old_log_probs: torch.Tensor | None = None
    """float log-probs of the policy that sampled the tokens, recomputed by the trainer (training only)."""

    rollout_log_probs: torch.Tensor | None = None
    """float log-probs reported by the rollout engine, for truncated importance sampling (optional)."""

    entropy_sensitivity: torch.Tensor | None = None
    """float S_t of each token under the sampling policy (`algorithm.diagnostics.entropy_sensitivity`), for the
    predicted-entropy-change metrics (optional)."""

    segment_ids: torch.Tensor | None = None
    """int64, packed rows only (see packing.py): 1, 2, ... for the samples of a row in order, 0 for padding.
    None: one sample per row, right-padded."""

    def __post_init__(self) -> None:
        shape = tuple(self.tokens.shape)
        if len(shape) != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {shape}")
        for name, value in self.tensors().items():
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have the shape of tokens {shape}, got {tuple(value.shape)}")
        if bool(self.loss_mask[:, 0].any()):
            raise ValueError("loss_mask[:, 0] must be False: the first token has no prediction")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The `[B, T]` tensors that are set, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: slice | torch.Tensor) -> PolicyBatch:
        """The rows at `index` (a slice, or a tensor of row numbers)."""
        return replace(self, **{name: value[index] for name, value in self.tensors().items()})

    def to(self, device: torch.device) -> PolicyBatch:
        return replace(self, **{name: value.to(device) for name, value in self.tensors().items()})

    def padded(self, *, num_rows: int, seq_len: int) -> PolicyBatch:
        """Right-pad to `[num_rows, seq_len]`; the added rows and columns are masked out."""
        rows, cols = self.tokens.shape
        if (rows, cols) == (num_rows, seq_len):
            return self
        return replace(self, **{name: torch.nn.functional.pad(value, (0, seq_len - cols, 0, num_rows - rows))
                                for name, value in self.tensors().items()})


def pad_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int) -> PolicyBatch:
    """Prompt + response rows, right-padded with `pad_id`; the response tokens are the loss mask."""
    assert prompts and len(prompts) == len(responses), "pad_rows needs one response per prompt"
    max_len = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), max_len), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        assert prompt, "every sample needs a non-empty prompt"
        tokens[row, : len(prompt) + len(response)] = torch.tensor([*prompt, *response])
        loss_mask[row, len(prompt) : len(prompt) + len(response)] = True
    return PolicyBatch(tokens=tokens, loss_mask=loss_mask)


def pack_samples(samples: list[Sample], *, pad_id: int) -> PolicyBatch:
    """Samples whose `advantage` is set, with their advantages and rollout log-probs."""
    assert all(s.advantage is not None for s in samples), "compute advantages before packing"
    batch = pad_rows([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id=pad_id)
    advantages = token_advantages(torch.tensor([s.advantage for s in samples], dtype=torch.float32),
                                  loss_mask=batch.loss_mask)
    # The mask's True entries, row by row, are the samples' response tokens in order.
    log_probs = torch.tensor([lp for s in samples for lp in s.rollout_log_probs], dtype=torch.float32)
    rollout_log_probs = torch.zeros(batch.tokens.shape).masked_scatter(batch.loss_mask, log_probs)
    return replace(batch, advantages=advantages, rollout_log_probs=rollout_log_probs)


def shard_rows(num_rows: int, *, rank: int, world: int) -> slice:
    """The contiguous rows of `rank` out of `world` near-equal shards."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def minibatch_slices(num_rows: int, num_minibatches: int) -> list[slice]:
    """Near-equal contiguous row ranges; never more minibatches than rows."""
    num = max(1, min(num_minibatches, num_rows))
    return [shard_rows(num_rows, rank=i, world=num) for i in range(num)]


__all__ = ["PolicyBatch", "minibatch_slices", "pack_samples", "pad_rows", "shard_rows"]
