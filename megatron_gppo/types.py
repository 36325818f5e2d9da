"""Data passed between stages: rollout -> reward -> advantages -> trainer.

Plain dataclasses with Python lists (no tensors) so samples cross process and
HTTP boundaries unchanged; the trainer packs them into tensors itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(kw_only=True)
class Sample:
    """One sampled response to one prompt.

    The rollout engine fills everything up to `weight_version`; the reward
    stage fills `reward`, the advantage estimator fills `advantage`.
    `len(response_ids) == len(rollout_log_probs)` always.
    """

    group_index: int
    """Index of the prompt in the batch passed to `generate`; samples of one prompt form a GRPO group."""

    sample_index: int
    """Index of this sample within its group, in [0, n)."""

    prompt_ids: list[int]
    """Prompt token ids as sent to the server."""

    response_ids: list[int]
    """Generated token ids, including the stop token when one ended the response."""

    rollout_log_probs: list[float]
    """Log-probability of each response token under the server's temperature-scaled distribution."""

    finish_reason: FinishReason
    """`stop` (stop token or string), `length` (max_new_tokens or context) or `abort`."""

    weight_version: str
    """Weight version the server reported when it finished this sample."""

    response_text: str = ""
    """Decoded response (what the reward function reads)."""

    reward: float | None = None
    """Scalar reward, filled by the reward stage."""

    advantage: float | None = None
    """Advantage (e.g. group-normalised reward), filled before the policy update."""

    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (e.g. the reference answer, the serving URL)."""

    def __post_init__(self) -> None:
        assert len(self.response_ids) == len(self.rollout_log_probs), (
            f"{len(self.response_ids)} response tokens but {len(self.rollout_log_probs)} log-probs")

    @property
    def response_length(self) -> int:
        return len(self.response_ids)


__all__ = ["FinishReason", "Sample"]
