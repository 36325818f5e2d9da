"""Sequence packing: planning, the packed layout, and the attention each token may use."""

import random

import torch

from megatron_gppo.batching import PolicyBatch, minibatch_slices, pad_rows
from megatron_gppo.packing import (
    SampleIndex, block_causal_mask, cu_seqlens, first_fit_decreasing, pack_rows, plan_packed_rows, rank_batch,
    sample_lengths, segment_positions,
)


def long_tailed_batch(num_samples: int, *, seed: int = 0) -> PolicyBatch:
    """Random prompts of 2-6 tokens and lognormal response lengths, one sample per row."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 50) for _ in range(rng.randint(2, 6))] for _ in range(num_samples)]
    responses = [[rng.randrange(1, 50) for _ in range(min(60, max(1, int(rng.lognormvariate(2.0, 0.9)))))]
                 for _ in range(num_samples)]
    batch = pad_rows(prompts, responses, pad_id=0)
    values = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(seed)) * batch.loss_mask
    return PolicyBatch(tokens=batch.tokens, loss_mask=batch.loss_mask, advantages=values, old_log_probs=values * 2)


def test_first_fit_decreasing_fills_bins_within_capacity():
    lengths = [7, 3, 0, 9, 4, 4, 1, 9]
    bins = first_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == [0, 1, 3, 4, 5, 6, 7]  # the empty item is dropped
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 9+1, 9, 7+3, 4+4 (37 tokens need at least 4 bins of 10)


def test_plan_gives_every_rank_the_same_rows_and_near_equal_tokens():
    rng = random.Random(1)
    lengths = [min(200, int(rng.lognormvariate(3.0, 1.0)) + 1) for _ in range(300)]
    for num_ranks, rows_per_micro_batch in ((1, 1), (2, 3), (4, 2)):
        plan = plan_packed_rows(lengths, row_len=200, rows_per_micro_batch=rows_per_micro_batch, num_ranks=num_ranks)
        assert len({len(rows) for rows in plan}) == 1 and len(plan[0]) % rows_per_micro_batch == 0
        assert sorted(i for rows in plan for row in rows for i in row) == list(range(300))
        tokens = [sum(lengths[i] for row in rows for i in row) for rows in plan]
        assert max(tokens) - min(tokens) <= 200, tokens
        assert all(sum(lengths[i] for i in row) <= 200 for rows in plan for row in rows)


def test_pack_then_unpack_gives_every_sample_back():
    batch = long_tailed_batch(40)
    lengths = sample_lengths(batch)
    rows = first_fit_decreasing(lengths, capacity=max(lengths))
    packed = pack_rows(batch, rows, lengths=lengths, row_len=max(lengths))
    assert packed.num_rows < batch.num_rows / 2
    assert int(packed.loss_mask.sum()) == int(batch.loss_mask.sum())
    unpacked = SampleIndex.of(packed.segment_ids).unpack_batch(packed)
    order = [sample for row in rows for sample in row]
    for got, sample in enumerate(order):
        n = lengths[sample]
        for name in ("tokens", "loss_mask", "advantages", "old_log_probs"):
            assert torch.equal(getattr(unpacked, name)[got, :n], getattr(batch, name)[sample, :n]), name
        assert not unpacked.loss_mask[got, n:].any()


def test_positions_mask_and_cu_seqlens_follow_the_samples():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert segment_positions(segment_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    mask = block_causal_mask(segment_ids)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                allowed = k <= q and segment_ids[b, q] == segment_ids[b, k]
                assert bool(mask[b, 0, q, k]) == (not allowed)
    assert cu_seqlens(segment_ids).tolist() == [0, 3, 5, 6, 12]


def test_attention_over_packed_rows_equals_attention_per_sample():
    """The mask's meaning, with plain softmax attention: a packed row attends like separate sequences."""
    torch.manual_seed(0)
    lengths = [5, 3, 4]
    segment_ids = torch.tensor([[1] * 5 + [2] * 3 + [3] * 4])
    q, k, v = (torch.randn(12, 8) for _ in range(3))
    scores = (q @ k.T).masked_fill(block_causal_mask(segment_ids)[0, 0], float("-inf"))
    packed = scores.softmax(-1) @ v
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        alone = (q[s] @ k[s].T).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(packed[s], alone.softmax(-1) @ v[s])
        start += n


def test_rank_batch_padded_splits_every_minibatch_over_ranks():
    for num_rows, num_minibatches, dp_size in ((10, 2, 2), (7, 3, 2), (3, 1, 4), (16, 4, 1)):
        batch = long_tailed_batch(num_rows)
        batch = PolicyBatch(tokens=torch.arange(num_rows).unsqueeze(1).expand(batch.tokens.shape),
                            loss_mask=batch.loss_mask)
        per_rank = [rank_batch(batch, num_minibatches=num_minibatches, dp_rank=r, dp_size=dp_size,
                               micro_batch_size=2, pack=False) for r in range(dp_size)]
        for m, minibatch in enumerate(minibatch_slices(num_rows, num_minibatches)):
            # Minibatch m on every rank is a piece of the same global minibatch.
            pieces = [mine.batch.tokens[mine.minibatches[m], 0].tolist() for mine in per_rank]
            assert sorted(row for piece in pieces for row in piece) == list(range(num_rows))[minibatch]


def test_rank_batch_packed_keeps_minibatches_apart_and_balances_ranks():
    batch = long_tailed_batch(64)
    lengths = sample_lengths(batch)
    per_rank = [rank_batch(batch, num_minibatches=2, dp_rank=r, dp_size=2, micro_batch_size=2, pack=True)
                for r in range(2)]
    assert {mine.rows_per_micro_batch for mine in per_rank} == {2}
    scored = [[int(mine.batch.rows(m).loss_mask.sum()) for m in mine.minibatches] for mine in per_rank]
    for m, minibatch in enumerate(minibatch_slices(64, 2)):
        assert sum(s[m] for s in scored) == int(batch.loss_mask[minibatch].sum())
        num_rows = {mine.minibatches[m].stop - mine.minibatches[m].start for mine in per_rank}
        assert len(num_rows) == 1 and num_rows.pop() % 2 == 0  # the same whole micro-batches on every rank
    assert per_rank[0].batch.tokens.shape[1] == max(lengths)


def test_rank_batch_refuses_a_budget_below_the_longest_sample():
    batch = long_tailed_batch(8)
    longest = max(sample_lengths(batch))
    try:
        rank_batch(batch, num_minibatches=1, dp_rank=0, dp_size=1, micro_batch_size=1, pack=True,
                   max_tokens_per_micro_batch=longest - 1)
    except ValueError as error:
        assert f"raise it to at least {longest}" in str(error)
    else:
        raise AssertionError("a budget below the longest sample was accepted")
    mine = rank_batch(batch, num_minibatches=1, dp_rank=0, dp_size=1, micro_batch_size=1, pack=True,
                      max_tokens_per_micro_batch=3 * longest + 1)
    assert mine.rows_per_micro_batch == 3
