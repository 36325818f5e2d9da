"""Packing samples into policy tensors and splitting rollout batches."""

import torch

from megatron_gppo.batching import minibatch_slices, pack_samples, shard_rows
from megatron_gppo.types import Sample


def sample(prompt, response, advantage):
    return Sample(group_index=0, sample_index=0, prompt_ids=prompt, response_ids=response,
                  rollout_log_probs=[-0.5 * (i + 1) for i in range(len(response))], finish_reason="stop",
                  weight_version="0", advantage=advantage)


def test_pack_marks_response_tokens_only():
    packed = pack_samples([sample([5, 6], [7, 8, 9], 1.5), sample([4], [3], -1.0)], pad_id=0)
    assert packed.tokens.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert packed.loss_mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    assert packed.advantages.tolist() == [[0, 0, 1.5, 1.5, 1.5], [0, -1.0, 0, 0, 0]]
    assert torch.equal(packed.rollout_log_probs[0, 2:], torch.tensor([-0.5, -1.0, -1.5]))
    assert packed.rows(slice(1, 2)).tokens.tolist() == [[4, 3, 0, 0, 0]]


def test_shards_cover_every_row_once():
    for num_rows in (0, 1, 5, 8, 13):
        for world in (1, 2, 3, 4):
            covered = [i for rank in range(world) for i in range(num_rows)[shard_rows(num_rows, rank=rank, world=world)]]
            assert covered == list(range(num_rows))
    assert minibatch_slices(5, 2) == [slice(0, 3), slice(3, 5)]
    assert minibatch_slices(2, 4) == [slice(0, 1), slice(1, 2)]
