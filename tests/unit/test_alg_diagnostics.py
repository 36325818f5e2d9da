"""Diagnostics on hand-made inputs, metric combination across micro-batches, and the no-megatron rule."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gppo.algorithm import combine_metrics, compute_policy_loss, diagnostics
from tests._losses import loss_on_rows

F64 = torch.float64
ALGORITHM_DIR = Path(__file__).resolve().parents[2] / "megatron_gppo" / "algorithm"


def hand_made_batch():
    """Two rows, 7 mask tokens; probabilities, ratios and advantages chosen to hit known groups."""
    probs = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.05, 0.7, 0.5, 0.3]], dtype=F64)
    ratios = torch.tensor([[1.0, 1.5, 0.5, 0.9], [0.7, 1.3, 1.0, 3.0]], dtype=F64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0], [2.0, -1.0, 0.0, 1.0]], dtype=F64)
    loss_mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    log_probs = torch.log(probs).requires_grad_(True)
    old_log_probs = torch.log(probs / ratios)
    return log_probs, old_log_probs, advantages, loss_mask


def test_hand_made_metrics():
    log_probs, old_log_probs, advantages, loss_mask = hand_made_batch()
    _, metrics = compute_policy_loss(
        "ce_gppo", log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask
    )
    # Groups at threshold 0.5: PA&HP {0.9}, PA&LP {0.2, 0.05}, NA&HP {0.6, 0.7}, NA&LP {0.1}; A = 0 in none.
    assert metrics["frac_pa_hp"] == pytest.approx(1 / 7)
    assert metrics["frac_pa_lp"] == pytest.approx(2 / 7)
    assert metrics["frac_na_hp"] == pytest.approx(2 / 7)
    assert metrics["frac_na_lp"] == pytest.approx(1 / 7)
    # Clipped: (r 0.5, A < 0) low; (r 1.5, A > 0) high; (r 3.0, A > 0) is padding.
    assert metrics["clip_frac_low"] == pytest.approx(1 / 7)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 7)
    assert metrics["clip_frac_dual"] == 0.0
    # The low one was sampled at pi_old = 0.6 / 0.5 (HP), the high one at 0.2 / 1.5 (LP).
    assert metrics["clip_frac_low_hp"] == pytest.approx(1 / 7)
    assert metrics["clip_frac_high_hp"] == 0.0
    ratios = [1.0, 1.5, 0.5, 0.9, 0.7, 1.3, 1.0]
    assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / 7)
    assert metrics["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 7)
    assert metrics["approx_kl_k1"] == pytest.approx(sum(-math.log(r) for r in ratios) / 7)
    assert metrics["num_tokens"] == 7 and metrics["num_sequences"] == 2 and metrics["num_positive_tokens"] == 3
    assert all(isinstance(value, float) for value in metrics.values())


def test_group_threshold_is_a_keyword():
    log_probs, _, advantages, loss_mask = hand_made_batch()
    fractions = diagnostics.token_group_fractions(
        log_probs=log_probs.detach(), advantages=advantages, loss_mask=loss_mask, high_prob_threshold=0.65
    )
    # HP is now {0.9, 0.7}.
    assert diagnostics.to_floats(fractions) == pytest.approx(
        {"frac_pa_hp": 1 / 7, "frac_pa_lp": 2 / 7, "frac_na_hp": 1 / 7, "frac_na_lp": 2 / 7}
    )


def test_entropy_change_estimate_is_minus_the_covariance():
    generator = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(5, 8, dtype=F64, generator=generator) * 3
    advantages = torch.randn(5, 1, dtype=F64, generator=generator).expand(5, 8)
    loss_mask = torch.rand(5, 8, generator=generator) > 0.3
    estimate = diagnostics.entropy_change_moments(log_probs=log_probs, advantages=advantages, loss_mask=loss_mask)
    x = log_probs[loss_mask]
    y = torch.exp(x) * advantages[loss_mask]
    covariance = torch.cov(torch.stack([x, y]), correction=0)[0, 1]
    torch.testing.assert_close(estimate["entropy_change_estimate"], -covariance)
    assert abs(covariance.item()) > 1e-3


def test_entropy_change_sign_follows_the_paper():
    # Positive advantage on a high-probability token sharpens the policy: entropy goes down.
    log_probs = torch.log(torch.tensor([[0.9, 0.1]], dtype=F64))
    loss_mask = torch.ones(1, 2, dtype=torch.bool)
    sharpen = diagnostics.entropy_change_moments(
        log_probs=log_probs, advantages=torch.tensor([[1.0, -1.0]], dtype=F64), loss_mask=loss_mask
    )
    explore = diagnostics.entropy_change_moments(
        log_probs=log_probs, advantages=torch.tensor([[-1.0, 1.0]], dtype=F64), loss_mask=loss_mask
    )
    assert sharpen["entropy_change_estimate"] < 0 < explore["entropy_change_estimate"]


def test_combine_metrics_equals_whole_batch_metrics():
    generator = torch.Generator().manual_seed(1)
    old_log_probs = -torch.rand(7, 6, dtype=F64, generator=generator) * 3
    log_probs = (old_log_probs + 0.4 * torch.randn(7, 6, dtype=F64, generator=generator)).clamp(max=-1e-3)
    advantages = torch.randn(7, 1, dtype=F64, generator=generator).expand(7, 6)
    loss_mask = torch.rand(7, 6, generator=generator) > 0.25
    entropy = torch.rand(7, 6, dtype=F64, generator=generator)
    rollout_log_probs = old_log_probs + 0.2 * torch.randn(7, 6, dtype=F64, generator=generator)

    tensors = dict(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask,
                   entropy=entropy, rollout_log_probs=rollout_log_probs)

    def metrics_of(rows):
        return loss_on_rows("ce_gppo", rows, tensors=tensors)[1]

    whole = metrics_of(slice(None))
    parts = [metrics_of(rows) for rows in (slice(0, 3), slice(3, 4), slice(4, 7))]
    combined = combine_metrics(parts)
    assert set(combined) == set(whole)
    assert combined == pytest.approx(whole)
    # A plain token-weighted mean of the covariance would not be exact.
    naive = sum(p["entropy_change_estimate"] * p["num_tokens"] for p in parts) / whole["num_tokens"]
    assert naive != pytest.approx(whole["entropy_change_estimate"])


def test_combine_metrics_sums_counts_and_skips_empty_parts():
    combined = combine_metrics(
        [
            {"num_tokens": 3.0, "clip_frac_low": 1.0},
            {"num_tokens": 0.0, "clip_frac_low": 0.0},
            {"num_tokens": 1.0, "clip_frac_low": 0.0},
        ]
    )
    assert combined == {"num_tokens": 4.0, "clip_frac_low": 0.75}
    assert combine_metrics([{"num_tokens": 0.0, "ratio_mean": 0.0}]) == {"num_tokens": 0.0, "ratio_mean": 0.0}


def test_algorithm_package_never_imports_megatron():
    for path in ALGORITHM_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(name.split(".")[0] == "megatron" for name in names), f"{path.name} imports {names}"
    code = "import sys, megatron_gppo.algorithm; sys.exit(any(m.split('.')[0] == 'megatron' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _tabular_setup(seed: int = 0):
    """A tabular softmax policy (4 states x 50 actions, fp64) and 96 sampled tokens in every CE-GPPO region."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 2.0
    states = torch.randint(0, 4, (1, 96), generator=gen)
    actions = torch.multinomial(torch.softmax(logits, -1)[states[0]], 1, generator=gen).T  # [1, 96]
    # The sampling policy: the current one, perturbed so that both clipped regions are populated.
    old_log_probs = torch.log_softmax(logits, -1)[states, actions] + torch.randn(1, 96, generator=gen,
                                                                                  dtype=torch.float64) * 0.5
    advantages = torch.randn(1, 96, generator=gen, dtype=torch.float64)
    return logits, states, actions, old_log_probs, advantages


