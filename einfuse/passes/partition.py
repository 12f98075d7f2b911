"""Rank partitioning: ``m -> m1, m0`` with a tile size, the IR's way of expressing tiling.

Every Einsum that iterates over ``m`` iterates over ``(m1, m0)`` instead; tensors it
writes get the two ranks in place of one, and inputs are read through the affine
index ``m1*M0 + m0``. When the tile does not divide ``M`` the last tile runs past the
end: those reads give 0, and every reduction over the split rank is masked with its
operator's identity (``-inf`` for max, 0 for sum), so results never change.

Only ranks that the cascade reduces away can be split (``m`` in attention): a rank of
an output keeps the output's shape, so output ranks are tiled by the Schedule instead.
"""

from __future__ import annotations

import sympy

from einfuse.ir.cascade import Cascade, Einsum, Partition, SizeValue
from einfuse.ir.errors import EinfuseError
from einfuse.ir.expr import (
    REDUCE_IDENTITY,
    Access,
    Const,
    Expr,
    Op,
    Size,
    Var,
    accesses,
    rank_vars,
    substitute,
)
from einfuse.passes.manager import register_pass


class PartitionError(EinfuseError):
    pass


def flat_index(outer: str, inner: str) -> Expr:
    """``outer*INNER + inner``: the original position of a tile element."""
    return Op("add", (Op("mul", (Var(outer), Size(inner))), Var(inner)))


def divides(tile: SizeValue, size: SizeValue) -> bool:
    """True only when divisibility is certain (symbolic sizes are assumed not to divide)."""
    ratio = sympy.sympify(size) / sympy.sympify(tile)
    return bool(ratio.is_integer)


@register_pass("partition")
def partition(
    c: Cascade,
    rank: str,
    tile: int,
    outer: str = "",
    inner: str = "",
    keep: frozenset[str] = frozenset(),
) -> Cascade:
    """Split ``rank`` into ``outer`` x ``inner`` (default ``rank1``, ``rank0``) of size ``tile``.

    ``keep`` names Einsums computed from inputs alone that stay whole, read by the split
    ones through ``outer*INNER+inner`` (see ``whole_outputs``)."""
    outer, inner = outer or f"{rank}1", inner or f"{rank}0"
    if not isinstance(tile, int) or tile <= 0:
        raise PartitionError(f"partition {rank}: tile must be a positive integer, got {tile!r}")
    known = set(c.all_ranks())
    if rank not in known:
        raise PartitionError(f"partition: no rank {rank!r}; ranks: {', '.join(sorted(known))}")
    for name in (outer, inner):
        if name in known:
            raise PartitionError(f"partition {rank}: rank name {name!r} is already used")
    whole = whole_outputs(c, rank)
    for o in c.outputs:
        if rank in c.tensor_ranks(o) and o not in whole:
            raise PartitionError(
                f"partition {rank}: output {o} has rank {rank}; split only ranks the cascade "
                "reduces away (tile output ranks through the schedule)"
            )
    size = c.size(rank)
    pad = not divides(tile, size)
    whole = whole | (set(keep) & _from_inputs(c, rank))
    split = {e.output for e in c.einsums if rank in e.output_ranks and e.output not in whole}
    einsums = [_split_einsum(c, e, rank, outer, inner, split, pad) for e in c.einsums]
    sizes = dict(c.sizes)
    sizes[inner] = tile
    sizes[outer] = sympy.ceiling(sympy.sympify(size) / tile)
    return c.with_einsums(
        einsums,
        sizes=tuple(sizes.items()),
        partitions=(*c.partitions, Partition(rank, outer, inner, tile)),
    )


