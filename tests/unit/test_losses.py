"""Policy-loss registry: closed-form values and gradients, micro-batch exactness, extra terms, errors."""

import pytest
import torch

from megatron_gppo.algorithm import losses
from megatron_gppo.algorithm.losses import (AGGREGATIONS, POLICY_LOSSES, compute_policy_loss, loss_normalizers,
                                           truncated_is_weights)
from tests._losses import loss_on_rows

F64 = torch.float64

# A grid that puts tokens in every CE-GPPO region for every eps below: rows are
# advantages, columns are ratios r = exp(log_probs - old_log_probs).
GRID_ADVANTAGES = torch.tensor([-1.3, -0.4, 0.6, 1.1], dtype=F64)
GRID_RATIOS = torch.tensor([0.3, 0.55, 0.7, 0.95, 1.0, 1.05, 1.4, 1.6, 2.5, 4.0, 12.0], dtype=F64)


def grid_batch(seed: int = 0):
    """`[4, 11 + 6]`: the grid above plus random tokens, with a few padding tokens."""
    generator = torch.Generator().manual_seed(seed)
    num_random = 6
    num_rows = GRID_ADVANTAGES.numel()
    ratios = torch.cat(
        [
            GRID_RATIOS.expand(num_rows, -1),
            torch.empty(num_rows, num_random, dtype=F64).uniform_(0.4, 1.8, generator=generator),
        ],
        dim=1,
    )
    log_probs = -torch.empty_like(ratios).uniform_(0.05, 3.0, generator=generator)
    old_log_probs = log_probs - torch.log(ratios)
    advantages = GRID_ADVANTAGES.unsqueeze(-1).expand_as(ratios).clone()
    advantages[:, -num_random:] = torch.randn(num_rows, num_random, dtype=F64, generator=generator)
    loss_mask = torch.ones_like(ratios, dtype=torch.bool)
    loss_mask[1, -2:] = False
    loss_mask[3, -1] = False
    return log_probs.requires_grad_(True), old_log_probs, advantages, loss_mask


def random_batch(seed: int, *, batch: int = 6, length: int = 9, spread: float = 0.5):
    """Random log-probs near old ones, random advantages, ragged masks with an empty row."""
    generator = torch.Generator().manual_seed(seed)
    old_log_probs = -torch.empty(batch, length, dtype=F64).uniform_(0.05, 4.0, generator=generator)
    log_probs = (old_log_probs + spread * torch.randn(batch, length, dtype=F64, generator=generator)).clamp(max=-1e-3)
    advantages = torch.randn(batch, 1, dtype=F64, generator=generator).expand(batch, length).clone()
    advantages[0] = 0.0
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[2] = 0
    loss_mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(-1)
    entropy = torch.rand(batch, length, dtype=F64, generator=generator)
    rollout_log_probs = old_log_probs + 0.3 * torch.randn(batch, length, dtype=F64, generator=generator)
    return (
        log_probs.requires_grad_(True),
        old_log_probs,
        advantages,
        loss_mask,
        entropy.requires_grad_(True),
        rollout_log_probs,
    )


def grad_of(loss: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, tensor)
    return grad


# ---------------------------------------------------------------- CE-GPPO


