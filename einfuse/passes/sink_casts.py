"""Sink widening casts to the reads they widen: ``float32(where(c, s / 8, fill))`` becomes
``where(c, float32(s) / 8, fill)``.

Model code computes scores in bfloat16, masks them, and casts them up for a float32 softmax;
the lifter keeps that cast where JAX had it, around the mask. Moved onto the reads, the mask
is again the root of the score expression, where ``fuse`` and the blockwise loop recognize it
(and the scale again a constant scale of a read). Exact in the reference's model: a widening
cast rounds nothing, and float32 arithmetic stands for exact arithmetic there; a backend
computes the sunk arithmetic in the wider dtype, which only adds precision.
"""

from __future__ import annotations

from collections.abc import Callable

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.dtypes import cast, expr_dtype, promote, round_constant, tensor_dtypes
from einfuse.ir.expr import CAST_OPS, Const, Expr, Op
from einfuse.passes.manager import register_pass

# Ops a cast distributes over exactly (in exact arithmetic): arithmetic and selection.
_THROUGH = frozenset({"add", "sub", "mul", "div", "neg", "max", "min", "where"})


@register_pass("sink-casts")
def sink_casts(c: Cascade) -> Cascade:
    """Move every widening cast over arithmetic and ``where`` down to the values it widens."""
    dtypes = tensor_dtypes(c)
    out = [_sunk(e, dtypes) for e in c.einsums]
    return c if out == list(c.einsums) else c.with_einsums(out)


def _sunk(e: Einsum, dtypes: dict[str, str]) -> Einsum:
    def lookup(name: str) -> str | None:
        return None if name == e.output else dtypes.get(name)

    expr = _sink(e.expr, lookup)
    if expr == e.expr or expr_dtype(expr, lookup) != expr_dtype(e.expr, lookup):
        return e  # a tensor keeps its dtype: a cast the Einsum's own dtype rests on stays
    return Einsum(e.output, e.indices, expr, e.reduce, e.init, e.loc)


DtypeOf = Callable[[str], str | None]


def _sink(x: Expr, dtype_of: DtypeOf) -> Expr:
    if not isinstance(x, Op):
        return x
    args = tuple(_sink(a, dtype_of) for a in x.args)
    if x.op == "where":  # a fill cast to the scores' dtype (bfloat16(-inf)): that constant
        args = (args[0], *(_folded(a) for a in args[1:]))
    if x.op not in CAST_OPS:
        return Op(x.op, args)
    (inner,) = args
    if _constant_select(inner):  # a mask bias where(c, 0, fill): its two constants, rounded
        cond, a, b = inner.args  # type: ignore[union-attr]
        return Op("where", (cond, _folded(cast(x.op, a)), _folded(cast(x.op, b))))
    got = expr_dtype(inner, dtype_of)
    if got is None or got == x.op:
        return inner if got == x.op else Op(x.op, args)
    widening = promote(got, x.op) == x.op
    if not (widening and isinstance(inner, Op) and inner.op in _THROUGH):
        return Op(x.op, args)
    start = 1 if inner.op == "where" else 0  # the condition stays as it is
    moved = [
        a if k < start or expr_dtype(a, dtype_of) is None else _sink(cast(x.op, a), dtype_of)
        for k, a in enumerate(inner.args)
    ]
    return Op(inner.op, tuple(moved))


def _folded(x: Expr) -> Expr:
    """A cast constant as the constant it rounds to. Only for a ``where`` branch: the other
    branch (or what the ``where`` meets) fixes the dtype, so weak is the same value there."""
    if isinstance(x, Op) and x.op in CAST_OPS and isinstance(x.args[0], Const):
        return Const(round_constant(x.args[0].value, x.op))
    return x


def _constant_select(x: Expr) -> bool:
    """``where(c, k1, k2)`` with constant branches (a mask's bias, before it is cast)."""
    return isinstance(x, Op) and x.op == "where" and all(isinstance(a, Const) for a in x.args[1:])
