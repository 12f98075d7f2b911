"""View rules of the lifter: equations that only re-index a value, so they cost no Einsum.

A view maps the indices of its output to indices of its operand: a transpose permutes
them, a broadcast drops the new ones (and reads index 0 of size-1 dims), a squeeze puts 0
back, a reshape that splits a dim reads it at the mixed-radix index ``h*D + d``, and a
slice offsets it. Reshapes that merge dims are not views: the lifter leaves them opaque.
"""

from __future__ import annotations

from einfuse.einsum_cascade.lift_flatten import FlatEqn
from einfuse.einsum_cascade.lift_region import Index, RegionBuilder
from einfuse.ir.expr import Const, Expr, Op, Size, Var


def out_shape(e: FlatEqn) -> tuple[int, ...]:
    return tuple(int(n) for n in e.out_avals()[0].shape)


def alias(b: RegionBuilder, e: FlatEqn) -> None:
    """The output is the operand itself (stop_gradient, copy, a cast to the same dtype)."""
    b.define(e.outvars[0], b.read(e.invars[0]))


def broadcast(b: RegionBuilder, e: FlatEqn) -> None:
    v = b.read(e.invars[0])
    shape, dims = out_shape(e), tuple(int(d) for d in e.params["broadcast_dimensions"])
    ranks: list[str | None] = [None] * len(shape)
    for i, d in enumerate(dims):
        if v.shape[i] == shape[d]:
            ranks[d] = v.ranks[i]

    def index(idx: Index) -> Index:
        return tuple(Const(0) if v.shape[i] == 1 else idx[d] for i, d in enumerate(dims))

    b.define(e.outvars[0], v.view(shape, ranks, index))


def transpose(b: RegionBuilder, e: FlatEqn) -> None:
    v = b.read(e.invars[0])
    perm = tuple(int(p) for p in e.params["permutation"])

    def index(idx: Index) -> Index:
        out: list[Expr] = [Const(0)] * len(perm)
        for i, p in enumerate(perm):
            out[p] = idx[i]
        return tuple(out)

    b.define(e.outvars[0], v.view(out_shape(e), [v.ranks[p] for p in perm], index))


def squeeze(b: RegionBuilder, e: FlatEqn) -> None:
    v = b.read(e.invars[0])
    dims = {int(d) % v.ndim for d in e.params["dimensions"]}
    kept = [d for d in range(v.ndim) if d not in dims]

    def index(idx: Index) -> Index:
        it = iter(idx)
        return tuple(Const(0) if d in dims else next(it) for d in range(v.ndim))

    b.define(e.outvars[0], v.view(out_shape(e), [v.ranks[d] for d in kept], index))


def reshape_plan(src: tuple[int, ...], dst: tuple[int, ...]) -> dict[int, tuple[int, ...]] | None:
    """For each non-unit source dim, the destination dims it splits into; None for a merge."""
    outs = [(d, n) for d, n in enumerate(dst) if n != 1]
    plan: dict[int, tuple[int, ...]] = {}
    j = 0
    for d, n in enumerate(src):
        if n == 1:
            continue
        group, prod = [], 1
        while prod < n and j < len(outs):
            group.append(outs[j][0])
            prod *= outs[j][1]
            j += 1
        if prod != n:
            return None
        plan[d] = tuple(group)
    return plan if j == len(outs) else None


def reshape_ok(e: FlatEqn) -> bool:
    if e.params.get("dimensions") is not None or e.params.get("sharding") is not None:
        return False
    src = tuple(int(n) for n in e.in_avals()[0].shape)
    return reshape_plan(src, out_shape(e)) is not None


def reshape(b: RegionBuilder, e: FlatEqn) -> None:
    """Splits become mixed-radix reads (``X[h*D + d]``); unit dims are index 0."""
    v = b.read(e.invars[0])
    shape = out_shape(e)
    plan = reshape_plan(v.shape, shape)
    assert plan is not None
    ranks: list[str | None] = [None] * len(shape)
    for d, group in plan.items():
        if len(group) == 1:
            ranks[group[0]] = v.ranks[d]

    def index(idx: Index) -> Index:
        out: list[Expr] = []
        for d in range(v.ndim):
            if d not in plan:
                out.append(Const(0))
                continue
            group = plan[d]
            acc = idx[group[0]]
            for g in group[1:]:
                size: Expr = Size(idx[g].rank) if isinstance(idx[g], Var) else Const(shape[g])
                acc = Op("add", (Op("mul", (acc, size)), idx[g]))
            out.append(acc)
        return tuple(out)

    b.define(e.outvars[0], v.view(shape, ranks, index))


def slice_ok(e: FlatEqn) -> bool:
    """Unit strides, and no dim shortened at offset 0: the IR reads a shorter prefix with
    a rank of another size, which the verifier refuses (``X[d + 3]`` is fine)."""
    strides = e.params.get("strides")
    if strides is not None and any(int(s) != 1 for s in strides):
        return False
    src, dst = e.in_avals()[0].shape, out_shape(e)
    starts = e.params["start_indices"]
    return all(int(s) > 0 or int(n) == m for s, n, m in zip(starts, src, dst))


def slice_view(b: RegionBuilder, e: FlatEqn) -> None:
    v = b.read(e.invars[0])
    starts = tuple(int(s) for s in e.params["start_indices"])
    shape = out_shape(e)
    ranks = [r if shape[d] == v.shape[d] else None for d, r in enumerate(v.ranks)]

    def index(idx: Index) -> Index:
        return tuple(Op("add", (i, Const(s))) if s else i for i, s in zip(idx, starts))

    b.define(e.outvars[0], v.view(shape, ranks, index))
