"""The storage order of a fused group's tensors: the query rank leads, so each dot is a GEMM.

A lifted attention often writes ``P V`` as ``AV[f, p]`` (the order ``jnp.einsum`` chose for
its ``dot_general``), so the blockwise loop would accumulate ``RNV[m1, f, p]``. Each step then
asks XLA:CPU for a ``[f, p]`` product of a ``[p, m0]`` score tile, which it computes by
transposing the tile: 1.3x the time of the whole loop at 4096 (benchmarks/RESULTS.md). Stored
as ``[m1, p, f]`` the same step is the plain GEMM ``P @ V``.

The design's cascade stores scores key-major (``QK[m, p]``) and ``Q[e, p]`` with the query
minor. XLA:CPU (jax 0.10) then computes a ``[bk, bq]`` score tile from a transposed ``[e, bq]``
operand at 8.7 GMAC/s when ``bq`` is thin (120 us for 1024 x 16 x 64, against 16-22 us for
the same MACs query-major), and ``P V`` from a key-major ``P`` at a quarter of the GEMM rate
(3.0 ms against 0.74 ms at 1024 x 1024 x 64): the emitted loop took up to 8x the hand-written
one. So score tiles are stored query-major (``QK[p, m0]``) and an operand read by a
contraction with a contracted rank before the query rank (``Q[e, p]``) is copied once, before
the loop, query-first (``Q[p, e]``). Only the order in which a tensor keeps its ranks changes;
every read is rewritten with it, so values do not.
"""

from __future__ import annotations

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import Access, Expr, Var, accesses, rank_vars, substitute
from einfuse.passes.fuse import FusedGroup


def query_major(c: Cascade, g: FusedGroup, query: str | None) -> Cascade:
    """``c`` with the group's contractions over the inner rank (and their recurrences) stored
    in the order of the operand that holds ``query``; the loop rank keeps its place."""
    if query is None or g.inner is None:
        return c
    perms: dict[str, tuple[int, ...]] = {}
    for name in g.einsums:
        e = c.writer(name)
        if e.is_recurrence or name in c.outputs:
            continue
        if g.inner in e.reduced_ranks:
            lead = _query_operand(e.expr, query)
        elif {query, g.inner} <= set(e.output_ranks):  # a score tile: [.., p, m0]
            lead = _before(e.output_ranks, query, g.inner)
        else:
            continue
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
    if perms:
        c = c.with_einsums(tuple(_permuted(e, perms) for e in c.einsums))
    return _operands_query_first(c, g, query)


def _operands_query_first(c: Cascade, g: FusedGroup, query: str) -> Cascade:
    """Copy each tensor from outside the group that a member contracts over a rank stored
    before the query rank (``Q[e, p]``) once, query-first (``Q__qm[p, e]``), before the loop;
    the members read the copy."""
    names = set(g.einsums)
    perms: dict[str, tuple[int, ...]] = {}
    for name in g.einsums:
        e = c.writer(name)
        if e.reduce != "sum" or not e.reduced_ranks:
            continue
        for a in accesses(e.expr):
            if a.tensor in names or not all(isinstance(i, Var) for i in a.indices):
                continue
            ranks = tuple(i.rank for i in a.indices)  # type: ignore[union-attr]
            if query not in ranks or a.tensor in perms:
                continue
            first = next((r for r in ranks if r in e.reduced_ranks), query)
            if ranks.index(first) < ranks.index(query):
                lead = _before(ranks, query, first)
                perms[a.tensor] = tuple(
                    sorted(range(len(ranks)), key=lambda k: lead.index(ranks[k]))
                )
    if not perms:
        return c
    copies = []
    for t, perm in perms.items():
        ranks = c.tensor_ranks(t)
        out = tuple(Var(ranks[k]) for k in perm)
        copies.append(Einsum(f"{t}__qm", out, Access(t, tuple(Var(r) for r in ranks))))

    def reread(node: Expr) -> Expr | None:
        if isinstance(node, Access) and node.tensor in perms:
            return Access(f"{node.tensor}__qm", tuple(node.indices[k] for k in perms[node.tensor]))
        return None

    einsums: list[Einsum] = []
    for e in c.einsums:
        if e.output in names:
            if copies:  # before the group's first member
                einsums += copies
                copies = []
            e = Einsum(e.output, e.indices, substitute(e.expr, reread), e.reduce, e.init, e.loc)
        einsums.append(e)
    return c.with_einsums(einsums)


def _before(ranks: tuple[str, ...], rank: str, anchor: str) -> tuple[str, ...]:
    """``ranks`` with ``rank`` moved to just before ``anchor`` (unchanged if already before)."""
    if ranks.index(rank) < ranks.index(anchor):
        return ranks
    rest = [r for r in ranks if r != rank]
    rest.insert(rest.index(anchor), rank)
    return tuple(rest)


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
