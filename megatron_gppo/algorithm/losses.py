"""Policy-gradient losses: a registry of small per-token functions plus one aggregation.

Entry point: `compute_policy_loss(name, *, log_probs, old_log_probs, advantages,
loss_mask, **hparams) -> (loss, metrics)`. All tensors are `[batch,
response_len]`; `loss` is a scalar to call `.backward()` on and `metrics` a
dict of python floats (see `diagnostics.py`).

How it is put together:

1. A variant in `POLICY_LOSSES` (`ce_gppo`, `ppo`, `grpo`, `dapo`, `cispo`,
   `gspo`) maps the tensors to per-token losses and clip masks (`TokenLoss`).
   Every variant has the same keyword-only signature, the four tensors and
   then its own hyperparameters with their defaults: the registry calls them
   alike, validation reads which hyperparameters a variant takes from its
   signature, and those defaults are the only place the hyperparameters are
   defaulted (the run config reads them with `hparam_default`; their ranges
   are `HPARAM_BOUNDS`).
2. An optional truncated importance-sampling weight (`rollout_log_probs=`,
   `tis_cap=`) multiplies the per-token loss, correcting for the rollout
   engine's log-probs differing from the trainer's.
3. `aggregate` reduces per-token values to a scalar; the entropy bonus
   (`entropy=`, `entropy_coef=`) and the positive-sample NLL term
   (`nll_coef=`) are aggregated the same way and added.

Aggregation and exact micro-batching. `aggregation=` is one of

- `token_mean` (default): sum over mask tokens / number of mask tokens;
- `seq_mean_token_mean`: each sequence's token mean, then the mean over sequences;
- `seq_mean_token_sum`: each sequence's token sum, then the mean over sequences.

A sequence here is a row with at least one mask token; empty rows add nothing.
By default the denominators are counted on the tensors passed in, i.e. per
micro-batch. To make the sum of micro-batch losses equal the loss of the whole
global batch (all micro-batches on all data-parallel ranks), pass global
denominators: `token_normalizer` (mask tokens, read by `token_mean`) and
`sequence_normalizer` (sequences, read by the two `seq_mean_*` modes), and for
the NLL term `nll_token_normalizer` / `nll_sequence_normalizer` (counted over
positive-advantage tokens only). `loss_normalizers` counts all four on one
micro-batch; sum its dicts over micro-batches and data-parallel ranks, then
pass the sums to every call. With the seq modes each micro-batch must hold
whole sequences. Then the summed loss and its gradient equal the whole-batch
ones exactly (up to float rounding). A normaliser of 0 means "nothing to
average": the term is 0.

The positive-sample NLL term follows the official CE-GPPO code
(`positive_loss_coeff` in Kwai-Klear/CE-GPPO `dp_actor.py`; its 1.5B recipe
uses 0.1): the mean of -log_prob over the positive samples' tokens, averaged
over those tokens only. The official code picks the sequences whose reward is
"correct"; here a token is positive when its advantage is > 0, which is the
same set for binary rewards with group-normalised advantages, except
all-correct groups (advantage 0), which dynamic sampling drops anyway.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch

from megatron_gppo.algorithm import diagnostics
from megatron_gppo.algorithm.bounds import Bound

# exp() of a log-ratio above ~88 overflows float32 to inf, and inf * 0 in the
# backward pass of masked tokens turns gradients into NaN. A token whose ratio
# is beyond e^{+-20} is far outside any trust region; the clamp leaves its
# loss value finite and gives it no gradient.
_MAX_LOG_RATIO = 20.0

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


class TokenLoss(NamedTuple):
    """What a registered variant returns; every field is `[batch, response_len]`."""

    loss: torch.Tensor
    """Per-token loss (the negated per-token objective); masked tokens are ignored later."""
    clipped_low: torch.Tensor
    """Bool: mask tokens in the lower clipped region (for ce_gppo: weighted by beta1)."""
    clipped_high: torch.Tensor
    """Bool: mask tokens in the upper clipped region (for ce_gppo: weighted by beta2)."""
    clipped_dual: torch.Tensor
    """Bool: A < 0 mask tokens whose loss the dual clip holds at -c * A."""


def _log_ratio(*, log_probs: torch.Tensor, old_log_probs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old), zero on padding and clamped to +-_MAX_LOG_RATIO. `[batch, response_len]`."""
    log_ratio = torch.where(loss_mask, log_probs - old_log_probs, torch.zeros_like(log_probs))
    return log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _apply_dual_clip(
    loss: torch.Tensor,
    *,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-clip PPO (arXiv 1912.09729): an A < 0 token with r > c costs -c * A, no gradient.

    Without it, a negative-advantage token whose ratio has exploded keeps a
    gradient proportional to r. Returns the new loss and the dual-clip mask.
    """
    if dual_clip_c is None:
        return loss, torch.zeros_like(loss_mask)
    clipped_dual = (advantages < 0) & (ratio > dual_clip_c) & loss_mask
    return torch.where(clipped_dual, -dual_clip_c * advantages, loss), clipped_dual


def ce_gppo_token_loss(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta1: float = 0.5,
    beta2: float = 1.0,
    dual_clip_c: float | None = None,
) -> TokenLoss:
    """CE-GPPO (arXiv 2509.20712, eq. 8 and 10): PPO whose clipped tokens keep a bounded gradient.

    With r = exp(log_prob - old_log_prob) and sg() the stop-gradient, the
    per-token loss and its gradient with respect to log_prob are

        region                          loss                          d loss / d log_prob
        r < 1 - eps_low  and A < 0      -beta1 (1-eps_low) r/sg(r) A   -beta1 (1 - eps_low) A
        r > 1 + eps_high and A > 0      -beta2 (1+eps_high) r/sg(r) A  -beta2 (1 + eps_high) A
        otherwise                       -r A                           -r A

    beta1 = beta2 = 0 is PPO's gradient; beta1 = beta2 = 1 is PPO's loss value.
    Larger beta1 lowers entropy, larger beta2 raises it (paper section 5.1).
    The defaults are the paper's 1.5B setting. `dual_clip_c` (off by default;
    the official recipes use 10) caps A < 0 tokens with r > c at -c A with no
    gradient; this matches the official `torch.min(-c A, loss)` whenever
    beta1 (1 - eps_low) <= c.

    Args:
        log_probs: `[batch, response_len]` current policy log-probs (with grad).
        old_log_probs: `[batch, response_len]` log-probs of the policy that sampled.
        advantages: `[batch, response_len]`.
        loss_mask: `[batch, response_len]` bool.
    """
    ratio = torch.exp(_log_ratio(log_probs=log_probs, old_log_probs=old_log_probs, loss_mask=loss_mask))
    clipped_low = (ratio < 1 - eps_low) & (advantages < 0) & loss_mask
    clipped_high = (ratio > 1 + eps_high) & (advantages > 0) & loss_mask
    # r / sg(r) is exactly 1 in value but has d/dlog_prob = 1, so the clipped
    # regions get the bounded gradient of eq. 10 instead of none.
    unit_ratio = ratio / ratio.detach()
    loss = -ratio * advantages
    loss = torch.where(clipped_low, -(beta1 * (1 - eps_low)) * unit_ratio * advantages, loss)
    loss = torch.where(clipped_high, -(beta2 * (1 + eps_high)) * unit_ratio * advantages, loss)
    loss, clipped_dual = _apply_dual_clip(
        loss, ratio=ratio, advantages=advantages, loss_mask=loss_mask, dual_clip_c=dual_clip_c
    )
    return TokenLoss(loss, clipped_low, clipped_high, clipped_dual)


def ppo_token_loss(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> TokenLoss:
    """PPO / GRPO clipped surrogate: max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A).

    GRPO uses the same per-token loss; it differs from PPO in its
    group-normalised advantages (`advantages.group_advantages`).
    Tensors as in `ce_gppo_token_loss`.
    """
    ratio = torch.exp(_log_ratio(log_probs=log_probs, old_log_probs=old_log_probs, loss_mask=loss_mask))
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(-ratio * advantages, -clipped_ratio * advantages)
    clipped_low = (ratio < 1 - eps_low) & (advantages < 0) & loss_mask
    clipped_high = (ratio > 1 + eps_high) & (advantages > 0) & loss_mask
    loss, clipped_dual = _apply_dual_clip(
        loss, ratio=ratio, advantages=advantages, loss_mask=loss_mask, dual_clip_c=dual_clip_c
    )
    return TokenLoss(loss, clipped_low, clipped_high, clipped_dual)


def cispo_token_loss(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> TokenLoss:
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log_prob.

    The importance weight is clipped and detached, so every token keeps the
    gradient -clip(r) A. The clip masks mark tokens whose weight was truncated
    (whatever the sign of A). Tensors as in `ce_gppo_token_loss`.
    """
    ratio = torch.exp(_log_ratio(log_probs=log_probs, old_log_probs=old_log_probs, loss_mask=loss_mask))
    weight = ratio.clamp(1 - eps_low, 1 + eps_high).detach()
    loss = -weight * advantages * log_probs
    clipped_low = (ratio < 1 - eps_low) & loss_mask
    clipped_high = (ratio > 1 + eps_high) & loss_mask
    return TokenLoss(loss, clipped_low, clipped_high, torch.zeros_like(loss_mask))


