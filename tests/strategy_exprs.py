"""Random map expressions with tracked value intervals, for the cascade strategies.

``ExprGen`` draws expression trees over every operator of the IR. In safe mode it
wraps arguments whose interval falls outside an operator's domain (``log(abs(x) + 1)``,
``exp(tanh(x))``), and scales down values that grow large, so numerics stay comparable
between float64 references and float32 backends. Tensor reads come from a callback, so
the cascade builder decides which tensors and ranks an expression may use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hypothesis import strategies as st

from einfuse.ir.expr import BINARY_OPS, CAST_OPS, UNARY_OPS, Const, Expr, Op, Size, Var
from tests.strategy_values import TOP, Interval, point, transfer

T = TypeVar("T")
Draw = Callable[[st.SearchStrategy], object]

COMPARISONS = ("lt", "le", "gt", "ge", "eq", "ne")
ORDERINGS = ("lt", "le", "gt", "ge")
LOGIC = frozenset({"not", "and", "or"})
ARITHMETIC = ("add", "sub", "mul", "div", "max", "min", "pow")
SAFE_UNARY = tuple(sorted(UNARY_OPS - LOGIC - CAST_OPS))  # casts round: drawn apart
SAFE_CONSTANTS: tuple[int | float, ...] = (0.5, 2, 1.5, -1, 3, -0.25, 0, 1e-05, 0.125, -2.5)
WILD_CONSTANTS: tuple[float, ...] = (1e-05, -1e-05, math.inf, -math.inf, 1e300, -0.0, 0.1)
# Stored values are kept within this bound so float32 sums stay accurate.
SCALE_TARGET = 64.0
_RESCALE_ABOVE = 256.0


@dataclass(frozen=True, slots=True)
class Val:
    """A generated expression with the interval of its values."""

    expr: Expr
    iv: Interval
    boolean: bool = False


def pick(draw: Draw, options: Sequence[tuple[int, T]]) -> T:
    """Weighted choice; hypothesis shrinks toward the first option."""
    total = sum(w for w, _ in options)
    k = draw(st.integers(0, total - 1))
    for w, item in options:
        if k < w:
            return item
        k -= w
    raise AssertionError("unreachable")


def scale_down(v: Val, target: float = SCALE_TARGET) -> Val:
    """Divide by a power of two (exact in floating point) so the bound is at most ``target``."""
    if not v.iv.finite or v.iv.bound <= target:
        return v
    k = math.ceil(math.log2(v.iv.bound / target))
    return Val(Op("div", (v.expr, Const(2**k))), v.iv.scaled(2.0**-k))


class ExprGen:
    """Draws map expressions; ``operand()`` supplies tensor reads and updates ``in_use``."""

    def __init__(
        self,
        draw: Draw,
        *,
        operand: Callable[[], Val],
        in_use: set[str],
        sizes: Mapping[str, int],
        limit: int,
        safe: bool = True,
    ) -> None:
        self.draw, self.operand, self.in_use = draw, operand, in_use
        self.sizes, self.limit, self.safe = sizes, limit, safe

    # -- building blocks ---------------------------------------------------------
    def op(self, name: str, *args: Val) -> Val:
        iv = transfer(name, [a.iv for a in args]) if self.safe else TOP
        v = Val(Op(name, tuple(a.expr for a in args)), iv, name in COMPARISONS or name in LOGIC)
        if self.safe and v.iv.finite and v.iv.bound > _RESCALE_ABOVE:
            return scale_down(v)
        return v

    def const(self, value: int | float) -> Val:
        return Val(Const(value), point(value))

    def rank(self) -> str:
        """A rank for a rank value: one already used when the rank budget is spent."""
        reuse = self.in_use and (len(self.in_use) >= self.limit or self.draw(st.booleans()))
        r = self.draw(st.sampled_from(sorted(self.in_use) if reuse else sorted(self.sizes)))
        self.in_use.add(r)
        return r

    # -- domain guards (identity outside safe mode) --------------------------------
    def positive(self, v: Val, floor: float = 0.25) -> Val:
        """Make every value at least ``floor`` (for log, rsqrt, sqrt, divisors, bases)."""
        if not self.safe or v.iv.lo >= floor:
            return v
        how = self.draw(st.integers(0, 3))
        if how == 0:
            return self.op("add", self.op("abs", v), self.const(1))
        if how == 1:
            return self.op("exp", self.op("tanh", v))
        if how == 2:
            return self.op("add", self.op("logistic", v), self.const(0.5))
        return self.op("max", v, self.const(0.5))

    def bounded(self, v: Val, cap: float) -> Val:
        """Make every value's magnitude at most ``cap``."""
        if not self.safe or v.iv.bound <= cap:
            return v
        how = self.draw(st.integers(0, 3))
        if how == 0 or not v.iv.finite:
            return self.op("tanh", v)
        if how == 1:
            return self.op("erf", v)
        if how == 2:
            return scale_down(v, cap)
        c = self.const(cap / 2)
        return self.op("max", self.op("min", v, c), self.const(-cap / 2))

    def capped(self, v: Val, cap: float) -> Val:
        """Make every value at most ``cap`` (for exp), leaving large negatives alone."""
        if not self.safe or v.iv.hi <= cap:
            return v
        if self.draw(st.booleans()):
            return self.op("min", v, self.const(cap / 2))
        return self.bounded(v, cap)

    # -- expressions ---------------------------------------------------------------
    def leaf(self) -> Val:
        kind = pick(self.draw, [(6, "operand"), (2, "const"), (1, "rank"), (1, "size")])
        if kind == "operand":
            return self.operand()
        if kind == "const":
            if self.safe:
                return self.const(self.draw(st.sampled_from(SAFE_CONSTANTS)))
            wild = st.one_of(
                st.sampled_from(WILD_CONSTANTS), st.integers(-99, 99), st.floats(allow_nan=False)
            )
            return Val(Const(self.draw(wild)), TOP)
        if kind == "rank":
            r = self.rank()
            return Val(Var(r), Interval(0.0, self.sizes[r] - 1.0))
        r = self.draw(st.sampled_from(sorted(self.sizes)))
        return Val(Size(r), point(self.sizes[r]))

    def value(self, depth: int) -> Val:
        """A numeric expression at most ``depth`` operators deep."""
        if depth <= 0:
            return self.leaf()
        options = [(4, "leaf"), (3, "unary"), (4, "binary"), (1, "where"), (1, "compare")]
        kind = pick(self.draw, options)
        if kind == "leaf":
            return self.leaf()
        if kind == "unary":
            name = self.draw(
                st.sampled_from(SAFE_UNARY if self.safe else sorted(UNARY_OPS - CAST_OPS))
            )
            return self.unary(name, self.value(depth - 1))
        if kind == "binary":
            names = ARITHMETIC if self.safe else sorted(BINARY_OPS)
            name = self.draw(st.sampled_from(names))
            return self.binary(name, self.value(depth - 1), self.value(depth - 1))
        if kind == "where":
            c = self.cond(depth - 1)
            return self.op("where", c, self.value(depth - 1), self.value(depth - 1))
        return self.cond(depth - 1)

    def unary(self, name: str, a: Val) -> Val:
        if name == "exp":
            a = self.capped(a, 4.0)
        elif name in ("log", "rsqrt", "sqrt"):
            a = self.positive(a)
        elif name in ("sin", "cos"):
            a = self.bounded(a, 16.0)
        return self.op(name, a)

    def binary(self, name: str, a: Val, b: Val) -> Val:
        if name == "div" and not (self.safe and b.iv.away_from_zero(0.25)):
            b = self.positive(b)
        elif name == "pow":
            a = self.bounded(self.positive(a), 32.0)
            if self.safe and not (b.iv.lo >= -2.0 and b.iv.hi <= 2.0):
                if self.draw(st.booleans()):
                    b = self.const(self.draw(st.sampled_from((2, 3, 0.5, -1, 1.5, -0.5))))
                else:
                    b = self.op("tanh", b)
        return self.op(name, a, b)

    def cond(self, depth: int) -> Val:
        """A condition: comparisons of rank values or of values, under not/and/or."""
        options = [(3, "rank"), (2, "value")]
        if depth > 0:
            options += [(1, "not"), (1, "and"), (1, "or")]
        if not self.safe:
            options.append((1, "anything"))
        kind = pick(self.draw, options)
        if kind == "rank":
            r = self.rank()
            name = self.draw(st.sampled_from(COMPARISONS))
            if self.draw(st.booleans()):
                s = self.rank()
                other = Val(Var(s), Interval(0.0, self.sizes[s] - 1.0))
            else:
                other = self.const(self.draw(st.integers(0, self.sizes[r])))
            return self.op(name, Val(Var(r), Interval(0.0, self.sizes[r] - 1.0)), other)
        if kind == "value":
            a = self.value(0)
            b = self.const(self.draw(st.sampled_from((0, 0.5, -1, 1.5))))
            if self.draw(st.booleans()):
                b = self.value(0)
            return self.op(self.draw(st.sampled_from(ORDERINGS)), a, b)
        if kind == "not":
            return self.op("not", self.cond(depth - 1))
        if kind == "anything":
            return self.value(depth)
        return self.op(kind, self.cond(depth - 1), self.cond(depth - 1))
