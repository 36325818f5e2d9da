"""Pure-torch RL algorithm core: advantages, the policy-loss registry, diagnostics, beta schedules.

This package never imports megatron, so it runs and is tested anywhere torch does.
"""

from megatron_gppo.algorithm.advantages import dynamic_sampling_mask, group_advantages, token_advantages
from megatron_gppo.algorithm.diagnostics import combine_metrics
from megatron_gppo.algorithm.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    TokenLoss,
    aggregate,
    compute_policy_loss,
    loss_kwargs,
    loss_normalizers,
)
from megatron_gppo.algorithm.schedules import BETA_SCHEDULES, make_beta_schedule

__all__ = [
    "AGGREGATIONS",
    "BETA_SCHEDULES",
    "POLICY_LOSSES",
    "TokenLoss",
    "aggregate",
    "combine_metrics",
    "compute_policy_loss",
    "dynamic_sampling_mask",
    "group_advantages",
    "loss_kwargs",
    "loss_normalizers",
    "make_beta_schedule",
    "token_advantages",
]