def gspo_token_loss(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> TokenLoss:
    """GSPO-token (arXiv 2507.18071): the clipped surrogate on a sequence-level ratio.

    s_i = exp(mean over sequence i's mask tokens of (log_prob - old_log_prob));
    the token-level form s_{i,t} = sg(s_i) * exp(log_prob - sg(log_prob)) has
    the value s_i and gradient s_i per token. Loss: max(-s_{i,t} A,
    -clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A); a clipped sequence clips all
    its tokens. The GSPO paper averages per sequence: pass
    `aggregation="seq_mean_token_mean"` to reproduce it exactly.
    Tensors as in `ce_gppo_token_loss`.
    """
    diff = torch.where(loss_mask, log_probs - old_log_probs, torch.zeros_like(log_probs))
    num_seq_tokens = loss_mask.sum(dim=-1).clamp(min=1)
    seq_log_ratio = (diff.sum(dim=-1) / num_seq_tokens).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    seq_ratio = torch.exp(seq_log_ratio).unsqueeze(-1).expand_as(log_probs)
    masked_log_probs = torch.where(loss_mask, log_probs, torch.zeros_like(log_probs))
    token_ratio = seq_ratio.detach() * torch.exp(masked_log_probs - masked_log_probs.detach())
    clipped_ratio = token_ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(-token_ratio * advantages, -clipped_ratio * advantages)
    clipped_low = (seq_ratio < 1 - eps_low) & (advantages < 0) & loss_mask
    clipped_high = (seq_ratio > 1 + eps_high) & (advantages > 0) & loss_mask
    return TokenLoss(loss, clipped_low, clipped_high, torch.zeros_like(loss_mask))


def sft_token_loss(
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
) -> TokenLoss:
    """Supervised fine-tuning: -log_prob of every target token (old log-probs and advantages unused).

    Registered so SFT warm-ups run through the same policy forward-backward as RL.
    """
    no_clip = torch.zeros_like(loss_mask)
    return TokenLoss(-log_probs, no_clip, no_clip, no_clip)


POLICY_LOSSES: dict[str, Callable[..., TokenLoss]] = {
    "ce_gppo": ce_gppo_token_loss,
    "ppo": ppo_token_loss,
    "grpo": ppo_token_loss,
    # DAPO (arXiv 2503.14476): the PPO clipped surrogate with clip-higher; its
    # token-mean aggregation is the default `aggregation`.
    "dapo": partial(ppo_token_loss, eps_high=0.28),
    "cispo": cispo_token_loss,
    "gspo": gspo_token_loss,
    "sft": sft_token_loss,
}

# What `algorithm.loss` may name: every variant but `sft`, which fits targets, not rewards.
RL_LOSSES = tuple(name for name in POLICY_LOSSES if name != "sft")


def _denominator(normalizer: float | torch.Tensor | None, local_count: torch.Tensor) -> torch.Tensor | float:
    """The given global normaliser, else the local count; never 0 (the sum is 0 then too)."""
    if normalizer is None:
        return local_count.clamp(min=1)
    return normalizer if float(normalizer) > 0 else 1.0


def aggregate(
    values: torch.Tensor,
    *,
    loss_mask: torch.Tensor,
    aggregation: str = "token_mean",
    token_normalizer: float | torch.Tensor | None = None,
    sequence_normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token `values` over `loss_mask` to a scalar (see the module docstring).

    Args:
        values: `[batch, response_len]`.
        loss_mask: `[batch, response_len]` bool.
        aggregation: one of `AGGREGATIONS`.
        token_normalizer: global mask-token count for `token_mean`.
        sequence_normalizer: global sequence count for the `seq_mean_*` modes.
    """
    masked = torch.where(loss_mask, values, torch.zeros_like(values))
    if aggregation == "token_mean":
        return masked.sum() / _denominator(token_normalizer, loss_mask.sum())
    seq_sums = masked.sum(dim=-1)
    num_seq_tokens = loss_mask.sum(dim=-1)
    if aggregation == "seq_mean_token_mean":
        seq_sums = seq_sums / num_seq_tokens.clamp(min=1)
    num_sequences = (num_seq_tokens > 0).sum()
    return seq_sums.sum() / _denominator(sequence_normalizer, num_sequences)


def loss_normalizers(*, loss_mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """Local counts behind the four normalisers of `compute_policy_loss`.

    Sum these dicts over all micro-batches of an optimizer step and all
    data-parallel ranks (e.g. one all-reduce of a 4-element tensor), then pass
    the sums as `**normalizers` to every micro-batch's `compute_policy_loss`.

    Args:
        loss_mask: `[batch, response_len]`.
        advantages: `[batch, response_len]`.
    Returns:
        `token_normalizer` (mask tokens), `sequence_normalizer` (rows with a
        mask token), and the same two counted over positive-advantage tokens:
        `nll_token_normalizer`, `nll_sequence_normalizer`.
    """
    loss_mask = loss_mask.bool()
    positive = loss_mask & (advantages > 0)
    counts = torch.stack(
        [
            loss_mask.sum(),
            loss_mask.any(dim=-1).sum(),
            positive.sum(),
            positive.any(dim=-1).sum(),
        ]
    ).tolist()
    names = ("token_normalizer", "sequence_normalizer", "nll_token_normalizer", "nll_sequence_normalizer")
    return {name: float(count) for name, count in zip(names, counts, strict=True)}


def truncated_is_weights(
    *,
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    tis_cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling: min(pi_old / pi_rollout, tis_cap), detached.

    The rollout engine samples with its own kernels (and possibly precision),
    and with asynchronous rollouts from weights one or more updates old, so
    its probabilities differ from the trainer's pi_old; this weight corrects
    the per-token loss for that (decoupled PPO: the ratio is taken against
    pi_old, the proximal policy), truncated to bound its variance.

    Args:
        old_log_probs, rollout_log_probs: `[batch, response_len]`.
        loss_mask: `[batch, response_len]` bool.
    Returns:
        The weights and the bool mask of tokens whose weight was truncated.
    """
    log_weight = torch.where(loss_mask, old_log_probs - rollout_log_probs, torch.zeros_like(old_log_probs))
    weight = torch.exp(log_weight.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)).detach()
    truncated = (weight > tis_cap) & loss_mask
    return weight.clamp(max=tis_cap), truncated


# The range of every bounded hyperparameter; the run config's fields use the same bounds.
HPARAM_BOUNDS: dict[str, Bound] = {
    "eps_low": Bound(ge=0, lt=1),
    "eps_high": Bound(ge=0, lt=1),
    "beta1": Bound(ge=0),
    "beta2": Bound(ge=0),
    "dual_clip_c": Bound(gt=1),
    "entropy_coef": Bound(ge=0),
    "nll_coef": Bound(ge=0),
    "tis_cap": Bound(ge=1),
    "high_prob_threshold": Bound(gt=0, lt=1),
}


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"policy-loss hparam '{name}' = {value!r}: expected {allowed}")


