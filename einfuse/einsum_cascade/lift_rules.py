"""Per-primitive lifting rules: which JAX equations become Einsums, views or inlined expressions.

A rule is data: ``check(eqn)`` decides statically (from params, avals and literals) whether
the equation lifts, and ``lift(builder, eqn)`` defines its outputs. Anything without a rule,
or whose check fails, stays an opaque equation that the backend binds unchanged, so the
rules only need to be right, not complete. Checks refuse what the IR cannot say exactly:
integer division, non-default matmul precision, strided slices, reshapes that merge dims.
Casts between float dtypes lift as the IR's cast operators (``float32(x)``), and every
lifted expression is cast where the IR's dtype rule (``einfuse.ir.dtypes``) would give
another dtype than JAX's, so a mixed-precision program lifts as one region.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jax._src import core

from einfuse.einsum_cascade.lift_flatten import FlatEqn, literal_value
from einfuse.einsum_cascade.lift_region import Index, RegionBuilder, Value
from einfuse.einsum_cascade.lift_views import (
    alias,
    broadcast,
    out_shape,
    reshape,
    reshape_ok,
    slice_ok,
    slice_view,
    squeeze,
    transpose,
)
from einfuse.ir.dtypes import FLOAT_DTYPES, cast, promote
from einfuse.ir.expr import Const, Expr, Op, Var, rank_vars


@dataclass(frozen=True, slots=True)
class Rule:
    check: Callable[[FlatEqn], bool]
    lift: Callable[[RegionBuilder, FlatEqn], None]
    view: Callable[[FlatEqn], bool] = lambda e: False
    elementwise: bool = False


@functools.cache
def _kind_of(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "bool"
    if jnp.issubdtype(dtype, jnp.integer):
        return "int"
    # float8 and other exotic floats have no cast operator in the IR: they stay with JAX.
    return "float" if np.dtype(dtype).name in FLOAT_DTYPES else "other"


def kind(dtype: object) -> str:
    """``float`` (bfloat16 too), ``int``, ``bool`` or ``other`` (complex and others never lift)."""
    return _kind_of(np.dtype(dtype))  # type: ignore[call-overload]


def _in_kinds(e: FlatEqn) -> list[str]:
    return [kind(a.dtype) for a in e.in_avals()]


def _common_ok(e: FlatEqn) -> bool:
    """Shapes the IR can name (no zero-size dims) and literals it can print (no NaN)."""
    for aval in [*e.in_avals(), *e.out_avals()]:
        if not hasattr(aval, "shape") or any(int(n) == 0 for n in aval.shape):
            return False
    for a in e.invars:
        if isinstance(a, core.Literal):
            if np.ndim(a.val) != 0:
                return False
            v = literal_value(a)
            if isinstance(v, float) and math.isnan(v):
                return False
            if isinstance(v, int) and not -(2**31) <= v < 2**31:
                return False  # the backend's rank values are int32
    return True


def liftable(e: FlatEqn) -> bool:
    rule = RULES.get(e.primitive)
    if rule is None or not _common_ok(e):
        return False
    return rule.check(e) and (not rule.elementwise or _elementwise_ok(e))


def is_view(e: FlatEqn) -> bool:
    """A view defines its output as an index map of its first operand: no compute, no use."""
    rule = RULES.get(e.primitive)
    return rule is not None and rule.view(e) and isinstance(e.invars[0], int)


# --------------------------------------------------------------------------- elementwise
def _pending(b: RegionBuilder, e: FlatEqn, make: Callable[[list[Expr]], Expr]) -> None:
    """Define the output as ``make(operand exprs)``; size-1 and rank-0 operands broadcast."""
    vals = [b.read(a) for a in e.invars]
    shape = out_shape(e)
    ranks = []
    for d, n in enumerate(shape):
        ranks.append(
            next((v.ranks[d] for v in vals if v.ndim and v.shape[d] == n and v.ranks[d]), None)
        )

    def at(v: Value, idx: Index) -> Index:
        if not v.ndim:
            return ()
        return tuple(Const(0) if v.shape[d] != n else i for d, (i, n) in enumerate(zip(idx, shape)))

    out_dtype = np.dtype(e.out_avals()[0].dtype)

    def build(idx: Index) -> Expr:
        expr = simplify(make([b.expr(v, at(v, idx)) for v in vals]), kind(out_dtype))
        return b.typed(expr, out_dtype.name, weak_ok=True) if kind(out_dtype) == "float" else expr

    b.pending(e.outvars[0], e, build, ranks, vals)


def _elementwise_ok(e: FlatEqn) -> bool:
    """Operands of the output's rank (size-1 dims broadcast) or rank 0."""
    shape = out_shape(e)
    for aval in e.in_avals():
        s = tuple(int(n) for n in aval.shape)
        if s and (len(s) != len(shape) or any(a not in (1, n) for a, n in zip(s, shape))):
            return False
    return True


