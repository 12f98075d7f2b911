"""A mask band over the loop and query ranks, and when skipping its masked tiles is exact.

A member of the fused group that masks scores by comparing the key index ``k = m1*M0+m0``
with the query index ``p``, in any of the forms real models write::

    where(k <= p, s, fill)        where(p >= k, s, fill)       where(k > p, fill, s)
    s + where(k <= p, 0, fill)    where(and(k <= p, k > p - W), s, fill)   (sliding window)

makes the visible keys of query ``p`` a band ``p + lo <= k <= p + hi`` (``lo``/``hi``
absent: unbounded). A static key padding length, ``where(k < L, s, fill)`` (``k >= L``
flipped, additive, or ``and``-ed with a band), adds ``k <= limit = L - 1``: the tiles wholly
at or past ``L`` are outside the band for every query block, and the argument below holds
unchanged (a masked score is still the fill, or ``s + fill``). Padding read from an input
tensor is ``blockwise_padding``'s. For a query block and a key tile, the band decides three cases:
every pair visible (the step runs with ``s`` itself: exact, the mask selects ``s`` there;
``s + 0`` equals ``s`` but for the sign of a zero), some visible (the masked step), none
visible (the tile may be skipped).

**Why skipping a masked tile is exact.** In the loop a masked score ``x`` (``fill``, or
``s + fill`` for an additive mask) reaches the state only through the running max
(``max(RM, x)``) and through ``exp(x - SM)``, where ``SM`` is the running max after the
step. Skipping the tile equals running it iff ``x`` leaves the max alone and ``exp(x - SM)``
is exactly 0 in the carry dtype: then the sums gain exact zeros and are rescaled by
``exp(0) = 1``. With ``fill = -inf`` that always holds (``SM`` is finite). With a finite
fill it depends on the data: ``exp(x - m)`` is exactly 0 in float32 only for
``x - m < -103.97`` (below half the smallest subnormal; with flush-to-zero already below
-87.3), so we require ``fl(x - m) < -110`` (a margin for an approximate ``exp``). Because
``SM`` only grows and rounding is monotone, checking it once against ``m``, the running max
after the last visible tile, covers every later step. Then jax.jit's unfused softmax gives
the masked entries exact zeros too (its max is ``m``), so the skipping loop computes the same
softmax over the visible keys, only in the fused loop's summation order.

The emitter therefore runs the visible tiles first, checks ``fl(x - m) < -110`` for every
(real) query row of the block, and where that fails runs the block again over every tile
with the masked step: exact for every input, fast for every realistic one. A fully masked
row (a sliding window or a strict ``k < p`` band can make one) fails the check for a finite
fill, so it gets the unfused program's uniform average over all keys; with ``-inf`` the
skipping and the full loop compute the same thing (jax.jit gives NaN there, as does the loop).

For an additive mask the masked score is ``s + fill``, not ``fill``: ``x`` is bounded by
``fl(B + fill)`` with ``B >= s`` from Cauchy-Schwarz on the score's contraction
(``|c| * max_p ||q_p|| * max_k ||k_k||``, with 1% for rounding), computed once per call in
O(S*D); with heads packed in one dim (``q[p, h*D + d]``) the norms are over the whole dim,
looser but still a bound. The bound (and a plain fill) is raised by ``2**-7`` of its size,
since a bfloat16 member rounds ``s + fill`` (or the fill) by up to ``2**-8`` relative. A
score that is not a scaled contraction of two operands gets no bound, and its masked tiles
are visited.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import CAST_OPS, Access, Const, Expr, Op, Size, Var, rank_vars
from einfuse.passes.dce import reads
from einfuse.passes.fuse import FusedGroup

# The margin below which exp of a float32 (or wider) difference is exactly 0; see above.
UNDERFLOW = -110.0
# Finite fills above this are not skipped: ordinary scores would fail the check and every
# query block would run twice.
SKIP_FILL = -1000.0
# Relative slack on the Cauchy-Schwarz bound for the rounding of norms and of the score.
BOUND_SLACK = 1.01

_FLIP = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}
_NOT = {"le": "gt", "lt": "ge", "ge": "lt", "gt": "le"}


@dataclass(frozen=True)
class ScoreBound:
    """``s = scale * sum_r A[..r..] * B[..r..]``: what a bound on ``|s|`` needs."""

    scale: float
    operands: tuple[tuple[str, int], ...]  # (external tensor, dim of the contracted rank)


@dataclass(frozen=True)
class MaskBand:
    """Key ``k`` is visible to query ``p`` iff ``p + lo <= k <= p + hi`` and ``k <= limit``."""

    member: str
    lo: int | None
    hi: int | None
    fill: float
    unmasked: Expr  # the member's expression on a tile every query of the block sees
    additive: bool
    running_max: str | None  # the carried max to check a finite fill against; None: cannot
    bound: ScoreBound | None  # for an additive finite fill
    limit: int | None = None  # static key padding: only keys ``k <= limit`` are visible

    @property
    def skips_unchecked(self) -> bool:
        """A ``-inf`` fill: masked tiles are skipped with no check."""
        return self.fill == -math.inf

    @property
    def skips(self) -> bool:
        """Whether masked tiles can be skipped at all (else only the mask of visible
        tiles is dropped)."""
        if self.skips_unchecked:
            return True
        if self.fill > SKIP_FILL:
            return False
        return self.running_max is not None and (not self.additive or self.bound is not None)

    def describe(self) -> str:
        lo = "" if self.lo is None else f"p{self.lo:+d} <= "
        hi = "" if self.hi is None else f" <= p{self.hi:+d}"
        band = f"{lo}k{hi}"
        if self.limit is not None:  # static key padding
            band = f"k <= {self.limit}" if band == "k" else f"{band} and k <= {self.limit}"
        how = "skipped" if self.skips_unchecked else "skipped where exact (checked per block)"
        if not self.skips:
            how = "visited (skipping cannot be proven exact)"
        return f"mask band {band}, fill {self.fill:g}: masked key tiles {how}"


def flat_key(outer: str, inner: str) -> Expr:
    return Op("add", (Op("mul", (Var(outer), Size(inner))), Var(inner)))


def _offset(e: Expr) -> tuple[str, int] | None:
    """``p``, ``p + c``, ``c + p`` or ``p - c`` (integral ``c``) as (p, c)."""
    if isinstance(e, Var):
        return e.rank, 0
    if not (isinstance(e, Op) and e.op in ("add", "sub")):
        return None
    a, b = e.args
    if e.op == "add" and isinstance(a, Const):
        a, b = b, a
    if not (isinstance(a, Var) and isinstance(b, Const) and float(b.value).is_integer()):
        return None
    c = int(b.value)
    return a.rank, c if e.op == "add" else -c


def _compare(cond: Expr, flat: Expr) -> tuple[str, str | None, int] | None:
    """``k OP p + c`` as (OP, p, c), the key on the left; ``k OP c`` (integral ``c``, a
    static padding length) as (OP, None, c)."""
    if not (isinstance(cond, Op) and cond.op in _FLIP):
        return None
    a, b = cond.args
    op = cond.op
    if b == flat:
        a, b, op = b, a, _FLIP[op]
    if a != flat:
        return None
    if isinstance(b, Const) and float(b.value).is_integer():
        return op, None, int(b.value)
    off = _offset(b)
    return None if off is None else (op, off[0], off[1])


Band = tuple[str | None, int | None, int | None, int | None]  # (query, lo, hi, limit)


def _band(cond: Expr, flat: Expr, visible: bool) -> Band | None:
    """Where ``cond`` is ``visible``: ``p + lo <= k <= p + hi`` and ``k <= limit`` as
    (query rank, lo, hi, limit); the query is None for a static padding bound alone."""
    joint = "and" if visible else "or"
    if isinstance(cond, Op) and cond.op == joint:
        # A constant that cannot decide the joint is left out (``and(1, k <= p)``, as
        # jax.nn.dot_product_attention writes its causal mask).
        args = [a for a in cond.args if not (isinstance(a, Const) and bool(a.value) == visible)]
        if not args or any(isinstance(a, Const) for a in args):
            return None
        parts = [_band(a, flat, visible) for a in args]
        if any(p is None for p in parts):
            return None
        queries = {p[0] for p in parts if p and p[0] is not None}
        if len(queries) > 1:
            return None

        def tightest(k: int, pick: Callable[..., int]) -> int | None:
            return pick((p[k] for p in parts if p and p[k] is not None), default=None)

        query = queries.pop() if queries else None
        return query, tightest(1, max), tightest(2, min), tightest(3, min)
    cmp = _compare(cond, flat)
    if cmp is None:
        return None
    op, q, c = cmp
    op = op if visible else _NOT[op]
    if q is None:  # a static bound: only an upper one (padding) is a band
        return {"le": (None, None, None, c), "lt": (None, None, None, c - 1)}.get(op)
    return (
        q,
        *{
            "le": (None, c),
            "lt": (None, c - 1),
            "ge": (c, None),
            "gt": (c + 1, None),
        }[op],
        None,
    )


def _mask_of(x: Expr, flat: Expr) -> tuple[*Band, float, Expr, bool] | None:
    """(query, lo, hi, limit, fill, unmasked, additive) of a masking expression."""
    if isinstance(x, Op) and x.op == "add":
        for bias, s in (x.args, x.args[::-1]):
            found = _bias(bias, flat)
            if found:
                return *found, s, True
    if isinstance(x, Op) and x.op == "where":
        cond, a, b = x.args
        for visible, keep, fill in ((True, a, b), (False, b, a)):
            if isinstance(fill, Const) and (band := _band(cond, flat, visible)):
                return *band, float(fill.value), keep, False
    return None


def _bias(x: Expr, flat: Expr) -> tuple[*Band, float] | None:
    """``where(cond, 0, fill)`` or ``where(cond, fill, 0)``: (query, lo, hi, limit, fill)."""
    if not (isinstance(x, Op) and x.op == "where"):
        return None
    cond, a, b = x.args
    for visible, zero, fill in ((True, a, b), (False, b, a)):
        if zero == Const(0) and isinstance(fill, Const) and (band := _band(cond, flat, visible)):
            return *band, float(fill.value)
    return None


def mask_query(node: Expr, flat: Expr) -> str | None:
    """The query rank a mask compares the key index with (for choosing the query rank)."""
    found = _mask_of(node, flat)
    return found[0] if found else None


def find_mask(c: Cascade, g: FusedGroup, query: str | None) -> MaskBand | None:
    """The group's first member masking its scores over a band of ``query``."""
    if query is None or g.inner is None:
        return None
    flat = flat_key(g.rank, g.inner)
    for name in g.einsums:
        found = _mask_of(c.writer(name).expr, flat)
        if found is None or found[0] not in (None, query):
            continue
        _, lo, hi, limit, fill, unmasked, additive = found
        if math.isnan(fill) or fill == math.inf:
            continue
        rm = running_max_of(c, g, name, flat)
        bound = score_bound(c, g, unmasked) if additive else None
        return MaskBand(name, lo, hi, fill, unmasked, additive, rm, bound, limit)
    return None


