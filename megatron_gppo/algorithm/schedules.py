"""Schedules for CE-GPPO's (beta1, beta2) over training steps.

Every schedule has the same small interface:

    schedule.betas(step, *, entropy=None, sensitivities=None) -> (beta1, beta2)
    schedule.state_dict() -> dict           # save with the checkpoint
    schedule.load_state_dict(state)         # restore on resume

Call `betas` once per training step, before computing that step's loss.
`entropy` is the most recent measured mean token entropy (e.g. the previous
step's `entropy` metric) and `sensitivities` the previous step's
`(entropy_sensitivity_beta1, entropy_sensitivity_beta2)`; only the
entropy-target controller reads them.

Direction of the knobs (paper section 5.1): a larger beta1 amplifies the
gradient of clipped negative-advantage low-probability tokens and LOWERS
entropy; a larger beta2 amplifies clipped positive-advantage low-probability
tokens and RAISES entropy. That reading assumes the clipped tokens are
low-probability ones; the entropy-target controller measures the direction
instead (see its docstring). The paper's 7B run switches (beta1, beta2) from
(0, 1) to (0.5, 1) at step 585: `StepSwitch(585, before=(0, 1), after=(0.5, 1))`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

    def betas(self, step: int, **feedback: Any) -> BetaPair:
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

    def betas(self, step: int, **feedback: Any) -> BetaPair:
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

    def betas(self, step: int, **feedback: Any) -> BetaPair:
        fraction = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        beta1 = self.start[0] + fraction * (self.end[0] - self.start[0])
        beta2 = self.start[1] + fraction * (self.end[1] - self.start[1])
        return beta1, beta2


# d entropy / d beta by the paper's reading (section 5.1): beta1 lowers it, beta2 raises it.
PAPER_SIGNS = (-1.0, 1.0)


@dataclass
class EntropyTargetController:
    """Closed-loop control of the entropy into the band [low, high], steering each beta the measured way.

    Each step the error is the distance of the last measured entropy from the
    band (0 inside it: a dead band). A PI law in velocity form turns it into
    a wanted entropy move, du = proportional_gain * (e - e_prev) +
    integral_gain * e, and each beta moves against it along its own
    direction: beta_i -= du * sign(dH/dbeta_i), clipped to its bounds (the
    betas themselves carry the integral, so a beta held at a bound does not
    wind up).

    sign(dH/dbeta_i) is measured: the caller passes `entropy_sensitivity_beta1/2`
    (`diagnostics.predicted_entropy_change`, first order on the logits) or,
    where the run measures them, `realized_entropy_sensitivity_beta1/2` (what-if
    updates through the real optimizer), smoothed over steps by an EMA.
    Until 2 / a measurements have come in, while an EMA is within its noise
    (|mean| < 2 x the EMA's own standard deviation, sqrt(var * a / (2 - a))
    for an EMA factor a of independent steps), or with `sign="paper"`, the
    paper's sign is used instead
    (`PAPER_SIGNS`): `sign="paper"` is the fixed-sign controller, kept for
    comparison. At most one update per step, so calling `betas` twice for a
    step is harmless.
    """

    low: float
    high: float
    _: KW_ONLY
    initial: BetaPair = (hparam_default("beta1"), hparam_default("beta2"))
    proportional_gain: float = 20.0
    """Beta moved per nat of change in the error."""
    integral_gain: float = 5.0
    """Beta moved per step per nat of error."""
    beta1_bounds: BetaPair = (0.0, 2.0)
    beta2_bounds: BetaPair = (0.0, 2.0)
    sign: str = "measured"
    """"measured": each beta's direction from its sensitivity; "paper": always `PAPER_SIGNS`."""
    sensitivity_ema: float = 0.2
    kind = "entropy_target"
    _current: BetaPair = field(init=False, repr=False)
    _last_update_step: int | None = field(init=False, repr=False, default=None)
    _last_error: float = field(init=False, repr=False, default=0.0)
    _sensitivity_mean: list[float] = field(init=False, repr=False, default_factory=lambda: [0.0, 0.0])
    _sensitivity_var: list[float] = field(init=False, repr=False, default_factory=lambda: [0.0, 0.0])
    _num_observed: list[int] = field(init=False, repr=False, default_factory=lambda: [0, 0])
    saturated_steps: int = field(init=False, default=0)
    """Consecutive steps with the entropy outside the band and both betas at the bound it pushes them to."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"entropy band needs finite low < high, got low={self.low!r} high={self.high!r}")
        for name in ("proportional_gain", "integral_gain"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.sign not in ("measured", "paper"):
            raise ValueError(f"sign must be 'measured' or 'paper', got {self.sign!r}")
        if not 0 < self.sensitivity_ema <= 1:
            raise ValueError(f"sensitivity_ema must be in (0, 1], got {self.sensitivity_ema!r}")
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

    def betas(self, step: int, *, entropy: float | None = None,
              sensitivities: Sequence[float | None] | None = None) -> BetaPair:
        already_updated = self._last_update_step is not None and step <= self._last_update_step
        if entropy is None or already_updated:
            return self._current
        if sensitivities is not None:
            self._observe(sensitivities)
        error = entropy - self.high if entropy > self.high else entropy - self.low if entropy < self.low else 0.0
        wanted = self.proportional_gain * (error - self._last_error) + self.integral_gain * error
        self._last_error = error
        bounds = (self.beta1_bounds, self.beta2_bounds)
        directions = self.directions()
        self._current = tuple(_clip(beta - wanted * direction, bound)
                              for beta, direction, bound in zip(self._current, directions, bounds))
        # Pushing entropy down (error > 0) drives each beta to the bound against its direction.
        at_bound = all(beta == (bound[1] if -error * direction > 0 else bound[0])
                       for beta, direction, bound in zip(self._current, directions, bounds))
        self.saturated_steps = self.saturated_steps + 1 if error != 0 and at_bound else 0
        self._last_update_step = step
        return self._current

    def directions(self) -> BetaPair:
        """The sign of d entropy / d beta1 and d beta2 the controller acts on."""
        if self.sign == "paper":
            return PAPER_SIGNS
        a = self.sensitivity_ema
        directions = []
        for mean, var, count, paper in zip(self._sensitivity_mean, self._sensitivity_var, self._num_observed,
                                           PAPER_SIGNS):
            # (The EMA's variance estimate is biased low until it has seen about 2 / a steps.)
            settled = count >= 2 / a and abs(mean) > 2 * math.sqrt(var * a / (2 - a))
            directions.append(math.copysign(1.0, mean) if settled else paper)
        return tuple(directions)

    def _observe(self, sensitivities: Sequence[float | None]) -> None:
        a = self.sensitivity_ema
        for i, value in enumerate(sensitivities):
            if value is None or not math.isfinite(value):
                continue
            deviation = value - self._sensitivity_mean[i]
            self._sensitivity_mean[i] += a * deviation
            self._sensitivity_var[i] = (1 - a) * (self._sensitivity_var[i] + a * deviation**2)
            self._num_observed[i] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "betas": list(self._current), "last_update_step": self._last_update_step,
                "last_error": self._last_error, "sensitivity_mean": list(self._sensitivity_mean),
                "sensitivity_var": list(self._sensitivity_var), "num_observed": list(self._num_observed),
                "saturated_steps": self.saturated_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self._current = _pair(state["betas"], name="betas")
        self._last_update_step = state["last_update_step"]
        self._last_error = float(state.get("last_error", 0.0))
        self._sensitivity_mean = [float(v) for v in state.get("sensitivity_mean", (0.0, 0.0))]
        self._sensitivity_var = [float(v) for v in state.get("sensitivity_var", (0.0, 0.0))]
        self._num_observed = [int(v) for v in state.get("num_observed", (0, 0))]
        self.saturated_steps = int(state.get("saturated_steps", 0))


def sensitivities_from(metrics: Mapping[str, float]) -> list[float | None]:
    """The step's (d entropy / d beta1, d beta2) for the controller: realized through the optimizer where the
    run measures it (`realized_entropy_sensitivity_*`), else the first-order `entropy_sensitivity_*`."""
    name = "realized_entropy_sensitivity" if "realized_entropy_sensitivity_beta1" in metrics else "entropy_sensitivity"
    return [metrics.get(f"{name}_beta1"), metrics.get(f"{name}_beta2")]


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