def simplify(expr: Expr, out_kind: str) -> Expr:
    """Exact identities that keep the lifted text close to what the user wrote.

    ``max(x, -inf)`` and ``min(x, inf)`` are ``x`` (NaN propagates either way); integer
    ``x + 0`` is ``x``; a boolean ``where(p, 1, 0)`` is ``p`` and ``where(p, 0, 1)`` is ``not p``.
    """
    if not isinstance(expr, Op):
        return expr
    a = expr.args
    if expr.op in ("max", "min"):
        neutral = -math.inf if expr.op == "max" else math.inf
        for x, y in ((a[0], a[1]), (a[1], a[0])):
            if isinstance(y, Const) and y.value == neutral:
                return x
    if expr.op in ("add", "sub") and out_kind == "int" and a[1] == Const(0):
        return a[0]
    if expr.op == "where" and out_kind == "bool":
        if a[1] == Const(1) and a[2] == Const(0):
            return a[0]
        if a[1] == Const(0) and a[2] == Const(1):
            return Op("not", (a[0],))
    return expr


def _reused(b: RegionBuilder, e: FlatEqn) -> None:
    """Store a costly pending operand that an expression reads more than once."""
    for a in e.invars:
        v = b.read(a)
        if v.base.tensor is None and not v.base.cheap:
            b.materialize(v.base)


def _op(name: str) -> Callable[[list[Expr]], Expr]:
    return lambda args: Op(name, tuple(args))


def _all_kinds(allowed: set[str]) -> Callable[[FlatEqn], bool]:
    def check(e: FlatEqn) -> bool:
        ks = _in_kinds(e)
        no_flags = all(e.params.get(p) is None for p in ("accuracy", "out_dtype"))
        return no_flags and len(set(ks)) == 1 and ks[0] in allowed

    return check


def _elementwise(op: str, allowed: set[str]) -> Rule:
    return Rule(_all_kinds(allowed), lambda b, e: _pending(b, e, _op(op)), elementwise=True)


def _integer_pow(b: RegionBuilder, e: FlatEqn) -> None:
    """Square-and-multiply in lax's own order, so rounding matches ``lax.integer_pow``."""
    y = int(e.params["y"])
    one = Const(1.0) if kind(e.in_avals()[0].dtype) == "float" else Const(1)
    if abs(y) > 1:
        _reused(b, e)

    def make(args: list[Expr]) -> Expr:
        x, n = args[0], abs(y)
        acc: Expr | None = None
        while n > 0:
            if n & 1:
                acc = x if acc is None else Op("mul", (acc, x))
            n >>= 1
            if n:
                x = Op("mul", (x, x))
        result = acc if acc is not None else one
        return Op("div", (one, result)) if y < 0 else result

    _pending(b, e, make)


def _integer_pow_ok(e: FlatEqn) -> bool:
    k = _in_kinds(e)[0]
    return k == "float" or (k == "int" and int(e.params["y"]) >= 0)


def _square(b: RegionBuilder, e: FlatEqn) -> None:
    _reused(b, e)
    _pending(b, e, lambda a: Op("mul", (a[0], a[0])))


def _select_n_ok(e: FlatEqn) -> bool:
    ks = _in_kinds(e)
    return len(ks) == 3 and ks[0] == "bool" and ks[1] == ks[2] and ks[1] != "other"


def _select_n(b: RegionBuilder, e: FlatEqn) -> None:
    _pending(b, e, lambda a: Op("where", (a[0], a[2], a[1])))


def _clamp(b: RegionBuilder, e: FlatEqn) -> None:
    _pending(b, e, lambda a: Op("min", (Op("max", (a[1], a[0])), a[2])))


def _compare_ok(e: FlatEqn) -> bool:
    ks = _in_kinds(e)
    allowed = {"float", "int", "bool"} if e.primitive in ("eq", "ne") else {"float", "int"}
    return ks[0] == ks[1] and ks[0] in allowed