def _check_shapes(log_probs: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    expected = tuple(log_probs.shape)
    if len(expected) != 2:
        raise ValueError(f"log_probs must be [batch, response_len], got shape {expected}")
    for key, tensor in tensors.items():
        if tensor is not None and tuple(tensor.shape) != expected:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, expected log_probs' shape {expected}")


def _keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty}


def _variant_hparams(name: str) -> dict[str, Any]:
    """The hyperparameters a registered variant accepts, with its defaults (its keyword arguments)."""
    return _keyword_defaults(POLICY_LOSSES[name])


def _common_hparams() -> dict[str, Any]:
    """The keyword arguments every variant shares through `compute_policy_loss`, with their defaults."""
    return _keyword_defaults(compute_policy_loss)


def hparam_default(key: str, *, loss: str = "ce_gppo") -> Any:
    """The default of hyperparameter `key` of policy loss `loss` (its own, or a common one)."""
    defaults = {**_common_hparams(), **_variant_hparams(loss)}
    return defaults[key]


def loss_kwargs(name: str, **values: Any) -> dict[str, Any]:
    """The keyword arguments of `compute_policy_loss(name, ...)` among `values`.

    Keys the variant does not take are dropped (e.g. `beta1` for `ppo`), and so
    are None values, which keep the loss's own default.
    """
    accepted = {**_common_hparams(), **_variant_hparams(name)}
    return {key: value for key, value in values.items() if key in accepted and value is not None}


