"""Put the trainer back where it was: weights, optimizer moments and lr schedule, copied to host memory.

A what-if diagnostic (`trainer.realized_entropy_after`) redoes a step's
updates with another beta and rewinds, so the real updates then run from exactly
the state they would have had without it. Everything an update changes is here:

- the model chunks' parameters (their DDP buffers are views of them);
- each inner torch optimizer's parameters (fp32 master copies or
  distributed-optimizer shards, where the optimizer keeps its own) and its per-
  parameter state (Adam's moments and step), and its param groups' scalars
  (the lr and weight decay the schedule set; fused Adams keep their step there);
- the lr schedule's step count.

Gradients are not kept: every update zeroes them first. The copies live in
host memory (a rank's weights and optimizer state, once), so on a GPU a
snapshot costs transfer time, not device memory; it is for diagnostics, not
the hot path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_gppo.model.optimizer import torch_optimizers


@dataclass
class TrainingSnapshot:
    """Saved copies of everything an optimizer update changes; `restore()` writes them back in place."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(live tensor, saved copy) pairs."""
    states: list[tuple[torch.optim.Optimizer, dict[Any, dict[str, _HostCopy]]]] = field(default_factory=list)
    """(torch optimizer, saved copy of its per-parameter state) pairs; state it creates later is dropped."""
    groups: list[tuple[dict, dict]] = field(default_factory=list)
    """(live param group, its saved non-parameter entries) pairs."""
    scheduler_steps: int = 0

    @classmethod
    def take(cls, *, chunks: list[torch.nn.Module], optimizer: Any, scheduler: Any) -> TrainingSnapshot:
        snapshot = cls(scheduler_steps=scheduler.num_steps)
        params = {id(param): param for chunk in chunks for param in chunk.parameters()}
        for _, inner in torch_optimizers(optimizer):
            for group in inner.param_groups:
                snapshot.groups.append((group, copy.deepcopy({k: v for k, v in group.items() if k != "params"})))
                # An fp32 optimizer steps the model's own parameters: copy each tensor once.
                params.update((id(param), param) for param in group["params"])
            snapshot.states.append((inner, {param: {key: _HostCopy.of(value) for key, value in state.items()}
                                            for param, state in inner.state.items()}))
        snapshot.tensors = [(param.data, _to_host(param.data)) for param in params.values()]
        return snapshot

    def restore(self, *, scheduler: Any) -> None:
        with torch.no_grad():
            for live, saved in self.tensors:
                live.copy_(saved)
        for inner, saved in self.states:
            inner.state.clear()
            inner.state.update({param: {key: value.back() for key, value in state.items()}
                                for param, state in saved.items()})
        for live, saved in self.groups:
            live.update(copy.deepcopy(saved))
        scheduler.num_steps = self.scheduler_steps


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


@dataclass(frozen=True)
class _HostCopy:
    """One optimizer-state entry: a tensor copied to host memory (and the device it goes back to), or a value."""

    value: Any
    device: torch.device | None = None

    @classmethod
    def of(cls, value: Any) -> _HostCopy:
        if torch.is_tensor(value):
            return cls(_to_host(value), value.device)
        return cls(copy.deepcopy(value))

    def back(self) -> Any:
        return self.value.to(self.device, copy=True) if self.device is not None else copy.deepcopy(self.value)