def _token_stats(logits, states, actions):
    log_p = torch.log_softmax(logits, -1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    return {"log_probs": log_p[states, actions], "entropy": entropy[states],
            "sum_p2": p.square().sum(-1)[states], "sum_p2_log_p": (p.square() * log_p).sum(-1)[states]}


HPARAMS = {"eps_low": 0.2, "eps_high": 0.2, "beta1": 0.7, "beta2": 1.3}


def test_predicted_entropy_change_matches_an_sgd_step_per_region():
    """fp64 tabular policy: one plain SGD step on the logits changes sum_s H(s) by lr * sum_t g_t S_t."""
    from megatron_gppo.algorithm.diagnostics import entropy_sensitivity
    from megatron_gppo.algorithm.losses import POLICY_LOSSES, compute_policy_loss

    logits, states, actions, old_log_probs, advantages = _tabular_setup()
    mask = torch.ones_like(advantages, dtype=torch.bool)
    stats = _token_stats(logits, states, actions)
    _, metrics = compute_policy_loss("ce_gppo", log_probs=stats["log_probs"], old_log_probs=old_log_probs,
                                     advantages=advantages, loss_mask=mask,
                                     entropy_sensitivity=entropy_sensitivity(**stats), **HPARAMS)
    regions = POLICY_LOSSES["ce_gppo"](log_probs=stats["log_probs"], old_log_probs=old_log_probs,
                                       advantages=advantages, loss_mask=mask, **HPARAMS)
    low, high = regions.clipped_low, regions.clipped_high
    assert low.sum() >= 5 and high.sum() >= 5 and (~(low | high)).sum() >= 5
    for name, tokens in (("inside", ~(low | high)), ("low", low), ("high", high), ("", mask)):
        predicted = metrics["predicted_entropy_change" + (f"_{name}" if name else "")] * mask.sum().item()
        errors = []
        for lr in (1e-3, 1e-4):
            params = logits.clone().requires_grad_()
            log_probs = torch.log_softmax(params, -1)[states, actions]
            token_loss = POLICY_LOSSES["ce_gppo"](log_probs=log_probs, old_log_probs=old_log_probs,
                                                  advantages=advantages, loss_mask=mask, **HPARAMS).loss
            (grad,) = torch.autograd.grad(token_loss[tokens].sum(), params)
            after = logits - lr * grad
            measured = (_entropy(after) - _entropy(logits)).sum().item() / lr
            errors.append(abs(measured - predicted) / abs(predicted))
        assert errors[0] < 0.01, (name, errors)
        assert errors[1] < errors[0] / 5, (name, errors)  # first order: the error shrinks with the step
    # The beta derivatives: the clipped regions' predicted change is linear in each beta.
    assert metrics["entropy_sensitivity_beta1"] * HPARAMS["beta1"] == pytest.approx(
        metrics["predicted_entropy_change_low"], rel=1e-9)
    assert metrics["entropy_sensitivity_beta2"] * HPARAMS["beta2"] == pytest.approx(
        metrics["predicted_entropy_change_high"], rel=1e-9)


def _entropy(logits):
    log_p = torch.log_softmax(logits, -1)
    return -(log_p.exp() * log_p).sum(-1)


def test_entropy_sensitivity_signs():
    """Pushing down a likely token flattens p (S > 0); pushing down an unlikely one sharpens it (S < 0)."""
    from megatron_gppo.algorithm.diagnostics import entropy_sensitivity

    logits = torch.tensor([[4.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    stats = _token_stats(logits, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 3]]))
    likely, unlikely = entropy_sensitivity(**stats)[0].tolist()
    assert likely > 0 > unlikely