def _validate(
    name: str,
    loss_hparams: dict[str, Any],
    *,
    aggregation: str,
    normalizers: dict[str, Any],
    entropy: torch.Tensor | None,
    entropy_coef: float,
    nll_coef: float,
    tis_cap: float,
    high_prob_threshold: float,
) -> None:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss '{name}'; registered: {', '.join(sorted(POLICY_LOSSES))}")
    known = _variant_hparams(name)
    for key in loss_hparams:
        if key not in known:
            raise ValueError(
                f"unknown hparam '{key}' for policy loss '{name}'; it takes {', '.join(known)} "
                f"and the common {', '.join(_common_hparams())}"
            )
    bounded = {**loss_hparams, "entropy_coef": entropy_coef, "nll_coef": nll_coef, "tis_cap": tis_cap,
               "high_prob_threshold": high_prob_threshold}
    for key, value in bounded.items():
        optional = key in known and known[key] is None  # e.g. dual_clip_c: None switches it off
        bound = HPARAM_BOUNDS.get(key)
        if bound is not None and not (optional and value is None):
            _check(key, value, bound.contains(value), ("None (off) or " if optional else "") + bound.describe())
    _check("aggregation", aggregation, aggregation in AGGREGATIONS, f"one of {', '.join(AGGREGATIONS)}")
    for key, value in normalizers.items():
        _check(key, value, value is None or float(value) >= 0, "None or a count >= 0")
    _check("entropy", None, entropy_coef == 0 or entropy is not None, "a per-token tensor when entropy_coef != 0")