# --------------------------------------------------------------------------- conversions
def _convert_view(e: FlatEqn) -> bool:
    return np.dtype(e.params["new_dtype"]) == np.dtype(e.in_avals()[0].dtype)


def _convert_ok(e: FlatEqn) -> bool:
    src, dst = kind(e.in_avals()[0].dtype), kind(e.params["new_dtype"])
    if e.params.get("sharding") is not None:
        return False
    return (
        _convert_view(e)
        or (src == "bool" and dst in ("float", "int"))
        or (src in ("float", "int") and dst == "bool")
        or (src == "int" and dst == "float")
        or (src == "float" and dst == "float")
    )


def _convert(b: RegionBuilder, e: FlatEqn) -> None:
    if _convert_view(e):
        alias(b, e)
        return
    src, dst = kind(e.in_avals()[0].dtype), kind(e.params["new_dtype"])
    if dst == "float" and src in ("int", "float"):
        new = np.dtype(e.params["new_dtype"]).name
        _pending(b, e, lambda a: cast(new, a[0]))
    elif src == "bool":
        one, zero = (Const(1.0), Const(0.0)) if dst == "float" else (Const(1), Const(0))
        _pending(b, e, lambda a: Op("where", (a[0], one, zero)))
    else:
        zero = Const(0.0) if src == "float" else Const(0)
        _pending(b, e, lambda a: Op("ne", (a[0], zero)))


def _iota_ok(e: FlatEqn) -> bool:
    return np.dtype(e.params["dtype"]) == np.int32 and e.params.get("sharding") is None


def _iota(b: RegionBuilder, e: FlatEqn) -> None:
    dim = int(e.params["dimension"])
    b.pending(e.outvars[0], e, lambda idx: idx[dim], [None] * len(out_shape(e)))


# --------------------------------------------------------------------------- contractions
def _dot_ok(e: FlatEqn) -> bool:
    lhs, rhs = e.in_avals()
    out = e.out_avals()[0]
    pref = e.params.get("preferred_element_type")
    precision = e.params.get("precision")
    default = precision is None or all(
        p is None or str(p).endswith("DEFAULT")
        for p in (precision if isinstance(precision, tuple) else (precision,))
    )
    return (
        kind(out.dtype) == kind(lhs.dtype) == kind(rhs.dtype) == "float"
        and (pref is None or np.dtype(pref) == np.dtype(out.dtype))
        and default
        and e.params.get("out_sharding") is None
    )


def _dot(b: RegionBuilder, e: FlatEqn) -> None:
    """``dot_general`` as ``OUT[batch, lhs free, rhs free] = L[...] * R[...]``."""
    lhs, rhs = (b.read(a) for a in e.invars)
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    lc, rc, lb, rb = ([int(d) for d in x] for x in (lc, rc, lb, rb))
    lfree = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rfree = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    pref = [lhs.ranks[dl] or rhs.ranks[dr] for dl, dr in zip(lb, rb)]
    pref += [lhs.ranks[d] for d in lfree] + [rhs.ranks[d] for d in rfree]
    out = b.choose_ranks(pref, out_shape(e))
    con = b.choose_ranks(
        [lhs.ranks[dl] or rhs.ranks[dr] for dl, dr in zip(lc, rc)],
        [lhs.shape[d] for d in lc],
        taken=out,
    )
    li: list[Expr] = [Const(0)] * lhs.ndim
    ri: list[Expr] = [Const(0)] * rhs.ndim
    for k, (dl, dr) in enumerate(zip(lb, rb)):
        li[dl] = ri[dr] = Var(out[k])
    for k, d in enumerate(lfree):
        li[d] = Var(out[len(lb) + k])
    for k, d in enumerate(rfree):
        ri[d] = Var(out[len(lb) + len(lfree) + k])
    for k, (dl, dr) in enumerate(zip(lc, rc)):
        li[dl] = ri[dr] = Var(con[k])
    left, right = b.access(lhs, tuple(li)), b.access(rhs, tuple(ri))
    read = set(rank_vars(left)) | set(rank_vars(right))
    if any(r not in read for r in con):  # both operands broadcast along a contracted dim
        left = b.access_all(lhs, tuple(li))
    # A wider result than the operands (``preferred_element_type=float32`` on bfloat16) is
    # the product of the operands cast up: exact, and what the backends emit as that dot.
    want = np.dtype(e.out_avals()[0].dtype).name

    def widened(x: Expr) -> Expr:
        got = b.dtype_of(x)
        return cast(want, x) if got != want and promote(got, want) == want else x

    expr = Op("mul", (widened(left), widened(right)))
    idx = tuple(Var(r) for r in out)
    name = b.emit("DOT", idx, expr, e.source, dtype=np.dtype(want))
    b.stored(e.outvars[0], e, name, out)