@pytest.mark.parametrize(
    "eps_low, eps_high, beta1, beta2",
    [(0.2, 0.2, 0.5, 1.0), (0.2, 0.28, 0.75, 1.0), (0.1, 0.3, 1.0, 0.5), (0.25, 0.15, 0.0, 2.0)],
)
@pytest.mark.parametrize("dual_clip_c", [None, 3.0])
def test_ce_gppo_value_and_gradient_in_every_region(eps_low, eps_high, beta1, beta2, dual_clip_c):
    log_probs, old_log_probs, advantages, loss_mask = grid_batch()
    ratio = torch.exp(log_probs.detach() - old_log_probs)
    hparams = dict(eps_low=eps_low, eps_high=eps_high, beta1=beta1, beta2=beta2, dual_clip_c=dual_clip_c)

    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    dual = (advantages < 0) & (ratio > dual_clip_c) if dual_clip_c else torch.zeros_like(low)
    low_positive = (ratio < 1 - eps_low) & (advantages > 0)
    high_negative = (ratio > 1 + eps_high) & (advantages < 0) & ~dual
    inside = (ratio >= 1 - eps_low) & (ratio <= 1 + eps_high)
    for region in (low, high, low_positive, high_negative, inside) + ((dual,) if dual_clip_c else ()):
        assert (region & loss_mask).any()

    # d loss / d log_prob per token = -F * A with F from paper eq. 10.
    factor = torch.where(low, beta1 * (1 - eps_low), torch.where(high, beta2 * (1 + eps_high), ratio))
    factor = torch.where(dual, torch.zeros_like(factor), factor)
    expected_value = torch.where(
        low,
        -beta1 * (1 - eps_low) * advantages,
        torch.where(high, -beta2 * (1 + eps_high) * advantages, -ratio * advantages),
    )
    if dual_clip_c:
        expected_value = torch.where(dual, -dual_clip_c * advantages, expected_value)

    token_loss = losses.ce_gppo_token_loss(
        log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask, **hparams
    )
    torch.testing.assert_close(token_loss.loss[loss_mask], expected_value[loss_mask])
    assert torch.equal(token_loss.clipped_low, low & loss_mask)
    assert torch.equal(token_loss.clipped_high, high & loss_mask)
    assert torch.equal(token_loss.clipped_dual, dual & loss_mask)

    loss, metrics = compute_policy_loss(
        "ce_gppo",
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        loss_mask=loss_mask,
        **hparams,
    )
    num_tokens = loss_mask.sum()
    expected_grad = torch.where(loss_mask, -factor * advantages / num_tokens, torch.zeros_like(factor))
    torch.testing.assert_close(grad_of(loss, log_probs), expected_grad)
    torch.testing.assert_close(loss, expected_value[loss_mask].sum() / num_tokens)
    assert metrics["clip_frac_low"] == pytest.approx(((low & loss_mask).sum() / num_tokens).item())
    assert metrics["clip_frac_high"] == pytest.approx(((high & loss_mask).sum() / num_tokens).item())
    assert metrics["clip_frac_dual"] == pytest.approx(((dual & loss_mask).sum() / num_tokens).item())


@pytest.mark.parametrize("dual_clip_c", [None, 3.0])
@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.1, 0.28)])
def test_ce_gppo_reduces_to_ppo(dual_clip_c, eps_low, eps_high):
    log_probs, old_log_probs, advantages, loss_mask = grid_batch(seed=1)
    common = dict(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        loss_mask=loss_mask,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip_c=dual_clip_c,
    )
    ppo_loss, _ = compute_policy_loss("ppo", **common)
    ppo_grad = grad_of(ppo_loss, log_probs)

    zero_loss, _ = compute_policy_loss("ce_gppo", beta1=0.0, beta2=0.0, **common)
    torch.testing.assert_close(grad_of(zero_loss, log_probs), ppo_grad, rtol=0, atol=1e-15)
    assert zero_loss != ppo_loss  # only the gradient matches: clipped tokens cost 0, not PPO's constant

    one_token_loss = losses.ce_gppo_token_loss(beta1=1.0, beta2=1.0, **common)
    ppo_token_loss = losses.ppo_token_loss(**common)
    assert torch.equal(one_token_loss.loss[loss_mask], ppo_token_loss.loss[loss_mask])
    one_loss, _ = compute_policy_loss("ce_gppo", beta1=1.0, beta2=1.0, **common)
    assert one_loss.item() == ppo_loss.item()
    assert not torch.allclose(grad_of(one_loss, log_probs), ppo_grad)  # but the clipped tokens keep a gradient


def test_ce_gppo_defaults_are_the_papers_1_5b_setting():
    log_probs, old_log_probs, advantages, loss_mask = grid_batch()
    common = dict(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask)
    default = losses.ce_gppo_token_loss(**common).loss
    explicit = losses.ce_gppo_token_loss(
        eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0, dual_clip_c=None, **common
    ).loss
    assert torch.equal(default, explicit)


def test_extreme_log_ratio_stays_finite():
    log_probs = torch.tensor([[-0.1, -80.0, -1.0]], dtype=F64, requires_grad=True)
    old_log_probs = torch.tensor([[-90.0, -0.1, -1.0]], dtype=F64)
    advantages = torch.tensor([[-1.0, -1.0, 1.0]], dtype=F64)
    loss_mask = torch.ones(1, 3, dtype=torch.bool)
    for name in POLICY_LOSSES:
        loss, metrics = compute_policy_loss(
            name, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask
        )
        assert torch.isfinite(loss)
        assert torch.isfinite(grad_of(loss, log_probs)).all()
        assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())