def _token_loss_grad(name: str, *, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     loss_mask: torch.Tensor, tis_weights: torch.Tensor | None, **loss_hparams: Any) -> torch.Tensor:
    """d (summed per-token policy loss) / d log_prob, `[batch, response_len]`, on a detached copy of log_probs."""
    with torch.enable_grad():
        probe = log_probs.detach().requires_grad_()
        loss = POLICY_LOSSES[name](log_probs=probe, old_log_probs=old_log_probs, advantages=advantages,
                                   loss_mask=loss_mask, **loss_hparams).loss
        if tis_weights is not None:
            loss = loss * tis_weights
        (grad,) = torch.autograd.grad(torch.where(loss_mask, loss, torch.zeros_like(loss)).sum(), probe)
    return grad


@torch.no_grad()
def _policy_metrics(
    *,
    token_loss: TokenLoss,
    policy_loss: torch.Tensor,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    entropy: torch.Tensor | None,
    high_prob_threshold: float,
) -> dict[str, torch.Tensor]:
    """The 0-dim tensor metrics listed in `compute_policy_loss`; all tensors `[batch, response_len]`."""
    log_probs = log_probs.detach()
    positive_mask = loss_mask & (advantages > 0)
    metrics = diagnostics.clip_fractions(
        clipped_low=token_loss.clipped_low,
        clipped_high=token_loss.clipped_high,
        clipped_dual=token_loss.clipped_dual,
        loss_mask=loss_mask,
    )
    metrics.update(
        diagnostics.clipped_high_prob_fractions(
            clipped_low=token_loss.clipped_low,
            clipped_high=token_loss.clipped_high,
            old_log_probs=old_log_probs,
            loss_mask=loss_mask,
            high_prob_threshold=high_prob_threshold,
        )
    )
    metrics.update(diagnostics.ratio_and_kl(log_probs=log_probs, old_log_probs=old_log_probs, loss_mask=loss_mask))
    metrics.update(
        diagnostics.token_group_fractions(
            log_probs=log_probs,
            advantages=advantages,
            loss_mask=loss_mask,
            high_prob_threshold=high_prob_threshold,
        )
    )
    metrics.update(diagnostics.entropy_change_moments(log_probs=log_probs, advantages=advantages, loss_mask=loss_mask))
    metrics["pg_loss"] = diagnostics.masked_mean(policy_loss.detach(), loss_mask)
    metrics["nll"] = diagnostics.masked_mean(-log_probs, positive_mask)
    if entropy is not None:
        metrics["entropy"] = diagnostics.masked_mean(entropy.detach(), loss_mask)
    metrics["num_tokens"] = loss_mask.sum()
    metrics["num_sequences"] = loss_mask.any(dim=-1).sum()
    metrics["num_positive_tokens"] = positive_mask.sum()
    return metrics