def without_mask(c: Cascade, band: MaskBand) -> Cascade:
    """``c`` with the masking member computing its unmasked scores: the step of a key tile
    every query of the block sees."""
    einsums = tuple(
        Einsum(e.output, e.indices, band.unmasked, e.reduce, e.init, e.loc)
        if e.output == band.member
        else e
        for e in c.einsums
    )
    return c.with_einsums(einsums)


def _unpadded(x: Expr, flat: Expr) -> Expr:
    """``x`` without a tile-padding mask ``where(k < M, x, -inf)`` around it."""
    if (
        isinstance(x, Op)
        and x.op == "where"
        and x.args[2] == Const(-math.inf)
        and isinstance(x.args[0], Op)
        and x.args[0].op == "lt"
        and x.args[0].args[0] == flat
        and isinstance(x.args[0].args[1], Size)
    ):
        return x.args[1]
    return x


def running_max_of(c: Cascade, g: FusedGroup, member: str, flat: Expr) -> str | None:
    """The carried max ``RM`` that the member reaches the state through, if it reaches it only
    as ``LM = max(k0) X``, ``RM' = max(RM, LM)`` and ``exp(X - SM)``, ``SM`` safe ``RM'``."""
    readers = [c.writer(n) for n in g.einsums if member in reads(c.writer(n))]
    local = {e.output for e in readers if e.reduce == "max"}
    local = {n for n in local if isinstance(_unpadded(c.writer(n).expr, flat), Access)}
    carried = {
        t
        for t in g.carried
        if isinstance(x := c.writer(t).expr, Op)
        and x.op == "max"
        and any(isinstance(a, Access) and a.tensor in local for a in x.args)
    }
    if len(carried) != 1:
        return None
    rm = carried.pop()
    for e in readers:
        if e.output in local:
            continue
        x = e.expr
        if not (isinstance(x, Op) and x.op == "exp" and isinstance(x.args[0], Op)):
            return None
        diff = x.args[0]
        if not (diff.op == "sub" and isinstance(diff.args[0], Access)):
            return None
        if diff.args[0].tensor != member or not _is_safe_max(c, diff.args[1], rm, g.rank):
            return None
    return rm