def test_padding_with_infinite_log_probs_gets_zero_gradient():
    log_probs = torch.tensor([[-0.5, -0.7, float("-inf")]], dtype=F64, requires_grad=True)
    old_log_probs = torch.tensor([[-0.6, -0.2, float("-inf")]], dtype=F64)
    advantages = torch.tensor([[1.0, -1.0, 0.0]], dtype=F64)
    loss_mask = torch.tensor([[True, True, False]])
    for name in ("ce_gppo", "ppo", "gspo"):
        loss, _ = compute_policy_loss(
            name, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask
        )
        grad = grad_of(loss, log_probs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[0, 2] == 0


# ---------------------------------------------------------------- other losses vs their formulas


@pytest.mark.parametrize("name, eps_low, eps_high", [("ppo", 0.2, 0.2), ("grpo", 0.2, 0.2), ("dapo", 0.2, 0.28)])
def test_clipped_surrogate_value_and_gradient(name, eps_low, eps_high):
    log_probs, old_log_probs, advantages, loss_mask = grid_batch(seed=2)
    ratio = torch.exp(log_probs.detach() - old_log_probs)
    loss, metrics = compute_policy_loss(
        name, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask
    )
    per_token = torch.maximum(-ratio * advantages, -ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    num_tokens = loss_mask.sum()
    torch.testing.assert_close(loss, per_token[loss_mask].sum() / num_tokens)
    expected_grad = torch.where(loss_mask & ~clipped, -ratio * advantages / num_tokens, torch.zeros_like(ratio))
    torch.testing.assert_close(grad_of(loss, log_probs), expected_grad)
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] == pytest.approx(
        ((clipped & loss_mask).sum() / num_tokens).item()
    )


def test_dapo_clips_higher_than_ppo():
    log_probs = torch.log(torch.tensor([[0.5]], dtype=F64)).requires_grad_(True)
    old_log_probs = torch.log(torch.tensor([[0.5 / 1.25]], dtype=F64))  # ratio 1.25
    common = dict(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=torch.ones(1, 1, dtype=F64),
        loss_mask=torch.ones(1, 1, dtype=torch.bool),
    )
    _, ppo_metrics = compute_policy_loss("ppo", **common)
    dapo_loss, dapo_metrics = compute_policy_loss("dapo", **common)
    assert ppo_metrics["clip_frac_high"] == 1.0
    assert dapo_metrics["clip_frac_high"] == 0.0
    torch.testing.assert_close(grad_of(dapo_loss, log_probs), torch.tensor([[-1.25]], dtype=F64))


def test_ppo_dual_clip():
    ratio = torch.tensor([[0.5, 2.0, 5.0, 5.0]], dtype=F64)
    log_probs = torch.full_like(ratio, -1.0).requires_grad_(True)
    old_log_probs = log_probs.detach() - torch.log(ratio)
    advantages = torch.tensor([[-1.0, -1.0, -1.0, 1.0]], dtype=F64)
    loss_mask = torch.ones_like(ratio, dtype=torch.bool)
    token_loss = losses.ppo_token_loss(
        log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask, dual_clip_c=3.0
    )
    torch.testing.assert_close(token_loss.loss, torch.tensor([[0.8, 2.0, 3.0, -1.2]], dtype=F64))
    assert token_loss.clipped_dual.tolist() == [[False, False, True, False]]
    grad = grad_of(token_loss.loss.sum(), log_probs)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2.0, 0.0, 0.0]], dtype=F64))


def test_cispo_value_and_gradient():
    log_probs, old_log_probs, advantages, loss_mask = grid_batch(seed=3)
    ratio = torch.exp(log_probs.detach() - old_log_probs)
    loss, metrics = compute_policy_loss(
        "cispo",
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        loss_mask=loss_mask,
        eps_low=0.2,
        eps_high=0.3,
    )
    weight = ratio.clamp(0.8, 1.3)
    num_tokens = loss_mask.sum()
    per_token = -weight * advantages * log_probs.detach()
    torch.testing.assert_close(loss, per_token[loss_mask].sum() / num_tokens)
    expected_grad = torch.where(loss_mask, -weight * advantages / num_tokens, torch.zeros_like(ratio))
    torch.testing.assert_close(grad_of(loss, log_probs), expected_grad)
    assert metrics["clip_frac_low"] == pytest.approx((((ratio < 0.8) & loss_mask).sum() / num_tokens).item())
    assert metrics["clip_frac_high"] == pytest.approx((((ratio > 1.3) & loss_mask).sum() / num_tokens).item())


