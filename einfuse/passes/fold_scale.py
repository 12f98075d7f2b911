"""Fold a constant scale of a contraction into one of its operands.

``S[q, k] = QK[q, k] / sqrt(64)`` after ``QK[q, k] = Q[q, d] * K[k, d]`` scales every score,
and so does ``QK[q, k] = Q[q, d] * K[k, d] * 0.125``; ``Qs[q, d] = Q[q, d] / sqrt(64)`` and
``S[q, k] = Qs[q, d] * K[k, d]`` scale the (much smaller) operand once. In a fused attention
loop that saves a pass over every score tile per step (a tenth of the loop on the CPU:
benchmarks/RESULTS.md). Exact in real arithmetic: a contraction is linear in each operand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import Access, Expr, Op, Var, accesses, rank_vars, rename_ranks
from einfuse.passes.defer import unique_name
from einfuse.passes.manager import register_pass

Scale = tuple[tuple[str, Expr], ...]  # ("mul" | "div", constant), applied in order


@dataclass(frozen=True, slots=True)
class _Fold:
    product: Einsum  # the contraction X * Y (* scale)
    scale: Scale
    into: Einsum  # the Einsum that becomes Xs * Y: the product itself, or its scaled reader
    reads: tuple[Expr, ...]  # the indices ``into`` reads the product with (its own, if itself)


@register_pass("fold-scale")
def fold_scale(c: Cascade, rank: str = "") -> Cascade:
    """Fold every constant scale of a two-factor contraction (with ``rank``, if given)."""
    while (fold := next(_folds(c, rank), None)) is not None:
        c = _apply(c, fold)
    return c


def _folds(c: Cascade, rank: str) -> Iterator[_Fold]:
    for e in c.einsums:
        split = _split(e.expr)
        if split is None or e.init is not None or e.reduce != "sum":
            continue
        factors, scale = split
        if len(factors) == 2 and scale and e.reduced_ranks and (not rank or rank in e.ranks):
            yield _Fold(e, scale, e, e.indices)
        elif len(factors) == 1 and scale and not e.reduced_ranks:
            fold = _scaled_read(c, e, factors[0], scale, rank)
            if fold is not None:
                yield fold


def _scaled_read(c: Cascade, d: Einsum, read: Access, scale: Scale, rank: str) -> _Fold | None:
    """``D = C * s`` where ``C = X * Y`` is read by ``D`` alone: fold ``s`` into ``C``."""
    e = c.writer(read.tensor)
    if e is None or read.tensor in c.outputs or e.init is not None or e.reduce != "sum":
        return None
    if [g.output for g in c.consumers(read.tensor)] != [d.output]:
        return None
    split = _split(e.expr)
    if split is None or len(split[0]) != 2 or split[1] or not e.reduced_ranks:
        return None
    if rank and rank not in e.ranks:
        return None
    if not _plain(e.indices) or len(e.indices) != len(read.indices):
        return None
    if set(e.reduced_ranks) & set(rank_vars(read)):  # renaming would capture a reduced rank
        return None
    return _Fold(e, scale, d, read.indices)


def _split(x: Expr) -> tuple[list[Access], Scale] | None:
    """A product of plain reads and constants (divisions by constants too), else None."""
    if isinstance(x, Access):
        return ([x], ()) if _plain(x.indices) else None
    if _constant(x):
        return [], (("mul", x),)
    if isinstance(x, Op) and x.op == "mul":
        a, b = _split(x.args[0]), _split(x.args[1])
        if a is None or b is None:
            return None
        return a[0] + b[0], a[1] + b[1]
    if isinstance(x, Op) and x.op == "div" and _constant(x.args[1]):
        a = _split(x.args[0])
        return None if a is None else (a[0], (*a[1], ("div", x.args[1])))
    return None


def _constant(x: Expr) -> bool:
    return not rank_vars(x) and not accesses(x)


def _plain(indices: tuple[Expr, ...]) -> bool:
    return all(isinstance(i, Var) for i in indices) and len(set(indices)) == len(indices)


def _elements(c: Cascade, a: Access) -> float:
    n = 1.0
    for r in rank_vars(a):
        size = c.size(r)
        n *= float(size) if isinstance(size, int) else float("inf")
    return n


def _apply(c: Cascade, f: _Fold) -> Cascade:
    split = _split(f.product.expr)
    assert split is not None
    (x, y) = split[0]
    if _elements(c, y) < _elements(c, x):
        x, y = y, x
    name = unique_name(f"{x.tensor}s", {t.name for t in c.inputs} | {g.output for g in c.einsums})
    scaled: Expr = x
    for op, k in f.scale:
        scaled = Op(op, (scaled, k))
    operand = Einsum(name, x.indices, scaled, loc=f.product.loc)
    mapping = {i.rank: j for i, j in zip(f.product.indices, f.reads) if isinstance(i, Var)}
    first = split[0][0] is x
    pair = (Access(name, x.indices), y) if first else (y, Access(name, x.indices))
    product = Einsum(f.into.output, f.into.indices, rename_ranks(Op("mul", pair), mapping))
    einsums: list[Einsum] = []
    for g in c.einsums:
        if g.output == f.product.output:
            einsums.append(operand)
            if f.into is f.product:
                einsums.append(product)
        elif g.output == f.into.output:
            einsums.append(Einsum(product.output, product.indices, product.expr, loc=g.loc))
        else:
            einsums.append(g)
    return c.with_einsums(tuple(einsums))