def whole_outputs(c: Cascade, rank: str) -> set[str]:
    """Outputs with ``rank`` that can stay whole, with what they read that must stay too.

    An output computed along ``rank`` from inputs alone (a mask converted once and shared
    with later code, say) is computed unsplit, and the split Einsums read it like an
    input, through ``outer*INNER+inner``.
    """
    if not any(rank in e.reduced_ranks for e in c.einsums):
        return set()  # nothing to split for: every output keeps the rank
    candidates = _from_inputs(c, rank)
    whole = {o for o in c.outputs if o in candidates}
    for e in reversed(c.einsums):
        if e.output in whole:
            whole.update(t for t in e.inputs if t in candidates)
    return whole


def _from_inputs(c: Cascade, rank: str) -> set[str]:
    """Einsums along ``rank`` (not reducing it) that read inputs and each other only."""
    out: set[str] = set()
    for e in c.einsums:
        if rank not in e.output_ranks or rank in e.reduced_ranks or e.is_recurrence:
            continue
        if all(c.input_decl(t) is not None or t in out for t in e.inputs):
            out.add(e.output)
    return out


def _split_einsum(
    c: Cascade, e: Einsum, rank: str, outer: str, inner: str, split: set[str], pad: bool
) -> Einsum:
    if rank not in e.ranks or (rank in e.output_ranks and e.output not in split):
        return e  # untouched, or an output kept whole
    if e.iterative_rank == rank:
        raise PartitionError(f"partition {rank}: {e.output} is a recurrence along {rank}")
    flat = flat_index(outer, inner)

    def rewrite(node: Expr) -> Expr | None:
        if isinstance(node, Access):
            if node.tensor in split and sum(rank in rank_vars(i) for i in node.indices) > 1:
                raise PartitionError(
                    f"partition {rank}: {e.output} reads {node} with {rank} in several indices "
                    "(a diagonal); such reads cannot be split"
                )
            idx: list[Expr] = []
            for i in node.indices:
                if node.tensor in split and rank in rank_vars(i):
                    if i != Var(rank):
                        raise PartitionError(
                            f"partition {rank}: {e.output} reads {node} with index {i}; "
                            f"only plain reads of a split tensor along {rank} can be split"
                        )
                    idx += [Var(outer), Var(inner)]
                else:
                    idx.append(substitute(i, rewrite))
            return Access(node.tensor, tuple(idx))
        if node == Var(rank):
            return flat
        return None

    indices: list[Expr] = []
    for i in e.indices:
        indices += [Var(outer), Var(inner)] if i == Var(rank) else [substitute(i, rewrite)]
    expr = substitute(e.expr, rewrite)
    if pad and rank in e.reduced_ranks:
        expr = _mask_padding(expr, Op("lt", (flat, Size(rank))), e.reduce, split)
    init = substitute(e.init, rewrite) if e.init is not None else None
    return Einsum(e.output, tuple(indices), expr, e.reduce, init, loc=e.loc)


def _mask_padding(expr: Expr, valid: Expr, reduce: str, split: set[str]) -> Expr:
    """Give the padded tail the reduction's identity.

    A sum of products masks the factors that read split tensors rather than the whole
    product, so a contraction stays a contraction for the backends. A product with a
    bare read of an input along the split rank needs no mask: reads past the end give 0.
    """
    whole = Op("where", (valid, expr, Const(REDUCE_IDENTITY[reduce])))
    if reduce != "sum":
        return whole
    factors = _factors(expr)
    flat = valid.args[0]
    masked, zeroed = [], False
    for f in factors:
        reads = accesses(f)
        if any(a.tensor in split for a in reads):
            masked.append(Op("where", (valid, f, Const(0.0))))
            zeroed = True
        else:
            # Only a bare read at exactly the tile position is 0 past the end: exp(X[...])
            # there is 1, and X[j-1] reads the last real element.
            zeroed |= isinstance(f, Access) and flat in f.indices
            masked.append(f)
    if not zeroed:
        return whole
    out = masked[0]
    for f in masked[1:]:
        out = Op("mul", (out, f))
    return out


def _factors(expr: Expr) -> list[Expr]:
    if isinstance(expr, Op) and expr.op == "mul":
        return _factors(expr.args[0]) + _factors(expr.args[1])
    return [expr]
