"""Schedules for CE-GPPO's (beta1, beta2) over training steps.

Every schedule has the same small interface:

    schedule.betas(step, *, entropy=None) -> (beta1, beta2)
    schedule.state_dict() -> dict           # save with the checkpoint
    schedule.load_state_dict(state)         # restore on resume

Call `betas` once per training step, before computing that step's loss.
`entropy` is the most recent measured mean token entropy (e.g. the previous
step's `entropy` metric); only the entropy-target controller reads it.

Direction of the knobs (paper section 5.1): a larger beta1 amplifies the
gradient of clipped negative-advantage low-probability tokens and LOWERS
entropy; a larger beta2 amplifies clipped positive-advantage low-probability
tokens and RAISES entropy. The paper's 7B run switches (beta1, beta2) from
(0, 1) to (0.5, 1) at step 585: `StepSwitch(585, before=(0, 1), after=(0.5, 1))`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from megatron_gppo.algorithm.losses import hparam_default

BetaPair = tuple[float, float]


def _pair(value: Sequence[float], *, name: str) -> BetaPair:
    """A validated (beta1, beta2) pair; YAML lists are accepted."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of two numbers, got {value!r}")
    try:
        beta1, beta2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold two numbers, got {value!r}") from None
    if not (math.isfinite(beta1) and math.isfinite(beta2) and beta1 >= 0 and beta2 >= 0):
        raise ValueError(f"{name} must hold two finite numbers >= 0, got {value!r}")
    return beta1, beta2


def _check_step(value: Any, *, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


class _Stateless:
    """State handling for schedules that are a pure function of the step."""

    kind: str

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"checkpoint holds beta-schedule state of kind {state.get('kind')!r}, this run uses {kind!r}")


@dataclass
class ConstantBetas(_Stateless):
    """The same (beta1, beta2) at every step; defaults are the paper's 1.5B setting."""

    beta1: float = hparam_default("beta1")
    beta2: float = hparam_default("beta2")
    kind = "constant"

    def __post_init__(self) -> None:
        self.beta1, self.beta2 = _pair((self.beta1, self.beta2), name="(beta1, beta2)")

    def betas(self, step: int, *, entropy: float | None = None) -> BetaPair:
        return self.beta1, self.beta2


@dataclass
class StepSwitch(_Stateless):
    """`before` for steps < `switch_step`, `after` from `switch_step` on."""

    switch_step: int
    _: KW_ONLY
    before: BetaPair = (0.0, 1.0)
    after: BetaPair = (0.5, 1.0)
    kind = "step"

    def __post_init__(self) -> None:
        _check_step(self.switch_step, name="switch_step")
        self.before = _pair(self.before, name="before")
        self.after = _pair(self.after, name="after")

    def betas(self, step: int, *, entropy: float | None = None) -> BetaPair:
        return self.before if step < self.switch_step else self.after


@dataclass
class LinearRamp(_Stateless):
    """`start` up to `start_step`, a straight line to `end` at `end_step`, `end` after."""

    start_step: int
    end_step: int
    _: KW_ONLY
    start: BetaPair = (0.0, 1.0)
    end: BetaPair = (0.5, 1.0)
    kind = "linear"

    def __post_init__(self) -> None:
        _check_step(self.start_step, name="start_step")
        _check_step(self.end_step, name="end_step")
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be > start_step ({self.start_step})")
        self.start = _pair(self.start, name="start")
        self.end = _pair(self.end, name="end")

    def betas(self, step: int, *, entropy: float | None = None) -> BetaPair:
        fraction = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        beta1 = self.start[0] + fraction * (self.end[0] - self.start[0])
        beta2 = self.start[1] + fraction * (self.end[1] - self.start[1])
        return beta1, beta2


@dataclass
class EntropyTargetController:
    """Nudge the betas to keep entropy inside the band [low, high].

    Entropy above `high`: beta1 += step_size, beta2 -= step_size (both push
    entropy down). Below `low`: the opposite. Inside the band: unchanged. Each
    beta is then clipped to its bounds; equal bounds freeze that beta. At most
    one update per step, so calling `betas` twice for a step is harmless.
    """

    low: float
    high: float
    _: KW_ONLY
    initial: BetaPair = (hparam_default("beta1"), hparam_default("beta2"))
    step_size: float = 0.05
    beta1_bounds: BetaPair = (0.0, 2.0)
    beta2_bounds: BetaPair = (0.0, 2.0)
    kind = "entropy_target"
    _current: BetaPair = field(init=False, repr=False)
    _last_update_step: int | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"entropy band needs finite low < high, got low={self.low!r} high={self.high!r}")
        if not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"step_size must be a number >= 0, got {self.step_size!r}")
        self.initial = _pair(self.initial, name="initial")
        self.beta1_bounds = _pair(self.beta1_bounds, name="beta1_bounds")
        self.beta2_bounds = _pair(self.beta2_bounds, name="beta2_bounds")
        for name, (lower, upper), value in (
            ("beta1", self.beta1_bounds, self.initial[0]),
            ("beta2", self.beta2_bounds, self.initial[1]),
        ):
            if lower > upper:
                raise ValueError(f"{name}_bounds must be (lower, upper) with lower <= upper, got ({lower}, {upper})")
            if not lower <= value <= upper:
                raise ValueError(f"initial {name} {value} is outside its bounds [{lower}, {upper}]")
        self._current = self.initial

    def betas(self, step: int, *, entropy: float | None = None) -> BetaPair:
        already_updated = self._last_update_step is not None and step <= self._last_update_step
        if entropy is None or already_updated:
            return self._current
        direction = 0.0
        if entropy > self.high:
            direction = 1.0
        elif entropy < self.low:
            direction = -1.0
        beta1 = _clip(self._current[0] + direction * self.step_size, self.beta1_bounds)
        beta2 = _clip(self._current[1] - direction * self.step_size, self.beta2_bounds)
        self._current = (beta1, beta2)
        self._last_update_step = step
        return self._current

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "betas": list(self._current), "last_update_step": self._last_update_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self._current = _pair(state["betas"], name="betas")
        self._last_update_step = state["last_update_step"]


def _clip(value: float, bounds: BetaPair) -> float:
    return min(max(value, bounds[0]), bounds[1])


BETA_SCHEDULES = {
    "constant": ConstantBetas,
    "step": StepSwitch,
    "linear": LinearRamp,
    "entropy_target": EntropyTargetController,
}


def make_beta_schedule(kind: str, **kwargs: Any) -> ConstantBetas | StepSwitch | LinearRamp | EntropyTargetController:
    """Build the schedule `kind` (a key of `BETA_SCHEDULES`) from its constructor arguments.

    Raises:
        ValueError: unknown kind, unknown or missing arguments, or bad values.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule '{kind}'; choose from {', '.join(BETA_SCHEDULES)}")
    try:
        return BETA_SCHEDULES[kind](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad arguments for beta schedule '{kind}': {error}") from None
