"""The storage order of a fused group's accumulators: query rank before the value ranks.

A lifted attention often writes ``P V`` as ``AV[f, p]`` (the order ``jnp.einsum`` chose for
its ``dot_general``), so the blockwise loop would accumulate ``RNV[m1, f, p]``. Each step then
asks XLA:CPU for a ``[f, p]`` product of a ``[p, m0]`` score tile, which it computes by
transposing the tile: 1.3x the time of the whole loop at 4096 (benchmarks/RESULTS.md). Stored
as ``[m1, p, f]`` the same step is the plain GEMM ``P @ V``. Only the order in which a tensor
keeps its ranks changes; every read is rewritten with it, so values do not.
"""

from __future__ import annotations

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import Access, Expr, Var, rank_vars, substitute
from einfuse.passes.fuse import FusedGroup


def query_major(c: Cascade, g: FusedGroup, query: str | None) -> Cascade:
    """``c`` with the group's contractions over the inner rank (and their recurrences) stored
    in the order of the operand that holds ``query``; the loop rank keeps its place."""
    if query is None or g.inner is None:
        return c
    perms: dict[str, tuple[int, ...]] = {}
    for name in g.einsums:
        e = c.writer(name)
        if e.is_recurrence or name in c.outputs or g.inner not in e.reduced_ranks:
            continue
        lead = _query_operand(e.expr, query)
        if lead is None:
            continue
        perm = _perm(e.indices, lead, g.rank)
        if perm != tuple(range(len(perm))):
            perms[name] = perm
            for other in g.einsums:  # the running sum of this product keeps its layout
                r = c.writer(other)
                same = set(r.output_ranks) == set(e.output_ranks) and r.is_recurrence
                if same and other not in c.outputs and name in r.inputs:
                    perms[other] = _perm(r.indices, _ranks_in(e.indices, perm), g.rank)
    if not perms:
        return c
    return c.with_einsums(tuple(_permuted(e, perms) for e in c.einsums))


def _query_operand(expr: Expr, query: str) -> tuple[str, ...] | None:
    """Ranks, in order, of the one access holding ``query`` in a product, if exactly one."""
    found = [a for a in expr.walk() if isinstance(a, Access) and query in rank_vars(a)]
    if len(found) != 1:
        return None
    return tuple(dict.fromkeys(r for i in found[0].indices for r in rank_vars(i)))


def _ranks_in(indices: tuple[Expr, ...], perm: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(r for k in perm for r in rank_vars(indices[k]))


def _perm(indices: tuple[Expr, ...], lead: tuple[str, ...], fixed: str) -> tuple[int, ...]:
    """Positions of ``indices`` in the new order: ranks of ``lead`` first (in its order), the
    rest after; the index on ``fixed`` (the loop rank) and compound indices stay put."""
    movable = [k for k, i in enumerate(indices) if isinstance(i, Var) and i.rank != fixed]
    order = {r: n for n, r in enumerate(lead)}
    ranked = sorted(movable, key=lambda k: (order.get(indices[k].rank, len(order)), k))
    perm = list(range(len(indices)))
    for slot, k in zip(movable, ranked):
        perm[slot] = k
    return tuple(perm)


def _permuted(e: Einsum, perms: dict[str, tuple[int, ...]]) -> Einsum:
    def reorder(node: Expr) -> Expr | None:
        if isinstance(node, Access) and node.tensor in perms:
            idx = tuple(substitute(i, reorder) for i in node.indices)
            return Access(node.tensor, tuple(idx[k] for k in perms[node.tensor]))
        return None

    indices = e.indices
    if e.output in perms:
        indices = tuple(indices[k] for k in perms[e.output])
    init = substitute(e.init, reorder) if e.init is not None else None
    return Einsum(e.output, indices, substitute(e.expr, reorder), e.reduce, init, e.loc)
