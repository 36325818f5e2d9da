"""Next-token sampling: SGLang's filtering, and log-probs of the temperature-scaled distribution."""

import pytest
import torch

from megatron_gppo.rollout.sampling import sample_next_tokens


def _sample(logits, *, temperature=1.0, top_p=1.0, top_k=None, min_p=0.0, seed=0, **kwargs):
    rows, vocab = logits.shape
    return sample_next_tokens(
        logits, temperature=torch.full((rows,), temperature), top_p=torch.full((rows,), top_p),
        top_k=torch.full((rows,), top_k or vocab, dtype=torch.long), min_p=torch.full((rows,), min_p),
        generator=torch.Generator().manual_seed(seed), **kwargs)


def test_log_probs_are_of_the_temperature_scaled_distribution_before_filtering():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    tokens, log_probs, _ = _sample(logits, temperature=0.7, top_p=0.8, top_k=10)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs, expected)


def test_top_k_one_is_greedy():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(2))
    tokens, _, _ = _sample(logits, top_k=1)
    assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("kwargs, allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.5), {0}),            # token 0 alone holds more than half the mass
    (dict(top_p=0.75), {0, 1}),
    (dict(min_p=0.3), {0, 1}),         # p >= 0.3 * p_max
])
def test_filters_keep_only_allowed_tokens(kwargs, allowed):
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log().repeat(2000, 1)
    tokens, _, _ = _sample(logits, **kwargs)
    assert set(tokens.tolist()) == allowed


def test_unfiltered_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    tokens, _, _ = _sample(probs.log().repeat(20000, 1), temperature=1.0)
    freq = torch.bincount(tokens, minlength=3).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)


def test_top_logprobs():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    _, _, (values, ids) = _sample(logits, temperature=2.0, num_top_logprobs=3)
    expected = torch.log_softmax(logits / 2.0, -1).topk(3, dim=-1)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(ids, expected.indices)