def test_gspo_matches_sequence_level_definition():
    log_probs, old_log_probs, advantages, loss_mask, _, _ = random_batch(seed=4, spread=0.002)
    eps_low, eps_high = 3e-4, 4e-4
    loss, metrics = compute_policy_loss(
        "gspo",
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        loss_mask=loss_mask,
        aggregation="seq_mean_token_mean",
    )
    # GSPO as written in its paper: min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean log-ratio), mean over sequences.
    reference_log_probs = log_probs.detach().clone().requires_grad_(True)
    num_seq_tokens = loss_mask.sum(-1)
    diff = torch.where(loss_mask, reference_log_probs - old_log_probs, torch.zeros_like(old_log_probs))
    seq_ratio = torch.exp(diff.sum(-1) / num_seq_tokens.clamp(min=1))
    seq_advantage = advantages[:, 0]
    seq_loss = torch.maximum(-seq_ratio * seq_advantage, -seq_ratio.clamp(1 - eps_low, 1 + eps_high) * seq_advantage)
    nonempty = num_seq_tokens > 0
    reference = seq_loss[nonempty].mean()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad_of(loss, log_probs), grad_of(reference, reference_log_probs))

    clipped = ((seq_ratio < 1 - eps_low) & (seq_advantage < 0)) | ((seq_ratio > 1 + eps_high) & (seq_advantage > 0))
    unclipped = nonempty & (seq_advantage != 0) & ~clipped
    assert (clipped & nonempty).any() and unclipped.any()
    expected_clip_tokens = (num_seq_tokens * clipped).sum() / loss_mask.sum()
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] == pytest.approx(expected_clip_tokens.item())


def test_gspo_token_gradient_is_the_sequence_ratio():
    log_probs = torch.log(torch.tensor([[0.5, 0.2, 0.9]], dtype=F64)).requires_grad_(True)
    old_log_probs = log_probs.detach() - torch.tensor([[0.0002, -0.0001, 0.0002]], dtype=F64)
    loss_mask = torch.ones(1, 3, dtype=torch.bool)
    token_loss = losses.gspo_token_loss(
        log_probs=log_probs, old_log_probs=old_log_probs, advantages=torch.ones(1, 3, dtype=F64), loss_mask=loss_mask
    )
    seq_ratio = torch.exp(torch.tensor(0.0001, dtype=F64))
    torch.testing.assert_close(token_loss.loss, -seq_ratio.expand(1, 3))
    torch.testing.assert_close(grad_of(token_loss.loss.sum(), log_probs), -seq_ratio.expand(1, 3))


# ---------------------------------------------------------------- micro-batching


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_with_global_normalizers_sum_to_the_whole_batch(name, aggregation):
    log_probs, old_log_probs, advantages, loss_mask, entropy, rollout_log_probs = random_batch(seed=5, spread=0.3)
    extra = dict(aggregation=aggregation, entropy_coef=0.01, nll_coef=0.1, tis_cap=1.5)

    tensors = dict(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask,
                   entropy=entropy, rollout_log_probs=rollout_log_probs)

    def run(rows, **normalizers):
        return loss_on_rows(name, rows, tensors=tensors, **extra, **normalizers)

    whole_loss, _ = run(slice(None))
    whole_grads = torch.autograd.grad(whole_loss, (log_probs, entropy))

    micro_batches = [slice(0, 2), slice(2, 3), slice(3, 6)]
    local_counts = [loss_normalizers(loss_mask=loss_mask[rows], advantages=advantages[rows]) for rows in micro_batches]
    normalizers = {key: sum(counts[key] for counts in local_counts) for key in local_counts[0]}
    assert normalizers == loss_normalizers(loss_mask=loss_mask, advantages=advantages)
    micro_total = sum(run(rows, **normalizers)[0] for rows in micro_batches)
    micro_grads = torch.autograd.grad(micro_total, (log_probs, entropy))

    torch.testing.assert_close(micro_total, whole_loss)
    for micro_grad, whole_grad in zip(micro_grads, whole_grads, strict=True):
        torch.testing.assert_close(micro_grad, whole_grad)

    # Without global normalisers each micro-batch averages on its own: not the same.
    naive_total = sum(run(rows)[0] for rows in micro_batches)
    assert not torch.allclose(naive_total, whole_loss)