def compute_policy_loss(
    name: str,
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    aggregation: str = "token_mean",
    token_normalizer: float | torch.Tensor | None = None,
    sequence_normalizer: float | torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    nll_coef: float = 0.0,
    nll_token_normalizer: float | torch.Tensor | None = None,
    nll_sequence_normalizer: float | torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    high_prob_threshold: float = 0.5,
    entropy_sensitivity: torch.Tensor | None = None,
    **loss_hparams: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss `name` from `POLICY_LOSSES`, aggregated, with optional extra terms.

    loss = agg(tis_weight * token_loss) - entropy_coef * agg(entropy)
           + nll_coef * agg_positive(-log_probs)

    Args:
        name: a key of `POLICY_LOSSES`.
        log_probs: `[batch, response_len]` current policy log-probs (with grad).
        old_log_probs: `[batch, response_len]` log-probs of the sampling policy.
        advantages: `[batch, response_len]` per-token advantages.
        loss_mask: `[batch, response_len]` 1/True on response tokens that count.
        aggregation, token_normalizer, sequence_normalizer: see the module docstring.
        entropy: `[batch, response_len]` per-token entropy (with grad), needed when
            `entropy_coef` > 0; its mask-token mean is also reported as `entropy`.
        entropy_coef: weight of the entropy bonus.
        nll_coef: weight of the NLL term on positive-advantage tokens.
        nll_token_normalizer, nll_sequence_normalizer: global positive-token and
            positive-sequence counts for that term (see `loss_normalizers`).
        rollout_log_probs: `[batch, response_len]` log-probs reported by the
            rollout engine; when given, the per-token policy loss is weighted
            by min(exp(old_log_probs - rollout_log_probs), tis_cap).
        tis_cap: truncation of that weight (ignored without rollout_log_probs).
        high_prob_threshold: pi >= this makes a token "high probability" in the
            `frac_*` metrics (pi_old >= this in `clip_frac_*_hp`).
        entropy_sensitivity: `[batch, response_len]` S_t of each token
            (`diagnostics.entropy_sensitivity`); when given, the metrics add
            `diagnostics.predicted_entropy_change` (which needs the variant to
            take `eps_low` and `eps_high`).
        **loss_hparams: the variant's own hyperparameters, e.g. `eps_low`,
            `eps_high`, `beta1`, `beta2`, `dual_clip_c` for `ce_gppo`.

    Returns:
        The scalar loss and float metrics: `clip_frac_low`, `clip_frac_high`,
        `clip_frac_dual`, `clip_frac_low_hp`, `clip_frac_high_hp`, `approx_kl` (k3), `approx_kl_k1`, `ratio_mean`,
        `frac_pa_hp`, `frac_pa_lp`, `frac_na_hp`, `frac_na_lp`,
        `entropy_change_estimate` (+ its three moments), `pg_loss` (token mean
        of the policy term), `nll`, `num_tokens`, `num_sequences`,
        `num_positive_tokens`, and `entropy`, `tis_weight_mean`,
        `tis_clip_frac` when those inputs are given. Combine micro-batches with
        `diagnostics.combine_metrics`.

    Raises:
        ValueError: unknown `name` or hparam, or an hparam out of range.
    """
    _check_shapes(
        log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        loss_mask=loss_mask,
        entropy=entropy,
        rollout_log_probs=rollout_log_probs,
        entropy_sensitivity=entropy_sensitivity,
    )
    _validate(
        name,
        loss_hparams,
        aggregation=aggregation,
        normalizers={
            "token_normalizer": token_normalizer,
            "sequence_normalizer": sequence_normalizer,
            "nll_token_normalizer": nll_token_normalizer,
            "nll_sequence_normalizer": nll_sequence_normalizer,
        },
        entropy=entropy,
        entropy_coef=entropy_coef,
        nll_coef=nll_coef,
        tis_cap=tis_cap,
        high_prob_threshold=high_prob_threshold,
    )
    loss_mask = loss_mask.bool()
    token_loss = POLICY_LOSSES[name](
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        loss_mask=loss_mask,
        **loss_hparams,
    )
    policy_loss = token_loss.loss
    metrics: dict[str, torch.Tensor] = {}
    tis_weights = None
    if rollout_log_probs is not None:
        tis_weights, truncated = truncated_is_weights(
            old_log_probs=old_log_probs, rollout_log_probs=rollout_log_probs, loss_mask=loss_mask, tis_cap=tis_cap
        )
        policy_loss = policy_loss * tis_weights
        metrics["tis_weight_mean"] = diagnostics.masked_mean(tis_weights, loss_mask)
        metrics["tis_clip_frac"] = diagnostics.masked_mean(truncated.double(), loss_mask)

    if entropy_sensitivity is not None:
        hparams = {**_variant_hparams(name), **loss_hparams}
        metrics.update(diagnostics.predicted_entropy_change(
            loss_grad=_token_loss_grad(name, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages,
                                       loss_mask=loss_mask, tis_weights=tis_weights, **loss_hparams),
            sensitivity=entropy_sensitivity, advantages=advantages, clipped_low=token_loss.clipped_low,
            clipped_high=token_loss.clipped_high, loss_mask=loss_mask,
            eps_low=hparams["eps_low"], eps_high=hparams["eps_high"]))

    loss = aggregate(
        policy_loss,
        loss_mask=loss_mask,
        aggregation=aggregation,
        token_normalizer=token_normalizer,
        sequence_normalizer=sequence_normalizer,
    )
    if entropy_coef != 0:
        entropy_bonus = aggregate(
            entropy,
            loss_mask=loss_mask,
            aggregation=aggregation,
            token_normalizer=token_normalizer,
            sequence_normalizer=sequence_normalizer,
        )
        loss = loss - entropy_coef * entropy_bonus
    if nll_coef != 0:
        nll = aggregate(
            -log_probs,
            loss_mask=loss_mask & (advantages > 0),
            aggregation=aggregation,
            token_normalizer=nll_token_normalizer,
            sequence_normalizer=nll_sequence_normalizer,
        )
        loss = loss + nll_coef * nll

    metrics.update(
        _policy_metrics(
            token_loss=token_loss,
            policy_loss=policy_loss,
            log_probs=log_probs,
            old_log_probs=old_log_probs,
            advantages=advantages,
            loss_mask=loss_mask,
            entropy=entropy,
            high_prob_threshold=high_prob_threshold,
        )
    )
    return loss, diagnostics.to_floats(metrics)
