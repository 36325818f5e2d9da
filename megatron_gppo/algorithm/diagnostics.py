"""Per-batch diagnostics of a policy update: clipping, KL, the paper's token groups.

Every metric is a mean over the micro-batch's mask tokens (or a count with a
`num_` prefix), so metrics from several micro-batches or data-parallel ranks
combine exactly with `combine_metrics` (token-weighted means, summed counts).
Functions here take detached tensors and return 0-dim tensors; the caller
turns the whole dict into floats with one device sync (`to_floats`).

Token groups (CE-GPPO paper, section 3.1): a mask token is PA (positive
advantage, A > 0) or NA (A < 0), and HP (high probability, pi >= threshold)
or LP (pi < threshold), with pi = exp(log_prob) under the current policy.
Tokens with A == 0 belong to no group, so the four fractions sum to the
fraction of mask tokens with a non-zero advantage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask`; 0 when the mask is empty.

    Args:
        values: `[batch, response_len]`.
        mask: `[batch, response_len]` bool.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def clip_fractions(
    *,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    clipped_dual: torch.Tensor,
    loss_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Fractions of mask tokens in each clipped region of the loss.

    For PPO-style losses `low` is (r < 1 - eps_low, A < 0) and `high` is
    (r > 1 + eps_high, A > 0); for CE-GPPO these are exactly the tokens that
    get the beta1 / beta2 gradient. `dual` counts A < 0 tokens held at -c*A
    by the dual clip. All masks are `[batch, response_len]` bool.
    """
    return {
        "clip_frac_low": masked_mean(clipped_low.double(), loss_mask),
        "clip_frac_high": masked_mean(clipped_high.double(), loss_mask),
        "clip_frac_dual": masked_mean(clipped_dual.double(), loss_mask),
    }


