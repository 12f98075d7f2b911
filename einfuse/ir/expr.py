"""Expressions of the Einsum IR: one small tree for both index and map expressions.

An index expression (inside ``T[...]``) is affine in rank variables: ``m``, ``m1+1``,
``m1*M0+m0``, ``M1``. A map expression (right of ``=``) combines tensor accesses,
constants and rank values (for masks such as ``where(m <= p, x, -inf)``) with a
closed set of elementwise operators. Sharing one tree keeps printing, parsing and
rewriting in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Operators of the map language, by arity. The set is closed: a name outside it
# is a parse error, so every backend can promise to implement every operator.
UNARY_OPS = frozenset(
    {
        "neg",
        "exp",
        "log",
        "sqrt",
        "rsqrt",
        "tanh",
        "erf",
        "abs",
        "sin",
        "cos",
        "logistic",
        "sign",
        "not",
    }
)
# Casts round their operand to a float dtype (``bfloat16(x)``, ``float32(x)``): the mixed
# precision of a program is part of its cascade, so the reference can model every rounding.
CAST_OPS = frozenset({"bfloat16", "float16", "float32", "float64"})
UNARY_OPS = UNARY_OPS | CAST_OPS
BINARY_OPS = frozenset(
    {
        "add",
        "sub",
        "mul",
        "div",
        "max",
        "min",
        "pow",
        "mod",
        "lt",
        "le",
        "gt",
        "ge",
        "eq",
        "ne",
        "and",
        "or",
    }
)
TERNARY_OPS = frozenset({"where"})
OPS = UNARY_OPS | BINARY_OPS | TERNARY_OPS

# Infix spellings; everything else prints as a call, ``exp(x)``.
INFIX = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "div": "/",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "eq": "==",
    "ne": "!=",
}
PRECEDENCE = {"lt": 1, "le": 1, "gt": 1, "ge": 1, "eq": 1, "ne": 1, "add": 2, "sub": 2}
PRECEDENCE |= {"mul": 3, "div": 3}

# Reduction operators and their identities (what padding must be filled with).
REDUCE_IDENTITY: dict[str, float] = {"sum": 0.0, "max": -math.inf, "min": math.inf, "prod": 1.0}


def arity(op: str) -> int:
    if op in UNARY_OPS:
        return 1
    if op in BINARY_OPS:
        return 2
    if op in TERNARY_OPS:
        return 3
    raise KeyError(op)


class Expr:
    """Base of expression nodes; nodes are frozen dataclasses, so equality is structural."""

    __slots__ = ()

    def children(self) -> tuple[Expr, ...]:
        return ()

    def walk(self) -> Iterator[Expr]:
        """Pre-order traversal, so analyses read as one comprehension."""
        yield self
        for c in self.children():
            yield from c.walk()

    def __str__(self) -> str:
        from einfuse.ir.text_print import format_expr

        return format_expr(self)


@dataclass(frozen=True, slots=True)
class Var(Expr):
    """A rank variable; as a map value it is the index itself (for masks)."""

    rank: str


@dataclass(frozen=True, slots=True)
class Size(Expr):
    """The size of a rank (FuseMax writes it upper-case: ``M0`` is the size of ``m0``)."""

    rank: str


@dataclass(frozen=True, slots=True)
class Const(Expr):
    value: int | float


@dataclass(frozen=True, slots=True)
class Access(Expr):
    tensor: str
    indices: tuple[Expr, ...]

    def children(self) -> tuple[Expr, ...]:
        return self.indices


@dataclass(frozen=True, slots=True)
class Op(Expr):
    op: str
    args: tuple[Expr, ...]

    def children(self) -> tuple[Expr, ...]:
        return self.args


def call(op: str, *args: Expr) -> Op:
    return Op(op, tuple(args))


def accesses(expr: Expr) -> list[Access]:
    """Tensor reads in order of appearance (index expressions never read tensors)."""
    return [e for e in expr.walk() if isinstance(e, Access)]


def rank_vars(expr: Expr) -> list[str]:
    """Rank variables in order of first appearance, whether used as index or as value."""
    seen: dict[str, None] = {}
    for e in expr.walk():
        if isinstance(e, Var):
            seen.setdefault(e.rank)
    return list(seen)


def size_refs(expr: Expr) -> set[str]:
    return {e.rank for e in expr.walk() if isinstance(e, Size)}


def is_index_expr(expr: Expr) -> bool:
    """Index expressions are affine (ranks, sizes and integers under ``+``, ``-`` and ``*``),
    with integer ``/`` (floor) and ``mod`` for ring reads and for reading a gathered
    ``G[z, t0]`` as ``G[t/T0, mod(t, T0)]``."""
    for e in expr.walk():
        if isinstance(e, Access):
            return False
        if isinstance(e, Const) and not isinstance(e.value, int):
            return False
        if isinstance(e, Op) and e.op not in ("add", "sub", "mul", "div", "mod"):
            return False
    return True


def shifted_rank(index: Expr) -> tuple[str, int] | None:
    """``(r, k)`` for an index of the form ``r + k`` (k may be 0), else None."""
    if isinstance(index, Var):
        return index.rank, 0
    if (
        isinstance(index, Op)
        and index.op in ("add", "sub")
        and isinstance(index.args[0], Var)
        and isinstance(index.args[1], Const)
        and isinstance(index.args[1].value, int)
    ):
        k = index.args[1].value
        return index.args[0].rank, k if index.op == "add" else -k
    return None


def substitute(expr: Expr, fn: Callable[[Expr], Expr | None]) -> Expr:
    """Rebuild ``expr`` bottom-up, replacing every node for which ``fn`` returns a new node."""
    new = fn(expr)
    if new is not None:
        return new
    if isinstance(expr, Access):
        return Access(expr.tensor, tuple(substitute(i, fn) for i in expr.indices))
    if isinstance(expr, Op):
        return Op(expr.op, tuple(substitute(a, fn) for a in expr.args))
    return expr


def rename_ranks(expr: Expr, mapping: dict[str, Expr]) -> Expr:
    """Replace rank variables by expressions (``m -> m1*M0+m0``), sizes untouched."""

    def repl(e: Expr) -> Expr | None:
        return mapping.get(e.rank) if isinstance(e, Var) else None

    return substitute(expr, repl)


def rename_tensors(expr: Expr, mapping: dict[str, str]) -> Expr:
    def repl(e: Expr) -> Expr | None:
        if isinstance(e, Access) and e.tensor in mapping:
            return Access(mapping[e.tensor], tuple(rename_tensors(i, mapping) for i in e.indices))
        return None

    return substitute(expr, repl)
