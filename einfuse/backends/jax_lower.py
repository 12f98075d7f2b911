"""Einsum -> JAX statements: the decisions of the JAX backend, one Einsum at a time.

Four shapes of Einsum, four lowerings:

- a map (no reduced rank): the expression over the output ranks, as broadcasted jnp ops;
- a sum with reduced ranks: the expression is split into factors; factors without a reduced
  rank are multiplied (or divided) in after the contraction, the others go to ``jnp.einsum``
  (or to ``jnp.sum`` when there is just one), so no product over the full iteration space
  is ever built;
- a max/min/prod reduction: the map over its iteration space, then ``jnp.max`` etc.;
- a recurrence: ``lax.cumsum``/``cummax``/``cummin``/``cumprod`` for ``T[r+1] = T[r] op X``,
  else ``lax.scan`` carrying the state, with everything not reading the state hoisted out.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from einfuse.backends.jax_device_view import DeviceView
from einfuse.backends.jax_layout import choose_order
from einfuse.backends.jax_ops import Assign, Lit, Node, Ref, ScanLoop, Stmt, call
from einfuse.backends.jax_values import (
    BackendUnsupported,
    ExprLowering,
    TensorInfo,
    Val,
    canonical_dtype,
)
from einfuse.ir.cascade import Einsum
from einfuse.ir.expr import CAST_OPS, Access, Const, Expr, Op, accesses, rank_vars
from einfuse.ir.verify import recurrence_parts

CUMULATIVE = {"add": "cumsum", "max": "cummax", "min": "cummin", "mul": "cumprod"}


@dataclass(frozen=True, slots=True)
class Policy:
    """Dtype and safety choices shared by every Einsum of a cascade."""

    accumulate_dtype: np.dtype | None
    precision: Any
    max_blowup: float
    # Every dot of narrow floats accumulates in float32, rounded to its dtype after: what XLA
    # does inside a bf16 dot anyway, spelled out where a kernel compiler (Mosaic) wants it.
    wide_dots: bool = False
    # Inside a shard_map body: which device ranks are this device's index (jax_shard).
    device: DeviceView | None = None


class Names:
    """Fresh statement names that never shadow a tensor of the cascade."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = set(taken)

    def local(self) -> Names:
        """A scope whose names may repeat another scope's (a scan body's arguments)."""
        return Names(self.taken)

    def fresh(self, base: str) -> str:
        name, k = base, 2
        while name in self.taken:
            name, k = f"{base}{k}", k + 1
        self.taken.add(name)
        return name


def is_statistic(e: Einsum, tensors: Mapping[str, TensorInfo]) -> bool:
    """Reductions other than contractions, recurrences, and maps over statistics only.

    These are the small tensors (running maxima, sums, rescale factors) whose rounding
    matters most; contraction results and maps over them are the large ones.
    """
    if e.is_recurrence:
        return True
    if e.reduced_ranks:
        return e.reduce != "sum" or not _is_contraction(e.expr, set(e.reduced_ranks))
    return bool(e.inputs) and all(tensors[t].statistic for t in e.inputs)


def lower_einsum(
    e: Einsum,
    sizes: Mapping[str, int],
    tensors: Mapping[str, TensorInfo],
    policy: Policy,
    names: Names,
    dtype: np.dtype,
) -> tuple[list[Stmt], TensorInfo]:
    """Statements that assign ``e.output`` (of the IR's ``dtype``), and the tensor they store."""
    return _EinsumLowering(e, sizes, tensors, policy, names, dtype).run()