def test_aggregation_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=F64)
    loss_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()
    assert losses.aggregate(values, loss_mask=loss_mask).item() == pytest.approx(10 / 4)
    assert losses.aggregate(values, loss_mask=loss_mask, aggregation="seq_mean_token_mean").item() == pytest.approx(3.0)
    assert losses.aggregate(values, loss_mask=loss_mask, aggregation="seq_mean_token_sum").item() == pytest.approx(5.0)
    assert losses.aggregate(values, loss_mask=loss_mask, token_normalizer=8).item() == pytest.approx(10 / 8)
    assert losses.aggregate(
        values, loss_mask=loss_mask, aggregation="seq_mean_token_sum", sequence_normalizer=5
    ).item() == pytest.approx(2.0)
    empty = torch.zeros_like(loss_mask)
    assert losses.aggregate(values, loss_mask=empty).item() == 0.0
    assert losses.aggregate(values, loss_mask=empty, token_normalizer=0).item() == 0.0


def test_loss_normalizers_counts():
    loss_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    advantages = torch.tensor([[0.5] * 3, [-0.5] * 3, [1.0] * 3])
    assert loss_normalizers(loss_mask=loss_mask, advantages=advantages) == {
        "token_normalizer": 3.0,
        "sequence_normalizer": 2.0,
        "nll_token_normalizer": 2.0,
        "nll_sequence_normalizer": 1.0,
    }


# ---------------------------------------------------------------- entropy, NLL, TIS


def test_entropy_bonus():
    log_probs, old_log_probs, advantages, loss_mask, entropy, _ = random_batch(seed=6)
    common = dict(
        log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask, entropy=entropy
    )
    base, metrics = compute_policy_loss("ce_gppo", **common)
    with_bonus, _ = compute_policy_loss("ce_gppo", entropy_coef=0.05, **common)
    num_tokens = loss_mask.sum()
    entropy_mean = entropy.detach()[loss_mask].sum() / num_tokens
    torch.testing.assert_close(with_bonus - base, -0.05 * entropy_mean)
    assert metrics["entropy"] == pytest.approx(entropy_mean.item())
    expected = torch.where(loss_mask, torch.full_like(entropy, -0.05) / num_tokens, torch.zeros_like(entropy))
    torch.testing.assert_close(grad_of(with_bonus, entropy), expected)


def test_nll_coef_adds_positive_sample_nll():
    log_probs, old_log_probs, advantages, loss_mask, _, _ = random_batch(seed=7)
    common = dict(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask)
    base, metrics = compute_policy_loss("ce_gppo", **common)
    with_nll, _ = compute_policy_loss("ce_gppo", nll_coef=0.1, **common)
    positive = loss_mask & (advantages > 0)
    assert positive.any() and (loss_mask & (advantages <= 0)).any()
    nll = -log_probs.detach()[positive].sum() / positive.sum()
    torch.testing.assert_close(with_nll - base, 0.1 * nll)
    assert metrics["nll"] == pytest.approx(nll.item())
    grad_difference = grad_of(with_nll, log_probs) - grad_of(base, log_probs)
    expected = torch.where(positive, torch.full_like(nll, -0.1) / positive.sum(), torch.zeros_like(nll))
    torch.testing.assert_close(grad_difference, expected)


@pytest.mark.parametrize("name", ["ce_gppo", "cispo"])
def test_truncated_importance_sampling_weights_the_token_loss(name):
    log_probs, old_log_probs, advantages, loss_mask, _, rollout_log_probs = random_batch(seed=8)
    common = dict(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask)
    plain = POLICY_LOSSES[name](**common).loss
    plain_grad = grad_of(plain.sum(), log_probs)
    loss, metrics = compute_policy_loss(name, rollout_log_probs=rollout_log_probs, tis_cap=1.2, **common)

    weight = torch.exp(old_log_probs - rollout_log_probs).clamp(max=1.2)
    truncated = (torch.exp(old_log_probs - rollout_log_probs) > 1.2) & loss_mask
    assert truncated.any() and (loss_mask & ~truncated).any()
    num_tokens = loss_mask.sum()
    torch.testing.assert_close(loss, (plain.detach() * weight)[loss_mask].sum() / num_tokens)
    expected_grad = torch.where(loss_mask, plain_grad * weight / num_tokens, torch.zeros_like(weight))
    torch.testing.assert_close(grad_of(loss, log_probs), expected_grad)
    assert metrics["tis_weight_mean"] == pytest.approx((weight[loss_mask].sum() / num_tokens).item())
    assert metrics["tis_clip_frac"] == pytest.approx((truncated.sum() / num_tokens).item())


