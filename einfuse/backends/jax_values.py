"""One Einsum's map expression as JAX nodes over arrays laid out in a canonical rank order.

Every intermediate is a ``Val``: a node plus the ranks of its axes, always a subsequence of
the lowering's canonical order, so two values broadcast by inserting ``None`` axes and never
by transposing. Rank values are ``lax.broadcasted_iota``; comparisons stay boolean until
arithmetic needs a number; accesses become static slices, zero padding and reshapes when the
index is ``outer*INNER + inner`` (mixed radix), and a zero-filled gather otherwise. Each
materialized value is checked against a size limit, so nothing silently builds a tensor far
larger than the Einsum's operands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from einfuse.backends.jax_device_view import DeviceView
from einfuse.backends.jax_ops import Lit, Node, Ref, call
from einfuse.ir.errors import EinfuseError
from einfuse.ir.expr import CAST_OPS, Access, Const, Expr, Op, Size, Var, rank_vars

INT32 = np.dtype(np.int32)
# Ops that keep integers integral (rank arithmetic in masks stays exact in bfloat16).
INT_CLOSED = frozenset({"add", "sub", "mul", "neg", "max", "min", "abs", "sign"})
COMPARE = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
LOGIC = frozenset({"and", "or", "not"})


def canonical_dtype(dtype: Any) -> np.dtype:
    """The dtype JAX will really use (float64 is float32 unless x64 is enabled)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(dtype)))


class BackendUnsupported(EinfuseError, NotImplementedError):
    """The backend refuses an Einsum it could only run by materializing a huge tensor."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A stored tensor as the emitted code sees it: concrete shape and dtype.

    ``statistic`` marks softmax-style statistics (reductions that are not contractions,
    recurrences, and maps of statistics only), which ``accumulate_dtype`` keeps upcast.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    statistic: bool = False


@dataclass(frozen=True, slots=True)
class Val:
    """A lowered value: ``node``'s axes are ``ranks``; ``dtype`` None means a Python scalar."""

    node: Node
    ranks: tuple[str, ...]
    kind: str  # "bool" | "int" | "float"
    dtype: np.dtype | None


@dataclass(frozen=True, slots=True)
class _Window:
    """Positions ``start .. start+length`` of one dim, reshaped into ``ranks`` (outer first)."""

    start: int
    length: int
    ranks: tuple[str, ...]
    offset: Expr | None = None  # a device-only offset added to start (a dynamic slice)