_REDUCERS = {"reduce_sum": "sum", "reduce_max": "max", "reduce_min": "min", "reduce_prod": "prod"}


def _reduce_ok(e: FlatEqn) -> bool:
    return _in_kinds(e)[0] == "float" and e.params.get("out_sharding") is None


def _reduce(b: RegionBuilder, e: FlatEqn) -> None:
    v = b.read(e.invars[0])
    axes = sorted({int(a) % v.ndim for a in e.params["axes"]}) if v.ndim else []
    if not axes:
        alias(b, e)
        return
    keep = [d for d in range(v.ndim) if d not in axes]
    out = b.choose_ranks([v.ranks[d] for d in keep], out_shape(e))
    red = b.choose_ranks([v.ranks[d] for d in axes], [v.shape[d] for d in axes], taken=out)
    full: list[Expr] = [Const(0)] * v.ndim
    for d, r in zip(keep, out):
        full[d] = Var(r)
    for d, r in zip(axes, red):
        full[d] = Var(r)
    idx = tuple(Var(r) for r in out)
    read = b.access_all(v, tuple(full))
    dtype = np.dtype(e.out_avals()[0].dtype)
    name = b.emit(_hint_of(e), idx, read, e.source, _REDUCERS[e.primitive], dtype=dtype)
    b.stored(e.outvars[0], e, name, out)


def _hint_of(e: FlatEqn) -> str:
    return {"sum": "SUM", "max": "MAX", "min": "MIN", "prod": "PROD"}[_REDUCERS[e.primitive]]


# --------------------------------------------------------------------------- the table
def _always(e: FlatEqn) -> bool:
    return True


def _view_rule(check: Callable[[FlatEqn], bool], lift: Callable[..., None]) -> Rule:
    return Rule(check, lift, view=lambda e: True)


FLOAT, NUMERIC, BOOL = {"float"}, {"float", "int"}, {"bool"}
RULES: dict[str, Rule] = {
    **{op: _elementwise(op, FLOAT) for op in
       ("exp", "log", "tanh", "logistic", "sin", "cos", "sqrt", "rsqrt", "erf", "div", "pow")},
    **{op: _elementwise(op, NUMERIC) for op in
       ("neg", "abs", "sign", "add", "sub", "mul", "max", "min")},
    "add_any": _elementwise("add", NUMERIC),
    "not": _elementwise("not", BOOL),
    "and": _elementwise("and", BOOL),
    "or": _elementwise("or", BOOL),
    **{op: Rule(_compare_ok, lambda b, e, op=op: _pending(b, e, _op(op)), elementwise=True)
       for op in ("lt", "le", "gt", "ge", "eq", "ne")},
    "integer_pow": Rule(_integer_pow_ok, _integer_pow, elementwise=True),
    "square": Rule(_all_kinds(NUMERIC), _square, elementwise=True),
    "select_n": Rule(_select_n_ok, _select_n, elementwise=True),
    "clamp": Rule(_all_kinds(NUMERIC), _clamp, elementwise=True),
    "convert_element_type": Rule(_convert_ok, _convert, view=_convert_view, elementwise=True),
    "iota": Rule(_iota_ok, _iota),
    "stop_gradient": _view_rule(_always, alias),
    "copy": _view_rule(_always, alias),
    "copy_p": _view_rule(_always, alias),
    "broadcast_in_dim": _view_rule(lambda e: e.params.get("sharding") is None, broadcast),
    "transpose": _view_rule(_always, transpose),
    "squeeze": _view_rule(_always, squeeze),
    "reshape": _view_rule(reshape_ok, reshape),
    "slice": _view_rule(slice_ok, slice_view),
    "dot_general": Rule(_dot_ok, _dot),
    **{op: Rule(_reduce_ok, _reduce, view=lambda e: not e.params["axes"]) for op in _REDUCERS},
}  # fmt: skip
