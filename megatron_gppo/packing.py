"""Sequence packing: several samples end to end in one row, attention kept within each sample.

Rollout lengths spread over orders of magnitude, so padding every sample to
the longest wastes most of a micro-batch. A packed row holds several samples;
`segment_ids[r, t]` says which (1, 2, ... in row order; 0 is padding). The
model then needs, per row, positions that restart at every sample and an
attention mask that never crosses a sample boundary (`segment_positions`,
`block_causal_mask`, or `cu_seqlens` for Transformer Engine's THD layout),
and the loss sees one row per sample again (`SampleIndex`), so every
sequence-level quantity (seq-mean aggregations, GSPO's sequence ratio,
sequence counts) is exactly what the padded layout gives.

Planning (`plan_packed_rows`) is first-fit-decreasing into rows of the
longest sample's length, then a greedy balance of rows over data-parallel
ranks: every rank gets the same number of rows (so the same number of
micro-batches, which pipeline schedules need) and near-equal tokens.
Pure torch and Python; nothing here knows about megatron.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from megatron_gppo.batching import PolicyBatch, minibatch_slices, shard_rows


def sample_lengths(batch: PolicyBatch) -> list[int]:
    """Tokens each (one-sample) row needs: up to and including its last scored token; 0 if it has none.

    Tokens after the last scored one influence nothing (attention is causal),
    and a row without scored tokens adds nothing to any loss or metric.
    """
    assert batch.segment_ids is None, "sample_lengths reads one-sample rows"
    positions = torch.arange(1, batch.tokens.shape[1] + 1)
    return (batch.loss_mask.cpu() * positions).amax(dim=1).tolist()


def first_fit_decreasing(lengths: Sequence[int], *, capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins whose lengths sum to at most `capacity` (zero-length items dropped)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length == 0:
            continue
        assert length <= capacity, (length, capacity)
        slot = next((b for b, free in enumerate(room) if free >= length), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(index)
        room[slot] -= length
    return bins


def balance(weights: Sequence[int], *, num_ranks: int, slots_per_rank: int) -> list[list[int]]:
    """Indices of `weights` over `num_ranks` ranks of `slots_per_rank` each, heaviest first to the lightest rank."""
    assert len(weights) <= num_ranks * slots_per_rank
    heap = [(0, rank) for rank in range(num_ranks)]
    assigned: list[list[int]] = [[] for _ in range(num_ranks)]
    for index in sorted(range(len(weights)), key=lambda i: -weights[i]):
        load, rank = heapq.heappop(heap)
        assigned[rank].append(index)
        if len(assigned[rank]) < slots_per_rank:
            heapq.heappush(heap, (load + weights[index], rank))
    return assigned


def plan_packed_rows(lengths: Sequence[int], *, row_len: int, rows_per_micro_batch: int,
                     num_ranks: int) -> list[list[list[int]]]:
    """Per data-parallel rank, its packed rows (each a list of sample indices).

    Every rank gets the same number of rows, a multiple of `rows_per_micro_batch`
    (rows past the samples are empty), with near-equal token counts.
    """
    rows = first_fit_decreasing(lengths, capacity=row_len)
    group = rows_per_micro_batch * num_ranks
    num_micro_batches = max(1, -(-len(rows) // group))
    slots = num_micro_batches * rows_per_micro_batch
    row_tokens = [sum(lengths[i] for i in row) for row in rows]
    per_rank = balance(row_tokens, num_ranks=num_ranks, slots_per_rank=slots)
    return [[rows[r] for r in ranks_rows] + [[] for _ in range(slots - len(ranks_rows))] for ranks_rows in per_rank]


def pack_rows(batch: PolicyBatch, rows: Sequence[Sequence[int]], *, lengths: Sequence[int],
              row_len: int) -> PolicyBatch:
    """`batch`'s samples (one per row, right-padded) laid end to end: packed row i holds samples `rows[i]`.

    Sample j keeps its first `lengths[j]` tokens (its `sample_lengths`); the
    rest of a row is padding (segment 0, never scored).
    """
    order = torch.tensor([sample for row in rows for sample in row], dtype=torch.long)
    segments = torch.tensor([segment for row in rows for segment in range(1, len(row) + 1)], dtype=torch.long)
    sizes = torch.tensor(lengths, dtype=torch.long)[order]
    # Token k of the packed stream is column k - start(sample) of its sample's row.
    starts = torch.cumsum(sizes, 0) - sizes
    source_cols = torch.arange(int(sizes.sum())) - torch.repeat_interleave(starts, sizes)
    src = (torch.repeat_interleave(order, sizes), source_cols)
    counts = torch.tensor([sum(lengths[s] for s in row) for row in rows], dtype=torch.long)
    assert bool((counts <= row_len).all()), "a packed row is longer than row_len"
    dest = torch.arange(row_len) < counts.unsqueeze(1)  # [rows, row_len]; row-major order matches the stream

    def moved(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((len(rows), row_len), dtype=values.dtype)
        out[dest] = values[src]
        return out

    segment_ids = torch.zeros((len(rows), row_len), dtype=torch.long)
    segment_ids[dest] = torch.repeat_interleave(segments, sizes)
    tensors = {name: moved(value) for name, value in batch.tensors().items()}
    return replace(batch, **tensors, segment_ids=segment_ids)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` position of every token within its sample (padding runs count like samples)."""
    num_cols = segment_ids.shape[1]
    cols = torch.arange(num_cols, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_col = torch.where(starts, cols, torch.zeros_like(cols)).cummax(dim=1).values
    return cols - start_col


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """`[B, 1, T, T]` bool, True where query t may NOT attend to key s (megatron's convention).

    A token attends to itself and earlier tokens of its own sample; padding
    attends within its own run, so no softmax row is empty.
    """
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # [B, T, T]
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool,
                        device=segment_ids.device).tril()
    return (~(same & causal)).unsqueeze(1)


def cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 start offsets of every run (samples and padding) in the flattened `[B * T]` rows, plus the end.

    For Transformer Engine's THD layout (`PackedSeqParams`): the rows of a
    micro-batch become one sequence of runs; a row boundary always starts a run.
    """
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: segment_ids.shape[1]] = True
    offsets = torch.nonzero(starts).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([offsets, end]).to(torch.int32)


@dataclass(frozen=True)
class SampleIndex:
    """Where every sample of a packed `[B, T]` batch sits: `unpack` gives `[num_samples, max_len]`."""

    flat: torch.Tensor
    """int64 `[S, L]`: the flattened `[B * T]` position of each sample's tokens."""
    valid: torch.Tensor
    """bool `[S, L]`: False past a sample's end."""

    @classmethod
    def of(cls, segment_ids: torch.Tensor) -> SampleIndex:
        flat_ids = segment_ids.reshape(-1)
        rows = torch.arange(segment_ids.shape[0], device=flat_ids.device).repeat_interleave(segment_ids.shape[1])
        where = torch.nonzero(flat_ids > 0).flatten()
        if where.numel() == 0:  # an empty micro-batch: one empty sample keeps shapes valid
            zeros = torch.zeros((1, 1), dtype=torch.long, device=flat_ids.device)
            return cls(flat=zeros, valid=zeros.bool())
        key = rows[where] * (int(flat_ids.max()) + 1) + flat_ids[where]
        new = torch.ones_like(key, dtype=torch.bool)
        new[1:] = key[1:] != key[:-1]
        sample = new.cumsum(0) - 1
        starts = where[new]
        offset = where - starts[sample]
        lengths = torch.bincount(sample)
        num_samples, max_len = len(lengths), int(lengths.max())
        flat = torch.zeros((num_samples, max_len), dtype=torch.long, device=flat_ids.device)
        valid = torch.zeros((num_samples, max_len), dtype=torch.bool, device=flat_ids.device)
        flat[sample, offset] = where
        valid[sample, offset] = True
        return cls(flat=flat, valid=valid)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """`[B, T]` packed values -> `[S, L]`, one row per sample, zero (False) past its end."""
        gathered = values.reshape(-1)[self.flat]
        return torch.where(self.valid, gathered, torch.zeros((), dtype=values.dtype, device=values.device))

    def unpack_batch(self, batch: PolicyBatch) -> PolicyBatch:
        tensors = {name: self.unpack(value) for name, value in batch.tensors().items() if name != "segment_ids"}
        return replace(batch, **tensors, segment_ids=None)


@dataclass(frozen=True)
class RankBatch:
    """One data-parallel rank's part of a training batch, laid out for the policy."""

    batch: PolicyBatch
    """This rank's rows of every minibatch, one minibatch after the other (packed or one sample per row)."""
    minibatches: list[slice]
    """The rows of each minibatch in `batch`."""
    rows_per_micro_batch: int
    """The `micro_batch_size` to run `batch` with."""


def rank_batch(batch: PolicyBatch, *, num_minibatches: int, dp_rank: int, dp_size: int, micro_batch_size: int,
               pack: bool, max_tokens_per_micro_batch: int | None = None, seq_multiple: int = 1) -> RankBatch:
    """Split one-sample-per-row `batch` into minibatches and this rank's share of each.

    Padded (`pack=False`): `micro_batch_size` whole rows per micro-batch,
    contiguous rows per rank. Packed: rows as long as the longest sample
    (rounded up to `seq_multiple`), `max_tokens_per_micro_batch // row_len`
    of them per micro-batch (default `micro_batch_size`: the padded
    micro-batch's shape), balanced over ranks (see `plan_packed_rows`).
    Every rank must call this with the same `batch`.
    """
    minibatches = minibatch_slices(batch.num_rows, num_minibatches)
    if not pack:
        rows, segments = [], []
        for minibatch in minibatches:
            shard = shard_rows(minibatch.stop - minibatch.start, rank=dp_rank, world=dp_size)
            segments.append(slice(len(rows), len(rows) + shard.stop - shard.start))
            rows += range(minibatch.start + shard.start, minibatch.start + shard.stop)
        return RankBatch(batch.rows(torch.tensor(rows, dtype=torch.long)), segments, micro_batch_size)

    lengths = sample_lengths(batch)
    row_len = -(-max([1, *lengths]) // seq_multiple) * seq_multiple
    budget = max_tokens_per_micro_batch or micro_batch_size * row_len
    if row_len > budget:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit train.max_tokens_per_micro_batch={budget}; "
                         f"raise it to at least {row_len}")
    rows_per_micro_batch = budget // row_len
    rows, segments = [], []
    for minibatch in minibatches:
        plan = plan_packed_rows(lengths[minibatch], row_len=row_len, rows_per_micro_batch=rows_per_micro_batch,
                                num_ranks=dp_size)[dp_rank]
        segments.append(slice(len(rows), len(rows) + len(plan)))
        rows += [[minibatch.start + i for i in row] for row in plan]
    return RankBatch(pack_rows(batch, rows, lengths=lengths, row_len=row_len), segments, rows_per_micro_batch)


def per_sample(batch: PolicyBatch) -> PolicyBatch:
    """`batch` with one sample per row (itself when it is not packed)."""
    if batch.segment_ids is None:
        return batch
    return SampleIndex.of(batch.segment_ids).unpack_batch(batch)


__all__ = [
    "RankBatch", "SampleIndex", "balance", "block_causal_mask", "cu_seqlens", "first_fit_decreasing", "pack_rows",
    "per_sample", "plan_packed_rows", "rank_batch", "sample_lengths", "segment_positions",
]