@dataclass(frozen=True, slots=True)
class ExprLowering:
    """Lowers expressions of the Einsum writing ``output`` over ranks ordered as ``canonical``.

    ``leaves`` maps subtrees to values lowered elsewhere (a scan's carried state).
    """

    output: str
    sizes: Mapping[str, int]
    tensors: Mapping[str, TensorInfo]
    canonical: tuple[str, ...]
    compute_dtype: np.dtype
    limit: float
    leaves: Mapping[Expr, Val] = field(default_factory=dict)
    device: DeviceView | None = None

    def over(
        self, canonical: tuple[str, ...], leaves: Mapping[Expr, Val] | None = None
    ) -> ExprLowering:
        """The same Einsum lowered over another rank order (and pre-lowered subtrees)."""
        return replace(self, canonical=canonical, leaves=leaves or {})

    # -- sizes and the guard -------------------------------------------------
    def elements(self, ranks: tuple[str, ...]) -> int:
        return math.prod(self.sizes[r] for r in ranks)

    def check(self, ranks: tuple[str, ...], what: object) -> None:
        n = self.elements(ranks)
        if n > self.limit:
            dims = " x ".join(f"{r}={self.sizes[r]}" for r in ranks)
            raise BackendUnsupported(
                f"einsum {self.output}: evaluating {what} elementwise would materialize "
                f"{dims} = {n} elements, more than the limit {int(self.limit)} (max_blowup "
                "times its largest operand or output); only sums of products go to "
                "jnp.einsum without that. Split the Einsum, or raise max_blowup to allow it"
            )

    # -- expressions ---------------------------------------------------------
    def lower(self, expr: Expr) -> Val:
        if expr in self.leaves:
            return self.leaves[expr]
        if isinstance(expr, Var):
            r = self._rank(expr.rank)
            iota = call("iota", dtype=INT32, shape=(self.sizes[r],), dimension=0)
            if self.device is not None and r in self.device.local:
                iota = call("add", iota, Ref(self.device.local[r]))
            return Val(iota, (r,), "int", INT32)
        if isinstance(expr, Size):
            count = self.device.counts.get(expr.rank) if self.device is not None else None
            return Val(Lit(count or self.sizes[expr.rank]), (), "int", None)
        if isinstance(expr, Const):
            return Val(Lit(expr.value), (), "int" if isinstance(expr.value, int) else "float", None)
        if isinstance(expr, Access):
            return self.access(expr)
        assert isinstance(expr, Op)
        return self.apply(expr.op, [self.lower(a) for a in expr.args], expr)

    def index(self, expr: Expr) -> Val:
        """An index expression: integer arithmetic, where ``/`` floors and ``mod`` is integral."""
        if isinstance(expr, Op) and expr.op in ("div", "mod"):
            args = [self.as_int(self.index(x)) for x in expr.args]
            op = "floor_divide" if expr.op == "div" else "mod"
            return self._combine(op, args, "int", args, expr)
        if isinstance(expr, Op):
            return self.apply(expr.op, [self.index(x) for x in expr.args], expr)
        return self.lower(expr)

    def apply(self, op: str, args: list[Val], what: object = None) -> Val:
        """``op`` on lowered operands, converting kinds as the IR's semantics need."""
        what = what if what is not None else op
        if op in CAST_OPS:
            return self.cast(args[0], canonical_dtype(op))
        if op == "where":
            cond = self.as_bool(args[0])
            a, b = self._unify(args[1:])
            return self._combine(op, [cond, a, b], a.kind, [a, b], what)
        if op in LOGIC:
            return self._combine(op, [self.as_bool(a) for a in args], "bool", [], what)
        if op in COMPARE or op in INT_CLOSED:
            args = self._unify(args)
            kind = "bool" if op in COMPARE else args[0].kind
            return self._combine(op, args, kind, args, what)
        args = [self.as_float(a) for a in args]
        return self._combine(op, args, "float", args, what)

    def _unify(self, args: list[Val]) -> list[Val]:
        """All integers (rank arithmetic stays exact) unless some operand is a float."""
        if all(a.kind != "float" for a in args):
            return [self.as_int(a) for a in args]
        return [self.as_float(a) for a in args]

    def _combine(self, op: str, args: list[Val], kind: str, typed: list[Val], what: object) -> Val:
        present = {r for a in args for r in a.ranks}
        ranks = tuple(r for r in self.canonical if r in present)
        if len(ranks) != len(present):
            raise AssertionError(f"ranks {present} outside the canonical order {self.canonical}")
        self.check(ranks, what)
        nodes = [self.align(a, ranks) for a in args]
        if kind == "bool":
            dtype: np.dtype | None = np.dtype(np.bool_)
        else:
            dtypes = [a.dtype for a in typed if a.dtype is not None]
            dtype = np.dtype(jnp.result_type(*dtypes)) if dtypes else None
        return Val(call(op, *nodes), ranks, kind, dtype)

    def as_float(self, v: Val) -> Val:
        if v.kind == "float":
            return v
        if isinstance(v.node, Lit) and v.kind == "int":  # stays a weakly typed Python scalar
            return Val(Lit(float(v.node.value)), v.ranks, "float", None)
        return Val(
            call("astype", v.node, dtype=self.compute_dtype), v.ranks, "float", self.compute_dtype
        )

    def cast(self, v: Val, dtype: np.dtype) -> Val:
        """``v`` rounded to ``dtype`` (a no-op where it already is)."""
        v = self.as_float(v)
        if v.dtype == dtype:
            return v
        return Val(call("astype", v.node, dtype=dtype), v.ranks, "float", dtype)

    def as_int(self, v: Val) -> Val:
        if v.kind == "int":
            return v
        assert v.kind == "bool", v
        return Val(call("astype", v.node, dtype=INT32), v.ranks, "int", INT32)

    def as_bool(self, v: Val) -> Val:
        if v.kind == "bool":
            return v
        return self._combine("ne", [v, Val(Lit(0), (), "int", None)], "bool", [], "!= 0")

    def align(self, v: Val, target: tuple[str, ...], full: bool = False) -> Node:
        """``v``'s node with ``None`` axes so it broadcasts against ``target``'s layout."""
        if not v.ranks:
            return v.node
        start = 0 if full else target.index(v.ranks[0])
        index = tuple(slice(None) if r in v.ranks else None for r in target[start:])
        return v.node if None not in index else call("index", v.node, index=index)

    def _rank(self, r: str) -> str:
        if r not in self.canonical:
            raise EinfuseError(
                f"einsum {self.output}: rank {r} is used where it has no value "
                f"(only {', '.join(self.canonical) or 'no rank'} do)"
            )
        return r

    # -- accesses ------------------------------------------------------------
    def _merged(self, a: Access) -> tuple[tuple[Expr, ...], tuple[int, ...], frozenset[int]]:
        """``a``'s indices, extents and device dims, where each pair ``T[i/C, mod(i, C)]``
        over dims of extents (E, C) reads as one dim of extent E*C (a reshape, not a gather:
        how a gathered tensor reads back as one dim)."""
        idx, shape = list(a.indices), list(self.tensors[a.tensor].shape)
        dev = self.device
        dims = set(dev.dims.get(a.tensor, frozenset())) if dev is not None else set()
        d = 0
        while d < len(idx) - 1:
            i = _split_pair(idx[d], idx[d + 1], shape[d + 1], self.sizes)
            if i is not None and not {d, d + 1} & dims:
                idx[d : d + 2], shape[d : d + 2] = [i], [shape[d] * shape[d + 1]]
                dims = {x - 1 if x > d else x for x in dims}
            d += 1
        return tuple(idx), tuple(shape), frozenset(dims)

    def _plans(self, a: Access) -> list[int | _Window] | None:
        """Per (merged) dim of ``a``: a fixed position or a window of ranks; None if it
        needs a gather."""
        plans: list[int | _Window] = []
        indices, shape, device_dims = self._merged(a)
        for d, (index, extent) in enumerate(zip(indices, shape)):
            if self.device is not None and d not in device_dims and self.device.in_index(index):
                plan = self._dynamic_plan(index, extent)  # else a gather
            else:
                plan = self._dim_plan(index, extent)
            if plan is None:
                return None
            plans.append(plan)
        ranks = [r for p in plans if isinstance(p, _Window) for r in p.ranks]
        return plans if len(set(ranks)) == len(ranks) else None  # None: a diagonal, A[m, m]

    def _dynamic_plan(self, index: Expr, extent: int) -> _Window | None:
        """A window of plain ranks at this device's offset, in range on every device."""
        assert self.device is not None
        parts = self.device.split(index)
        plan = None if parts is None else self._dim_plan(parts[0], extent)
        if parts is None or plan is None:
            return None
        window = plan if isinstance(plan, _Window) else _Window(plan, 1, ())
        starts = [window.start + k for k in self.device.offsets(parts[1], self.sizes)]
        if min(starts) < 0 or max(starts) + window.length > extent:
            return None
        return replace(window, offset=parts[1])

    def stored_ranks(self, a: Access) -> tuple[str, ...] | None:
        """The ranks of ``a`` in the order its tensor stores them (None: read by a gather)."""
        plans = self._plans(a)
        if plans is None:
            return None
        return tuple(r for p in plans if isinstance(p, _Window) for r in p.ranks)

    def access(self, a: Access) -> Val:
        """``T[idx...]``: static slicing, zero padding and reshapes, else a gather."""
        info = self.tensors[a.tensor]
        plans = self._plans(a)
        if plans is None:
            return self.gather(a)
        ranks = [r for p in plans if isinstance(p, _Window) for r in p.ranks]
        for r in ranks:
            self._rank(r)
        node: Node = Ref(a.tensor)
        shape = self._merged(a)[1]
        if shape != info.shape:
            node = call("reshape", node, shape=shape)
        items: list[Any] = []
        pads: list[tuple[int, int]] = []
        for d, (plan, extent) in enumerate(zip(plans, shape)):
            if isinstance(plan, int):
                items.append(plan)
                continue
            if plan.offset is not None:
                node = self._dynamic_slice(node, plan, d)
                items.append(slice(None))
                pads.append((0, 0))
                continue
            lo, hi = max(plan.start, 0), min(plan.start + plan.length, extent)
            if hi <= lo:  # entirely outside: all zeros
                lo = hi = 0
                pad = (0, plan.length)
            else:
                pad = (lo - plan.start, plan.start + plan.length - hi)
            items.append(slice(None) if (lo, hi) == (0, extent) else slice(lo, hi))
            pads.append(pad)
        if any(it != slice(None) for it in items):
            node = call("index", node, index=tuple(items))
        if any(p != (0, 0) for p in pads):
            node = call("pad", node, pad_width=tuple(pads))
        windows = [p for p in plans if isinstance(p, _Window)]
        split = tuple(self.sizes[r] for w in windows for r in w.ranks)
        if split != tuple(w.length for w in windows):
            node = call("reshape", node, shape=split)
        order = tuple(r for r in self.canonical if r in ranks)
        if order != tuple(ranks):
            node = call("transpose", node, axes=tuple(ranks.index(r) for r in order))
        self.check(order, a)
        return Val(node, order, _kind(info.dtype), info.dtype)

    def _dynamic_slice(self, node: Node, plan: _Window, dim: int) -> Node:
        assert plan.offset is not None
        offset = self.over(tuple(self.device.local) if self.device else ()).index(plan.offset)
        start = call("index", offset.node, index=(0,) * len(offset.ranks))
        if plan.start:
            start = call("add", start, Lit(plan.start))
        return call("dynamic_slice_in_dim", node, start, slice_size=plan.length, axis=dim)

    def _dim_plan(self, index: Expr, extent: int) -> int | _Window | None:
        lin = linearize(index, self.sizes)
        if lin is None:
            return None
        coeffs, start = lin
        if not coeffs:
            return start if 0 <= start < extent else _Window(start, 1, ())
        order = sorted(coeffs, key=lambda r: (coeffs[r], self.sizes[r]))  # size-1 ranks first
        length = 1
        for r in order:  # mixed radix: each coefficient is the product of the inner sizes
            if coeffs[r] != length:
                return None
            length *= self.sizes[r]
        return _Window(start, length, tuple(reversed(order)))

    def gather(self, a: Access) -> Val:
        """The general affine (or not) read: integer index arrays, zero outside the extent."""
        used = {r for i in a.indices for r in rank_vars(i)}
        ranks = tuple(r for r in self.canonical if r in used)
        for r in used:
            self._rank(r)
        self.check(ranks, a)
        plain = self.over(self.canonical)
        at_block = replace(plain, device=None)  # a device dim's local block starts at 0
        dims = self.device.dims.get(a.tensor, frozenset()) if self.device else frozenset()
        indices = [
            plain.align((at_block if d in dims else plain).index(i), ranks, full=True)
            for d, i in enumerate(a.indices)
        ]
        info = self.tensors[a.tensor]
        node = call("gather_or_zero", Ref(a.tensor), *indices)
        return Val(node, ranks, _kind(info.dtype), info.dtype)


