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

    weight_versions: list[dict[str, Any]] = field(default_factory=list)
    """Which weights produced which response tokens: SGLang's `[{"version", "start", "end"}, ...]` spans
    over `response_ids` (more than one when the response was continued across a weight sync)."""

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

    @property
    def versions(self) -> list[str]:
        """Every weight version that produced some of the response, oldest first."""
        return [span["version"] for span in self.weight_versions] or [self.weight_version]

    def continued_by(self, continuation: Sample) -> Sample:
        """This (aborted) response followed by `continuation`, generated from prompt + this response: token
        ids, log-probs, text and version spans joined; the finish reason and last version are the
        continuation's."""
        offset = self.response_length
        spans = [dict(span) for span in self.weight_versions]
        for span in continuation.weight_versions:
            if spans and spans[-1]["version"] == span["version"] and spans[-1]["end"] == span["start"] + offset:
                spans[-1]["end"] = span["end"] + offset
            else:
                spans.append({"version": span["version"], "start": span["start"] + offset,
                              "end": span["end"] + offset})
        return Sample(group_index=self.group_index, sample_index=self.sample_index, prompt_ids=self.prompt_ids,
                      response_ids=self.response_ids + continuation.response_ids,
                      rollout_log_probs=self.rollout_log_probs + continuation.rollout_log_probs,
                      finish_reason=continuation.finish_reason, weight_version=continuation.weight_version,
                      weight_versions=spans, response_text=self.response_text + continuation.response_text,
                      metadata={**self.metadata, **continuation.metadata})


__all__ = ["FinishReason", "Sample"]