def _is_safe_max(c: Cascade, y: Expr, rm: str, r1: str) -> bool:
    """``y`` reads ``RM[r1+1, ..]`` or ``SM = where(RM[r1+1] > -inf, RM[r1+1], 0)``."""
    if not isinstance(y, Access):
        return False
    next_step = Op("add", (Var(r1), Const(1)))
    if y.tensor == rm:
        return next_step in y.indices
    w = c.writer(y.tensor)
    if w is None or not (isinstance(w.expr, Op) and w.expr.op == "where"):
        return False
    cond, val, other = w.expr.args
    ok = isinstance(val, Access) and val.tensor == rm and next_step in val.indices
    return ok and cond == Op("gt", (val, Const(-math.inf))) and other == Const(0.0)


def score_bound(c: Cascade, g: FusedGroup, s: Expr) -> ScoreBound | None:
    """``s`` as ``c * D`` with ``D = A * B`` summed over one rank, A and B read from outside.

    Casts are looked through: a bfloat16 score rounds by at most 2**-8 relative (twice, with
    its scale), which ``BOUND_SLACK`` covers."""
    scale = 1.0
    s = _uncast(s)
    if isinstance(s, Op) and s.op in ("mul", "div"):
        a, b = s.args
        if s.op == "mul" and isinstance(a, Const):
            a, b = b, a
        if not isinstance(b, Const) or b.value == 0:
            return None
        scale = float(b.value) if s.op == "mul" else 1.0 / float(b.value)
        s = _uncast(a)
    if not (isinstance(s, Access) and s.tensor in g.einsums):
        return None
    d = c.writer(s.tensor)
    x = d.expr
    if d.reduce != "sum" or len(d.reduced_ranks) != 1 or not (isinstance(x, Op) and x.op == "mul"):
        return None
    (r,) = d.reduced_ranks
    operands = []
    for a in x.args:
        if not isinstance(a, Access) or a.tensor not in g.reads:
            return None  # only what the loop reads from outside is at hand before it
        dims = [k for k, i in enumerate(a.indices) if r in rank_vars(i)]
        if len(dims) != 1 or not _shifted(a.indices[dims[0]], r):
            return None
        operands.append((a.tensor, dims[0]))
    return ScoreBound(abs(scale), tuple(operands))


def _shifted(i: Expr, r: str) -> bool:
    """``r`` or ``x + r`` with ``x`` free of ``r`` (heads packed as ``h*D + d``): injective in
    ``r``, so the squares summed over the whole dim bound those the contraction reads."""
    if i == Var(r):
        return True
    return (
        isinstance(i, Op)
        and i.op == "add"
        and i.args[1] == Var(r)
        and r not in rank_vars(i.args[0])
    )


def _uncast(x: Expr) -> Expr:
    while isinstance(x, Op) and x.op in CAST_OPS:
        x = x.args[0]
    return x