class _EinsumLowering:
    def __init__(
        self,
        e: Einsum,
        sizes: Mapping[str, int],
        tensors: Mapping[str, TensorInfo],
        policy: Policy,
        names: Names,
        dtype: np.dtype,
    ) -> None:
        self.e, self.sizes, self.policy, self.names = e, sizes, policy, names
        self.left = e.output_ranks
        shape = [sizes[r] for r in self.left]
        if e.iterative_dim is not None:
            shape[e.iterative_dim] += 1
        statistic = is_statistic(e, tensors)
        acc = policy.accumulate_dtype
        if statistic and acc is not None:
            dtype = np.dtype(jnp.promote_types(dtype, acc))
        self.out = TensorInfo(tuple(shape), dtype, statistic)
        operands = [math.prod(tensors[t].shape) for t in e.inputs]
        limit = policy.max_blowup * max([*operands, math.prod(shape), 1])
        tensors = {**tensors, e.output: self.out}
        self.lw = ExprLowering(e.output, sizes, tensors, (), dtype, limit, device=policy.device)

    def run(self) -> tuple[list[Stmt], TensorInfo]:
        e = self.e
        if e.is_recurrence:
            return self.recurrence(), self.out
        if e.reduced_ranks:
            val = self.reduced(e.expr)
        else:
            val = self.lw.over(self.canonical(e.expr)).lower(e.expr)
        node = self.finish(val, self.left, self.out.dtype)
        return [Assign(e.output, node)], self.out

    def canonical(self, expr: Expr, tail: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The ranks of ``expr`` and ``tail`` (default: the output's) in the order that
        transposes the fewest elements (see ``jax_layout``)."""
        tail = self.left if tail is None else tail
        return choose_order(expr, tail, self.sizes, self.lw.stored_ranks)

    # -- reductions ----------------------------------------------------------
    def reduced(self, expr: Expr) -> Val:
        """``expr`` reduced over the Einsum's reduced ranks, as a value over its left ranks.

        A ``where`` whose condition is constant along the reduced ranks selects between the
        reduced branches (exact for every reduction), so a masked contraction stays one.
        """
        e = self.e
        reduced = set(e.reduced_ranks)
        if _is_where_outside(expr, reduced):
            assert isinstance(expr, Op)
            lw = self.lw.over(self.left)
            branches = [self.reduced(x) for x in expr.args[1:]]
            return lw.apply("where", [lw.lower(expr.args[0]), *branches], expr)
        if e.reduce == "sum":
            return self.contraction(expr)
        lw = self.lw.over(self.canonical(expr))
        return self.reduce(lw.as_float(lw.lower(expr)), e.reduce, e.reduced_ranks)

    def reduce(self, val: Val, how: str, reduced: tuple[str, ...]) -> Val:
        """Reduce ``val`` over ``reduced``; a reduced rank it does not vary along counts too."""
        axes = tuple(val.ranks.index(r) for r in reduced if r in val.ranks)
        node, dtype = val.node, val.dtype
        if axes:
            acc = self.policy.accumulate_dtype
            params: dict[str, Any] = {"axis": axes[0] if len(axes) == 1 else axes}
            if how in ("sum", "prod") and acc is not None:
                params["dtype"] = acc
                dtype = acc
            node = call(f"reduce_{how}", node, **params)
        ranks = tuple(r for r in val.ranks if r not in reduced)
        order = tuple(r for r in self.left if r in ranks)
        if order != ranks:
            node = call("transpose", node, axes=tuple(ranks.index(r) for r in order))
        out = Val(node, order, "float", dtype)
        count = math.prod(self.sizes[r] for r in reduced if r not in val.ranks)
        if count > 1 and how in ("sum", "prod"):
            op = "mul" if how == "sum" else "pow"
            out = self.lw.over(ranks).apply(op, [out, Val(Lit(count), (), "int", None)])
        return out

    def contraction(self, expr: Expr) -> Val:
        """A sum of a product: inner factors contract by einsum, outer ones scale the result."""
        e = self.e
        reduced = set(e.reduced_ranks)
        factors = list(_factors(expr, reduced))
        inner = [f for f, _ in factors if reduced & set(rank_vars(f))]
        vals, widened = self.contraction_operands(inner)
        if len(vals) >= 2:
            val = self.einsum(vals, widened)
        else:  # one factor (or none: a sum of a constant) needs no einsum
            one = vals[0] if vals else Val(Lit(1), (), "int", None)
            val = self.reduce(one, "sum", e.reduced_ranks)
        outer = [(f, rec) for f, rec in factors if not reduced & set(rank_vars(f))]
        lw = self.lw.over(self.left)
        for f, reciprocal in outer:
            val = lw.apply("div" if reciprocal else "mul", [val, lw.lower(f)], f)
        return val

    def contraction_operands(self, factors: list[Expr]) -> tuple[list[Val], np.dtype | None]:
        """The factors lowered; ``float32(Q) * float32(K)`` of narrower ``Q``, ``K`` gives
        the narrow operands and float32, for one dot with ``preferred_element_type``."""

        batch = tuple(r for r in self.left if all(r in rank_vars(f) for f in factors))

        def lower(f: Expr) -> Val:
            order = self.canonical(f, ())
            if len(factors) >= 2:  # batch ranks lead, as dot_general's canonical form has them
                order = batch + tuple(r for r in order if r not in batch)
            lw = self.lw.over(order)
            return lw.as_float(lw.lower(f))

        to = _cast_dtype(factors) if len(factors) >= 2 else None
        if to is not None:
            bare = [lower(f.args[0]) for f in factors]  # type: ignore[attr-defined]
            if all(_widens(v.dtype, to) for v in bare):
                return bare, to
        return [lower(f) for f in factors], None

    def einsum(self, vals: list[Val], preferred: np.dtype | None = None) -> Val:
        letters = _letters(self.e.ranks)
        present = {r for v in vals for r in v.ranks}
        out_ranks = tuple(r for r in self.left if r in present)
        subscripts = ",".join("".join(letters[r] for r in v.ranks) for v in vals)
        spec = f"{subscripts}->{''.join(letters[r] for r in out_ranks)}"
        acc = self.policy.accumulate_dtype
        if self.policy.wide_dots:
            preferred = np.dtype(jnp.promote_types(preferred or np.float32, np.float32))
        if preferred is not None:
            acc = preferred if acc is None else np.dtype(jnp.promote_types(acc, preferred))
        node = call(
            "einsum",
            Lit(spec),
            *(v.node for v in vals),
            precision=self.policy.precision,
            preferred_element_type=acc,
        )
        dtypes = [v.dtype for v in vals if v.dtype is not None]
        dtype = acc if acc is not None else (jnp.result_type(*dtypes) if dtypes else None)
        val = Val(node, out_ranks, "float", None if dtype is None else np.dtype(dtype))
        count = math.prod(self.sizes[r] for r in self.e.reduced_ranks if r not in present)
        if count > 1:
            val = self.lw.over(out_ranks).apply("mul", [val, Val(Lit(count), (), "int", None)])
        return val

    # -- results -------------------------------------------------------------
    def finish(self, val: Val, ranks: tuple[str, ...], dtype: np.dtype) -> Node:
        """``val`` as a full array over ``ranks`` (in that order) of ``dtype``."""
        shape = tuple(self.sizes[r] for r in ranks)
        if not val.ranks:
            return call("full", val.node, shape=shape, dtype=dtype)
        present = tuple(r for r in ranks if r in val.ranks)
        assert len(present) == len(val.ranks), (val.ranks, ranks)
        node = val.node
        if present != val.ranks:
            node = call("transpose", node, axes=tuple(val.ranks.index(r) for r in present))
        if val.kind != "float" or val.dtype != dtype:
            node = call("astype", node, dtype=dtype)
        if present != ranks:
            placed = Val(node, present, "float", dtype)
            node = call("broadcast_to", self.lw.align(placed, ranks, full=True), shape=shape)
        return node

    # -- recurrences ---------------------------------------------------------
    def recurrence(self) -> list[Stmt]:
        e = self.e
        r, dim, first = recurrence_parts(e)
        state = tuple(q for q in self.left if q != r)
        dtype = self.out.dtype
        init = self.names.fresh(f"{e.output}_init")
        init_val = self.lw.over(self.canonical(first, state)).lower(first)
        stmts: list[Stmt] = [Assign(init, self.finish(init_val, state, dtype))]
        before = call("index", Ref(init), index=(slice(None),) * dim + (None,))
        cumulative = self.cumulative(before)
        if cumulative is not None:
            steps = cumulative
        else:
            steps_name = self.names.fresh(f"{e.output}_steps")
            stmts += self.scan(steps_name, Ref(init), state)
            steps = Ref(steps_name)
            if dim != 0:
                steps = call("moveaxis", steps, source=0, destination=dim)
        stmts.append(Assign(e.output, call("concatenate", before, steps, axis=dim)))
        return stmts

    def cumulative(self, before: Node) -> Node | None:
        """``T[r+1] = T[r] op X`` with op in add/max/min/mul: ``init op cum_op(X)``."""
        e = self.e
        if not (isinstance(e.expr, Op) and e.expr.op in CUMULATIVE):
            return None
        a, b = e.expr.args
        other = b if _reads(a, e.output) else a
        if not (_is_self(a, e.output) or _is_self(b, e.output)) or _reads(other, e.output):
            return None
        lw = self.lw.over(self.canonical(other))
        x = self.finish(lw.lower(other), self.left, self.out.dtype)
        cum = call(CUMULATIVE[e.expr.op], x, axis=e.iterative_dim)
        return call(e.expr.op, before, cum)

    def scan(self, name: str, init: Node, state: tuple[str, ...]) -> list[Stmt]:
        """A ``lax.scan`` along the iterative rank; state-free subtrees are computed up front."""
        e = self.e
        r = e.iterative_rank
        assert r is not None
        full = self.lw.over(self.left)
        local = self.names.local()
        stmts: list[Stmt] = []
        xs: list[tuple[str, Node]] = []
        leaves: dict[Expr, Val] = {}
        for sub in dict.fromkeys(_state_free(e.expr, e.output)):
            v = full.lower(sub)
            if r in v.ranks:
                base = sub.tensor if isinstance(sub, Access) else f"{e.output}_x{len(xs)}"
                x = local.fresh(f"{base}_t")
                pos = v.ranks.index(r)
                node = v.node if pos == 0 else call("moveaxis", v.node, source=pos, destination=0)
                xs.append((x, node))
                leaves[sub] = Val(Ref(x), tuple(q for q in v.ranks if q != r), v.kind, v.dtype)
            elif isinstance(v.node, Ref | Lit):
                leaves[sub] = v
            else:
                tmp = self.names.fresh(f"{e.output}_c{len(stmts)}")
                stmts.append(Assign(tmp, v.node))
                leaves[sub] = Val(Ref(tmp), v.ranks, v.kind, v.dtype)
        carry = local.fresh(f"{e.output}_prev")
        for a in accesses(e.expr):
            if a.tensor == e.output:
                leaves[a] = Val(Ref(carry), state, "float", self.out.dtype)
        step = self.lw.over(state, leaves).lower(e.expr)
        node = self.finish(step, state, self.out.dtype)
        stmts.append(ScanLoop(name, init, carry, tuple(xs), node, self.sizes[r]))
        return stmts


def _factors(expr: Expr, reduced: set[str]) -> Iterator[tuple[Expr, bool]]:
    """Factors of a product; ``a / b`` with ``b`` free of reduced ranks yields ``(b, True)``."""
    if isinstance(expr, Op) and expr.op == "mul":
        for a in expr.args:
            yield from _factors(a, reduced)
    elif isinstance(expr, Op) and expr.op == "div" and not reduced & set(rank_vars(expr.args[1])):
        yield from _factors(expr.args[0], reduced)
        yield expr.args[1], True
    elif isinstance(expr, Op) and expr.op == "neg":
        yield from _factors(expr.args[0], reduced)
        yield Const(-1), False
    else:
        yield expr, False


def _is_where_outside(expr: Expr, reduced: set[str]) -> bool:
    """A ``where`` whose condition does not vary along the reduced ranks."""
    return (
        isinstance(expr, Op) and expr.op == "where" and not reduced & set(rank_vars(expr.args[0]))
    )


def _is_contraction(expr: Expr, reduced: set[str]) -> bool:
    """Whether a sum of ``expr`` goes to ``jnp.einsum`` (two or more varying factors)."""
    if _is_where_outside(expr, reduced):
        assert isinstance(expr, Op)
        return any(_is_contraction(x, reduced) for x in expr.args[1:])
    return sum(bool(reduced & set(rank_vars(f))) for f, _ in _factors(expr, reduced)) >= 2


def _letters(ranks: tuple[str, ...]) -> dict[str, str]:
    """Einsum letters: a one-letter rank keeps its name, the others take unused letters."""
    out = {r: r for r in ranks if len(r) == 1 and r in string.ascii_letters}
    spare = iter(c for c in string.ascii_letters if c not in out.values())
    for r in ranks:
        if r not in out:
            letter = next(spare, None)
            if letter is None:
                raise BackendUnsupported(f"an einsum over {len(ranks)} ranks needs > 52 letters")
            out[r] = letter
    return out


def _reads(expr: Expr, tensor: str) -> bool:
    return any(a.tensor == tensor for a in accesses(expr))


def _is_self(expr: Expr, tensor: str) -> bool:
    return isinstance(expr, Access) and expr.tensor == tensor


def _state_free(expr: Expr, tensor: str) -> Iterator[Expr]:
    """The maximal subtrees of a recurrence's map that do not read its own state."""
    if not _reads(expr, tensor):
        yield expr
    elif isinstance(expr, Op):
        for a in expr.args:
            yield from _state_free(a, tensor)


def _cast_dtype(factors: list[Expr]) -> np.dtype | None:
    """The dtype every factor is cast to, when each is a cast to the same one; else None."""
    ops = {f.op if isinstance(f, Op) else None for f in factors}
    op = ops.pop() if len(ops) == 1 else None
    return canonical_dtype(op) if op in CAST_OPS else None


def _widens(dtype: np.dtype | None, to: np.dtype) -> bool:
    """A cast from ``dtype`` up to ``to`` is exact (and not a no-op)."""
    return dtype is not None and dtype != to and np.dtype(jnp.promote_types(dtype, to)) == to