def test_importance_weights_are_exactly_one_where_the_sampling_policy_is_the_proximal_one():
    # Decoupled PPO (async rollouts): the ratio is taken against the trainer's recomputed (proximal) log-probs,
    # the weight corrects from the sampling policy to it. Where the two agree it must change nothing at all.
    log_probs, old_log_probs, advantages, loss_mask, _, rollout_log_probs = random_batch(seed=9)
    same = torch.rand(old_log_probs.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    rollout_log_probs = torch.where(same, old_log_probs, rollout_log_probs)
    weights, truncated = truncated_is_weights(old_log_probs=old_log_probs, rollout_log_probs=rollout_log_probs,
                                              loss_mask=loss_mask, tis_cap=2.0)
    assert torch.equal(weights[same & loss_mask], torch.ones_like(weights[same & loss_mask]))
    assert not truncated[same].any() and (weights[~same & loss_mask] != 1).any()
    common = dict(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask)
    on_policy, _ = compute_policy_loss("ce_gppo", rollout_log_probs=old_log_probs, tis_cap=2.0, **common)
    assert torch.equal(on_policy, compute_policy_loss("ce_gppo", **common)[0])


# ---------------------------------------------------------------- errors


def small_inputs():
    log_probs = torch.full((2, 3), -1.0, dtype=F64, requires_grad=True)
    return dict(
        log_probs=log_probs,
        old_log_probs=log_probs.detach(),
        advantages=torch.ones(2, 3, dtype=F64),
        loss_mask=torch.ones(2, 3, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    "name, hparams, match",
    [
        ("ce_gppo", {"eps_low": 1.0}, "eps_low"),
        ("ce_gppo", {"eps_high": -0.1}, "eps_high"),
        ("dapo", {"eps_high": 1.5}, "eps_high"),
        ("ce_gppo", {"beta1": -0.5}, "beta1"),
        ("ce_gppo", {"beta2": float("nan")}, "beta2"),
        ("ce_gppo", {"dual_clip_c": 1.0}, "dual_clip_c"),
        ("ppo", {"dual_clip_c": 0.5}, "dual_clip_c"),
        ("ce_gppo", {"beta3": 1.0}, "unknown hparam 'beta3'"),
        ("ppo", {"beta1": 0.5}, "unknown hparam 'beta1'"),
        ("cispo", {"dual_clip_c": 3.0}, "unknown hparam 'dual_clip_c'"),
        ("ce_gppo", {"entropy_coeff": 0.01}, "unknown hparam 'entropy_coeff'"),
        ("ce_gppo", {"aggregation": "token-mean"}, "aggregation"),
        ("ce_gppo", {"entropy_coef": 0.01}, "entropy"),
        ("ce_gppo", {"nll_coef": -1.0}, "nll_coef"),
        ("ce_gppo", {"tis_cap": 0.0}, "tis_cap"),
        ("ce_gppo", {"token_normalizer": -3}, "token_normalizer"),
        ("ce_gppo", {"high_prob_threshold": 1.0}, "high_prob_threshold"),
        ("ce_gppo", {"advantages": torch.ones(2, 4)}, "advantages has shape"),
        ("gppo", {}, "registered: ce_gppo, cispo, dapo, grpo, gspo, ppo"),
    ],
)
def test_bad_hparams_raise_one_line_value_error(name, hparams, match):
    inputs = small_inputs()
    inputs.update({key: hparams.pop(key) for key in list(hparams) if key == "advantages"})
    with pytest.raises(ValueError, match=match) as error:
        compute_policy_loss(name, **inputs, **hparams)
    assert "\n" not in str(error.value)


def test_sft_is_the_token_mean_negative_log_likelihood():
    log_probs, old_log_probs, advantages, loss_mask, _, _ = random_batch(seed=11)
    loss, metrics = compute_policy_loss("sft", log_probs=log_probs, old_log_probs=old_log_probs,
                                        advantages=advantages, loss_mask=loss_mask)
    expected = -log_probs[loss_mask].sum() / loss_mask.sum()
    torch.testing.assert_close(loss, expected)
    expected_grad = torch.where(loss_mask, -1.0 / loss_mask.sum(), 0.0).to(log_probs.dtype)
    torch.testing.assert_close(grad_of(loss, log_probs), expected_grad)
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0
