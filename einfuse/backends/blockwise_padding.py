"""Key padding read from an input: skipping the key tiles whose keys are all masked.

BERT-style models mask padded keys with data, not with the key index: an additive bias
``s + (1 - mask[b, k]) * finfo.min`` (or ``-1e4``), or ``where(mask[b, k], s, fill)``. Here
the masked part depends only on the key (and on row ranks such as the batch), never on the
query or the scores, so a per-key value ``key(k)`` can be computed before the loop:

* additive ``s + bias(k)``: ``key = bias``; the masked score is ``fl(s + bias(k))``;
* ``where(cond(k), s, fill)``: ``key = where(cond, +inf, fill)``; the masked score is ``fill``.

One max per key tile (``KEYMAX__``, an Einsum lowered like any other, before the loop) gives
``T(t) = max_{k in t} key(k)``; a tile with ``T(t) <= SKIP_FILL`` has every key masked and is
skipped. Exactness is the band's argument (``blockwise_mask``): skipping adds exact zeros iff
every masked score ``x`` of the skipped tiles has ``exp(x - m)`` exactly 0, ``m`` the running
max after the visited tiles. ``x <= fl(B + T)`` (``B`` the Cauchy-Schwarz bound of the
scores, 0 for the ``where`` form whose ``x`` is the fill itself) over the skipped tiles, so
the block checks ``fl(B + max T) - m < UNDERFLOW`` per real query row, and where that fails
(scores near the fill, a fully masked row) runs again over every tile with the mask. Tiles
holding an unmasked key always run with the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from einfuse.backends.blockwise_mask import (
    SKIP_FILL,
    ScoreBound,
    flat_key,
    running_max_of,
    score_bound,
)
from einfuse.ir.cascade import Cascade, Einsum, TensorDecl
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, accesses, rank_vars
from einfuse.passes.fuse import FusedGroup

KEYMAX = "KEYMAX__"


@dataclass(frozen=True)
class KeyPadding:
    """A member masking its scores by a per-key value read from the loop's inputs."""

    member: str
    key: Expr  # key(k): a tile whose max of it is <= SKIP_FILL is all masked
    ranks: tuple[str, ...]  # key's ranks besides the loop ranks (batch, ...)
    additive: bool
    running_max: str | None  # the carried max to check against; None: cannot
    bound: ScoreBound | None  # for the additive form

    @property
    def skips(self) -> bool:
        return self.running_max is not None and (not self.additive or self.bound is not None)

    def describe(self) -> str:
        how = "skipped where exact (checked per block)" if self.skips else "visited"
        form = "additive bias" if self.additive else "where"
        return f"key padding from input ({form}): all-masked key tiles {how}"


def find_padding(c: Cascade, g: FusedGroup, query: str | None) -> KeyPadding | None:
    """The group's first member masking keys by a value read from outside the loop."""
    if g.inner is None:
        return None
    flat = flat_key(g.rank, g.inner)
    for name in g.einsums:
        found = _padding_of(c.writer(name).expr, flat, g, query)
        if found is None:
            continue
        key, s, additive = found
        ranks = tuple(r for r in rank_vars(key) if r not in (g.rank, g.inner))
        rm = running_max_of(c, g, name, flat)
        if rm is None:  # not a softmax's scores (a key projection's bias, say)
            continue
        bound = score_bound(c, g, s) if additive else None
        return KeyPadding(name, key, ranks, additive, rm, bound)
    return None


def _padding_of(x: Expr, flat: Expr, g: FusedGroup, query: str | None) -> tuple | None:
    """(key, unmasked scores, additive) of ``s + bias(k)`` or ``where(cond(k), s, fill)``."""
    if not isinstance(x, Op):
        return None
    if x.op == "add":
        for bias, s in (x.args, x.args[::-1]):
            if _per_key(bias, flat, g, query) and not _per_key(s, flat, g, query):
                return bias, s, True
    if x.op == "where":
        cond, a, b = x.args
        if not _per_key(cond, flat, g, query):
            return None
        for visible, keep, fill in ((True, a, b), (False, b, a)):
            if isinstance(fill, Const) and float(fill.value) <= SKIP_FILL:
                inf = Const(math.inf)
                key = Op("where", (cond, inf, fill) if visible else (cond, fill, inf))
                return key, keep, False
    return None


def _per_key(x: Expr, flat: Expr, g: FusedGroup, query: str | None) -> bool:
    """Whether ``x`` reads, at the key, only tensors from outside the loop, and not the query."""
    reads = accesses(x)
    if query in rank_vars(x) or any(a.tensor in g.einsums for a in reads):
        return False
    return any(flat in a.indices for a in reads)


def keymax_cascade(c: Cascade, g: FusedGroup, pad: KeyPadding) -> Cascade:
    """``KEYMAX__[ranks, m1] = max(m0) key`` over the real keys: the per-tile maxima."""
    (p,) = [p for p in c.partitions if p.outer == g.rank]
    flat = flat_key(g.rank, g.inner or p.inner)
    real = Op("lt", (flat, Size(p.rank)))
    expr = Op("where", (real, pad.key, Const(-math.inf)))
    out = (*pad.ranks, g.rank)
    einsum = Einsum(KEYMAX, tuple(Var(r) for r in out), expr, "max")
    names = {a.tensor for a in pad.key.walk() if isinstance(a, Access)}
    decls = tuple(TensorDecl(t, c.tensor_ranks(t)) for t in sorted(names))
    return Cascade(decls, (einsum,), (KEYMAX,), c.sizes, c.partitions)
