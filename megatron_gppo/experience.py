"""Prompts -> scored samples with advantages (one training batch), and held-out evaluation.

Runs on the driver process (global rank 0), which owns the rollout engine.
Dynamic sampling (DAPO) drops groups whose rewards are all equal, since their
advantages are zero, and samples more prompts until the batch is full or
`max_refill_rounds` extra rounds are spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from megatron_gppo.algorithm import dynamic_sampling_mask, group_advantages
from megatron_gppo.data import Prompt, PromptSampler
from megatron_gppo.rollout.engine import RolloutEngine, SamplingParams
from megatron_gppo.types import Sample

RewardFn = Callable[[list[str], list[str]], list[float]]
"""(responses, reference answers) -> rewards."""


@dataclass(kw_only=True)
class Experience:
    samples: list[Sample]
    """Kept groups, flattened group by group, with `reward` and `advantage` set."""
    metrics: dict[str, float] = field(default_factory=dict)


def _score(groups: list[list[Sample]], prompts: Sequence[Prompt], reward_fn: RewardFn) -> torch.Tensor:
    """Set `sample.reward` for every sample; returns `[num_groups * n]` rewards."""
    flat = [(sample, prompt) for group, prompt in zip(groups, prompts) for sample in group]
    rewards = reward_fn([s.response_text for s, _ in flat], [p.answer for _, p in flat])
    for (sample, prompt), reward in zip(flat, rewards):
        sample.reward = reward
        sample.metadata["answer"] = prompt.answer
    return torch.tensor(rewards, dtype=torch.float64)


def collect_experience(
    *,
    engine: RolloutEngine,
    prompts: Sequence[Prompt],
    encoded_prompts: Sequence[list[int]],
    sampler: PromptSampler,
    reward_fn: RewardFn,
    sampling: SamplingParams,
    num_groups: int,
    group_size: int,
    normalize_std: bool,
    dynamic_sampling: bool,
    max_refill_rounds: int,
) -> Experience:
    """Sample `num_groups` prompts x `group_size` responses, score them and compute GRPO advantages."""
    kept: list[list[Sample]] = []
    generated: list[Sample] = []
    num_rounds = 0
    while len(kept) < num_groups and num_rounds <= (max_refill_rounds if dynamic_sampling else 0):
        indices = sampler.next_indices(num_groups - len(kept))
        groups = engine.generate([encoded_prompts[i] for i in indices], sampling=sampling, n=group_size)
        rewards = _score(groups, [prompts[i] for i in indices], reward_fn)
        advantages = group_advantages(rewards, group_size=group_size, normalize_std=normalize_std)
        for sample, advantage in zip((s for g in groups for s in g), advantages.tolist()):
            sample.advantage = advantage
        keep = dynamic_sampling_mask(rewards, group_size=group_size) if dynamic_sampling else [True] * len(groups)
        kept += [group for group, keep_it in zip(groups, keep) if keep_it]
        generated += [s for g in groups for s in g]
        num_rounds += 1
    num_kept = len(kept)
    if not kept:
        # Every group was uniform even after refilling: train on the last round,
        # whose advantages are all zero, so the step still happens everywhere.
        kept = groups
    samples = [s for group in kept for s in group]
    lengths = [s.response_length for s in generated]
    metrics = {
        # Over everything generated this step: the policy's own success rate,
        # not the filtered batch's.
        "reward_mean": sum(s.reward for s in generated) / len(generated),
        "response_length_mean": sum(lengths) / len(lengths),
        "response_length_max": float(max(lengths)),
        "truncated_frac": sum(s.finish_reason == "length" for s in generated) / len(generated),
        "num_groups_kept": float(num_kept),
        "num_rollout_rounds": float(num_rounds),
        "num_samples_generated": float(len(generated)),
    }
    return Experience(samples=samples, metrics=metrics)


def evaluate(
    *,
    engine: RolloutEngine,
    prompts: Sequence[Prompt],
    encoded_prompts: Sequence[list[int]],
    reward_fn: RewardFn,
    sampling: SamplingParams,
    num_samples: int,
) -> dict[str, float]:
    """avg@k (mean success over all k samples of every prompt) and pass@k (any success)."""
    groups = engine.generate(list(encoded_prompts), sampling=sampling, n=num_samples)
    rewards = _score(groups, prompts, reward_fn).view(len(prompts), num_samples)
    correct = rewards >= 1.0
    return {
        "eval_accuracy": float(correct.double().mean()),
        "eval_pass_at_k": float(correct.any(dim=1).double().mean()),
        "eval_response_length_mean": sum(s.response_length for g in groups for s in g) / rewards.numel(),
    }
