"""The one interface the trainer uses to talk to rollout engines.

A rollout engine turns prompts (token ids) into `Sample`s and takes new
weights after every step. `SGLangEngine` (sglang_engine.py) implements it
over HTTP for real SGLang servers and for our own `megatron-gppo serve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

from megatron_gppo.rollout import sglang_requests
from megatron_gppo.rollout.protocol import validate
from megatron_gppo.types import Sample

if TYPE_CHECKING:
    import torch

    from megatron_gppo.config import RolloutConfig


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings, named as SGLang's `sampling_params`.

    Log-probs returned with each token are of softmax(logits / temperature)
    over the whole vocabulary, before top-k / top-p filtering: that is what
    SGLang returns by default, and what the trainer recomputes.
    """

    temperature: float = 1.0
    """0 means greedy (SGLang then scores with temperature 1)."""

    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""

    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    """Stop strings; the response text is cut before them, the tokens are kept."""

    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens on top of the model's EOS."""

    ignore_eos: bool = False
    seed: int | None = None
    """Makes sampling reproducible: request `(i, j)` of a `generate` call gets SGLang's
    `sampling_seed` derived from `(seed, i, j)`, whichever server answers it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other SGLang sampling params passed through verbatim (e.g. `min_p`)."""

    def __post_init__(self) -> None:
        # SGLang's own rules; `extra` is the server's to judge.
        validate(sglang_requests.SamplingParams, self._own_params(), prefix="sampling_params.")

    @classmethod
    def from_config(cls, config: RolloutConfig, **overrides: Any) -> SamplingParams:
        values = dict(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                      max_new_tokens=config.max_new_tokens)
        return cls(**{**values, **overrides})

    def _own_params(self) -> dict[str, Any]:
        params: dict[str, Any] = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                      max_new_tokens=self.max_new_tokens)
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params

    def to_sglang(self) -> dict[str, Any]:
        """The `sampling_params` object of a `/generate` request (without `n`)."""
        return {**self._own_params(), **self.extra}

    def request_seed(self, prompt_index: int, sample_index: int) -> int | None:
        """The `sampling_seed` of sample `sample_index` of prompt `prompt_index` (None without a seed)."""
        if self.seed is None:
            return None
        return mix_seed(self.seed, prompt_index * 10_007 + sample_index, stride=1_000_003)


def mix_seed(seed: int, index: int, *, stride: int = 1_000_033) -> int:
    """The seed of item `index` of a stream seeded `seed`: distinct for distinct (seed, index < stride).

    Kept within int63 for the JSON peer. Every derived seed of a run comes
    from here (per step, per evaluation, per request), so a resumed run draws
    exactly what an uninterrupted one would.
    """
    return (seed * stride + index) % (2**63 - 1)


class RolloutEngine(Protocol):
    """What the trainer needs from a fleet of rollout servers."""

    def generate(self, prompts: Sequence[Sequence[int]], *, sampling: SamplingParams, n: int = 1) -> list[list[Sample]]:
        """`n` samples for each prompt: `result[i][j]` is sample `j` of prompt `i`, each exactly once."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str) -> None:
        """Stream Hugging Face-named tensors to every server; afterwards all report `version`."""
        ...

    def restart_dead_servers(self) -> int:
        """Start again the servers this engine started whose process died; how many. They need a weight
        sync before they generate."""
        ...

    num_restarts: int
    """Servers restarted so far."""
    num_retries: int
    """Generate requests retried so far (on the same server or another)."""

    def release_memory(self) -> None:
        """Free accelerator memory (colocated runs) until `resume_memory`."""
        ...

    def resume_memory(self) -> None:
        ...

    def close(self) -> None:
        """Release connections (and stop servers this engine started)."""
        ...


__all__ = ["RolloutEngine", "SamplingParams", "mix_seed"]