def clipped_high_prob_fractions(
    *,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    old_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    high_prob_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Fractions of mask tokens that are clipped *and* were high-probability when sampled.

    The paper's entropy argument (section 3.1, figure 1) rests on clipped
    tokens being mostly low-probability: pushing a low-probability token down
    sharpens its distribution, pushing a high-probability one down flattens it.
    `clip_frac_low_hp / clip_frac_low` is the share of the beta1-gradient
    tokens for which that premise fails. HP here is pi_old >= threshold.

    Args:
        clipped_low, clipped_high, loss_mask: `[batch, response_len]` bool.
        old_log_probs: `[batch, response_len]` log-probs of the sampling policy.
    """
    was_high = torch.exp(old_log_probs) >= high_prob_threshold
    return {
        "clip_frac_low_hp": masked_mean((clipped_low & was_high).double(), loss_mask),
        "clip_frac_high_hp": masked_mean((clipped_high & was_high).double(), loss_mask),
    }


def ratio_and_kl(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Token ratio mean and two estimators of KL(pi_old || pi) over mask tokens.

    The tokens are samples of pi_old, so with r = pi / pi_old:
    `approx_kl` is the k3 estimator (r - 1) - log r (unbiased, never negative);
    `approx_kl_k1` is the k1 estimator -log r (unbiased, noisier; this is verl's
    `ppo_kl`, the curve in the paper's figure 5).

    Args:
        log_probs, old_log_probs: `[batch, response_len]`.
        loss_mask: `[batch, response_len]` bool.
    """
    log_ratio = torch.where(loss_mask, log_probs - old_log_probs, torch.zeros_like(log_probs))
    # Same bound as the losses use, so a wild token cannot turn the mean into inf.
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    return {
        "ratio_mean": masked_mean(ratio, loss_mask),
        "approx_kl": masked_mean(ratio - 1 - log_ratio, loss_mask),
        "approx_kl_k1": masked_mean(-log_ratio, loss_mask),
    }


def token_group_fractions(
    *,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    high_prob_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Fractions of mask tokens in the paper's four groups PA/NA x HP/LP.

    A token is high-probability (HP) when exp(log_prob) >= `high_prob_threshold`.

    Args:
        log_probs, advantages: `[batch, response_len]`.
        loss_mask: `[batch, response_len]` bool.
    """
    high = torch.exp(log_probs) >= high_prob_threshold
    positive = advantages > 0
    negative = advantages < 0
    groups = {
        "frac_pa_hp": positive & high,
        "frac_pa_lp": positive & ~high,
        "frac_na_hp": negative & high,
        "frac_na_lp": negative & ~high,
    }
    return {name: masked_mean(group.double(), loss_mask) for name, group in groups.items()}


def entropy_change_moments(
    *,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The paper's first-order entropy-change estimate (eq. 7) and its moments.

    `entropy_change_estimate` = -Cov(log pi, pi * A) over the mask tokens
    (population covariance, learning rate left out), with pi = exp(log_prob)
    of the current policy. Negative means this batch's update pushes entropy
    down. The three moments (means of log pi, pi*A and their product) are
    returned too, so `combine_metrics` can rebuild the covariance of a batch
    split into micro-batches exactly.

    Args:
        log_probs, advantages: `[batch, response_len]`.
        loss_mask: `[batch, response_len]` bool.
    """
    log_prob = torch.where(loss_mask, log_probs, torch.zeros_like(log_probs))
    prob_adv = torch.exp(log_prob) * advantages
    log_prob_mean = masked_mean(log_prob, loss_mask)
    prob_adv_mean = masked_mean(prob_adv, loss_mask)
    centred = (log_prob - log_prob_mean) * (prob_adv - prob_adv_mean)
    return {
        "entropy_change_estimate": -masked_mean(centred, loss_mask),
        "log_prob_mean": log_prob_mean,
        "prob_adv_mean": prob_adv_mean,
        "log_prob_prob_adv_mean": masked_mean(log_prob * prob_adv, loss_mask),
    }


def entropy_sensitivity(
    *, log_probs: torch.Tensor, entropy: torch.Tensor, sum_p2: torch.Tensor, sum_p2_log_p: torch.Tensor,
) -> torch.Tensor:
    """S_t: the first-order entropy change of a token's state per unit step on its log-prob.

    For the sampled token a of a softmax p over logits z with entropy H, a
    gradient step of size eta on the logits whose loss has per-token gradient
    g = d loss / d log p(a) moves z by -eta g (e_a - p); since
    dH / dz_b = -p_b (log p_b + H), the entropy changes by

        dH = eta * g * S,   S = p_a (log p_a + H) - sum_b p_b^2 (log p_b + H).

    S > 0 for a likely token (pushing it down, g > 0, flattens p) and S < 0
    for an unlikely one (pushing it down sharpens p). The sums over the
    vocabulary come from the fused op (`vocab_parallel_softmax_moments`).

    Args: `[batch, response_len]` each: log p(a), H, sum_b p_b^2, sum_b p_b^2 log p_b.
    """
    return torch.exp(log_probs) * (log_probs + entropy) - (sum_p2_log_p + entropy * sum_p2)


def predicted_entropy_change(
    *,
    loss_grad: torch.Tensor,
    sensitivity: torch.Tensor,
    advantages: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    loss_mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> dict[str, torch.Tensor]:
    """First-order entropy change of one update, per loss region, and its derivatives in beta1 / beta2.

    Each is a mean over the mask tokens of `loss_grad * sensitivity` (see
    `entropy_sensitivity`), i.e. the change of the summed per-token entropy
    for a unit-learning-rate step on the logits of the token-sum loss;
    multiply by lr / num_tokens for the token-mean loss's step.
    `predicted_entropy_change_low` / `_high` are the clipped regions (for
    CE-GPPO the beta1 / beta2 tokens, loss_grad = -beta1 (1 - eps_low) A and
    -beta2 (1 + eps_high) A), `_inside` the rest (loss_grad = -r A).
    `entropy_sensitivity_beta1` = d predicted_entropy_change / d beta1 =
    mean of -(1 - eps_low) A S over the low-clipped tokens (0 elsewhere), and
    `entropy_sensitivity_beta2` likewise: their signs say which way raising
    each beta moves the entropy, whatever the paper's premise.

    Args:
        loss_grad: `[batch, response_len]` d per-token loss / d log_prob.
        sensitivity, advantages: `[batch, response_len]`.
        clipped_low, clipped_high, loss_mask: `[batch, response_len]` bool.
        eps_low, eps_high: the loss's clip range.
    """
    change = loss_grad * sensitivity
    inside = ~(clipped_low | clipped_high)
    zero = torch.zeros_like(change)
    return {
        "predicted_entropy_change": masked_mean(change, loss_mask),
        "predicted_entropy_change_inside": masked_mean(torch.where(inside, change, zero), loss_mask),
        "predicted_entropy_change_low": masked_mean(torch.where(clipped_low, change, zero), loss_mask),
        "predicted_entropy_change_high": masked_mean(torch.where(clipped_high, change, zero), loss_mask),
        "entropy_sensitivity_beta1": masked_mean(
            torch.where(clipped_low, -(1 - eps_low) * advantages * sensitivity, zero), loss_mask),
        "entropy_sensitivity_beta2": masked_mean(
            torch.where(clipped_high, -(1 + eps_high) * advantages * sensitivity, zero), loss_mask),
    }


def to_floats(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Turn a dict of 0-dim tensors (all on one device) into python floats with one device sync."""
    names = list(metrics)
    values = torch.stack([metrics[name].detach().to(torch.float64) for name in names])
    return dict(zip(names, values.tolist(), strict=True))


# Metrics that are means over a subset of the mask tokens name the count that
# weights them; every other non-count metric is a mean over `num_tokens`.
_METRIC_WEIGHTS = {"nll": "num_positive_tokens"}


def combine_metrics(metrics_list: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Combine `compute_policy_loss` metrics from micro-batches or ranks.

    Counts (keys starting with `num_`) are summed. Every other metric is a mean
    over mask tokens and is averaged weighted by `num_tokens` (`nll` by
    `num_positive_tokens`), which gives exactly the whole-batch value.
    `entropy_change_estimate` is a covariance, so it is rebuilt from its
    combined moments rather than averaged. A key missing from some dicts is
    averaged over the dicts that have it.
    """
    metrics_list = list(metrics_list)
    combined: dict[str, float] = {}
    keys = dict.fromkeys(key for metrics in metrics_list for key in metrics)
    for key in keys:
        present = [metrics for metrics in metrics_list if key in metrics]
        if key.startswith("num_"):
            combined[key] = float(sum(metrics[key] for metrics in present))
            continue
        weight_key = _METRIC_WEIGHTS.get(key, "num_tokens")
        weights = [float(metrics.get(weight_key, 1.0)) for metrics in present]
        total_weight = sum(weights)
        weighted = sum(w * metrics[key] for w, metrics in zip(weights, present, strict=True))
        combined[key] = weighted / total_weight if total_weight > 0 else 0.0
    moments = ("log_prob_mean", "prob_adv_mean", "log_prob_prob_adv_mean")
    if "entropy_change_estimate" in combined and all(name in combined for name in moments):
        covariance = combined["log_prob_prob_adv_mean"] - combined["log_prob_mean"] * combined["prob_adv_mean"]
        combined["entropy_change_estimate"] = -covariance
    return combined