def _split_pair(outer: Expr, inner: Expr, extent: int, sizes: Mapping[str, int]) -> Expr | None:
    """``i`` when ``outer, inner`` are ``i/C, mod(i, C)`` with C the inner dim's extent."""
    if not (isinstance(outer, Op) and isinstance(inner, Op)):
        return None
    if (outer.op, inner.op) != ("div", "mod") or outer.args != inner.args:
        return None
    i, c = outer.args
    value = c.value if isinstance(c, Const) else sizes.get(c.rank) if isinstance(c, Size) else None
    return i if value == extent else None


def _kind(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.bool_):
        return "bool"
    return "int" if np.issubdtype(dtype, np.integer) else "float"


def linearize(expr: Expr, sizes: Mapping[str, int]) -> tuple[dict[str, int], int] | None:
    """``expr`` as ``sum(c_r * r) + k`` with integer coefficients, or None if not affine."""
    if isinstance(expr, Var):
        return {expr.rank: 1}, 0
    if isinstance(expr, Size):
        return {}, sizes[expr.rank]
    if isinstance(expr, Const) and isinstance(expr.value, int):
        return {}, expr.value
    if not (isinstance(expr, Op) and expr.op in ("add", "sub", "mul")):
        return None
    parts = [linearize(x, sizes) for x in expr.args]
    if parts[0] is None or parts[1] is None:
        return None
    (ca, ka), (cb, kb) = parts
    if expr.op == "mul":
        if ca and cb:
            return None
        (coeffs, k), scale = ((ca, ka), kb) if not cb else ((cb, kb), ka)
        out = {r: c * scale for r, c in coeffs.items()}
        return {r: c for r, c in out.items() if c}, k * scale
    sign = 1 if expr.op == "add" else -1
    out = dict(ca)
    for r, c in cb.items():
        out[r] = out.get(r, 0) + sign * c
    return {r: c for r, c in out.items() if c}, ka + sign * kb
