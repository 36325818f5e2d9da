"""Numeric ranges that check a value and say in words what they allow.

The policy-loss registry declares the range of each hyperparameter with one
`Bound` (`losses.HPARAM_BOUNDS`); the run config puts the same bounds on its
fields, and both word their errors with `describe`, so a bound is written once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Bound:
    """`ge <= value`, `gt < value`, `value <= le`, `value < lt`; None leaves a side open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: Any) -> bool:
        """Whether `value` is a finite real number (not a bool) inside the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def limits(self) -> dict[str, float]:
        """The set sides as keyword arguments, e.g. for `pydantic.Field(**bound.limits())`."""
        return {side: value for side, value in asdict(self).items() if value is not None}

    def describe(self, noun: str = "a number") -> str:
        """`a number in [0, 1)`, `an integer >= 1`, `a number > 0`, or just `noun` when unbounded."""
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"{noun} in {low}, {high}"
        if low:
            return f"{noun} {'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{noun} {'<=' if self.le is not None else '<'} {high[:-1]}"
        return noun


__all__ = ["Bound"]
