"""Interval bounds of generated values, so random cascades stay in safe numeric ranges.

The cascade strategy tracks a conservative interval for every subexpression and every
tensor it builds. Where an operator's domain is not guaranteed by its argument's interval
(``log`` of something that may be negative, ``exp`` of something large), the strategy
wraps the argument first. Every drawn program is then finite on every input the strategy
draws, without rejection sampling (which would make hypothesis give up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Interval:
    """A closed range ``[lo, hi]`` that holds every value a tensor or expression can take."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        # An undefined bound (inf - inf) means "anything": widen rather than lie.
        if math.isnan(self.lo) or math.isnan(self.hi):
            object.__setattr__(self, "lo", -math.inf)
            object.__setattr__(self, "hi", math.inf)

    @property
    def bound(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def hull(self, other: Interval) -> Interval:
        return Interval(min(self.lo, other.lo), max(self.hi, other.hi))

    def scaled(self, k: float) -> Interval:
        """Multiply by a positive constant."""
        return Interval(self.lo * k, self.hi * k)

    def summed(self, n: int) -> Interval:
        """The range of a sum of ``n`` values each in this interval."""
        return Interval(self.lo * n, self.hi * n)

    def away_from_zero(self, margin: float) -> bool:
        return self.lo >= margin or self.hi <= -margin


TOP = Interval(-math.inf, math.inf)
UNIT = Interval(0.0, 1.0)


def point(v: float) -> Interval:
    return Interval(float(v), float(v))


def _logistic(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


_MONOTONE: dict[str, Callable[[float], float]] = {
    "exp": math.exp,
    "log": math.log,
    "sqrt": math.sqrt,
    "tanh": math.tanh,
    "erf": math.erf,
    "logistic": _logistic,
    "sign": _sign,
}

_BOOLEAN = frozenset({"lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not"})


def _corners(f: Callable[[float, float], float], a: Interval, b: Interval) -> Interval:
    vals = [f(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return Interval(min(vals), max(vals))


def _transfer(op: str, args: Sequence[Interval]) -> Interval:
    a = args[0]
    if op in _BOOLEAN:
        return UNIT
    if op in _MONOTONE:
        f = _MONOTONE[op]
        return Interval(f(a.lo), f(a.hi))
    if op == "neg":
        return Interval(-a.hi, -a.lo)
    if op == "rsqrt":
        return Interval(1.0 / math.sqrt(a.hi), 1.0 / math.sqrt(a.lo))
    if op == "abs":
        if a.lo >= 0:
            return a
        if a.hi <= 0:
            return Interval(-a.hi, -a.lo)
        return Interval(0.0, a.bound)
    if op in ("sin", "cos"):
        return Interval(-1.0, 1.0)
    if op == "where":
        return args[1].hull(args[2])
    b = args[1]
    if op == "add":
        return Interval(a.lo + b.lo, a.hi + b.hi)
    if op == "sub":
        return Interval(a.lo - b.hi, a.hi - b.lo)
    if op == "mul":
        return _corners(lambda x, y: x * y, a, b)
    if op == "div":
        if not b.away_from_zero(1e-300):
            return TOP
        return _corners(lambda x, y: x / y, a, b)
    if op == "max":
        return Interval(max(a.lo, b.lo), max(a.hi, b.hi))
    if op == "min":
        return Interval(min(a.lo, b.lo), min(a.hi, b.hi))
    if op == "pow":
        if a.lo <= 0:
            return TOP
        return _corners(math.pow, a, b)
    raise KeyError(op)


def transfer(op: str, args: Sequence[Interval]) -> Interval:
    """The interval of ``op(args)``; TOP where the arithmetic itself overflows."""
    try:
        return _transfer(op, args)
    except (OverflowError, ValueError, ZeroDivisionError):
        return TOP
