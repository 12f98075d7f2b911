"""Multi-Einsum steps of the cascade builder: softmax chains and recurrences.

These are the shapes the fusion pass targets, so they are built on purpose rather than
left to chance: the 3-pass softmax (max, exp(x - max), sum, divide; optionally masked
with -inf, optionally with the division deferred past a V contraction), FuseMax's 1-pass
form (running max and rescaled running sums), and plain running sums and maxima.
Intervals here are set from what the math guarantees (exp(x - max) is in [0, 1]).
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, rank_vars
from tests.strategy_builder import NEG_INF, RANK_LIMIT, CascadeBuilder, plus
from tests.strategy_exprs import Val, pick, scale_down
from tests.strategy_values import UNIT, Interval, point


def score_operand(b: CascadeBuilder, in_use: set[str]) -> Val:
    """A finite, moderate operand with at least one rank, for softmax-like chains."""
    s = b.operand(in_use, limit=3, min_ranks=1)
    return scale_down(s) if b.safe else s


def softmax(b: CascadeBuilder, budget: int) -> bool:
    """max, exp(x - max), sum, divide; optionally masked, optionally times V deferred."""
    in_use: set[str] = set()
    s = score_operand(b, in_use)
    ranks = rank_vars(s.expr)
    r = b.draw(st.sampled_from(ranks))
    kept = [q for q in ranks if q != r]
    n = b.sizes[r]
    mask = pick(b.draw, [(2, "none"), (1 if kept else 0, "causal"), (1, "prefix")])
    src: Expr = s.expr
    if mask != "none":
        if mask == "causal":
            cond = Op("le", (Var(r), Var(b.draw(st.sampled_from(kept)))))
        else:
            cond = Op("lt", (Var(r), Const(b.draw(st.integers(1, n)))))
        src = Op("where", (cond, s.expr, NEG_INF))
        if budget >= 5 and b.draw(st.booleans()):
            ms = b.emit(ranks, Val(src, Interval(-math.inf, s.iv.hi)), poolable=False)
            src = Access(ms.name, tuple(Var(q) for q in ranks))
            budget -= 1
    gm = b.emit(kept, Val(src, s.iv), "max")
    gm_read = Access(gm.name, tuple(Var(q) for q in kept))
    low = 0.0 if mask != "none" else math.exp(s.iv.lo - s.iv.hi)
    sn = b.emit(
        b.out_order([r, *kept]),
        Val(Op("exp", (Op("sub", (src, gm_read)),)), Interval(low, 1)),
    )
    sn_read = Access(sn.name, tuple(Var(q) for q in sn.ranks))
    sd = b.emit(b.out_order(kept), Val(sn_read, Interval(1.0, n)))
    sd_read = Access(sd.name, tuple(Var(q) for q in sd.ranks))
    if budget >= 5 and b.draw(st.booleans()):  # GM, SN, SD, NV, AV
        v = b.operand(in_use, limit=RANK_LIMIT + 1, min_ranks=1)
        in_v = [q for q in rank_vars(v.expr) if q not in ranks or q == r]
        nv = b.emit(
            [q for q in in_v if q != r] + kept,
            Val(Op("mul", (sn_read, v.expr)), v.iv.hull(point(0)).summed(n)),
        )
        nv_read = Access(nv.name, tuple(Var(q) for q in nv.ranks))
        b.emit(nv.ranks, Val(Op("div", (nv_read, sd_read)), nv.iv.hull(point(0))))
    else:
        b.emit(sn.ranks, Val(Op("div", (sn_read, sd_read)), UNIT))
    return True


def online_softmax(b: CascadeBuilder, budget: int) -> bool:
    """FuseMax's 1-pass form: running max RM, rescaled running sum RD (and numerator)."""
    in_use: set[str] = set()
    s = score_operand(b, in_use)
    ranks = rank_vars(s.expr)
    r = b.draw(st.sampled_from(ranks))
    kept = [q for q in ranks if q != r]
    n, pos = b.sizes[r], b.draw(st.integers(0, len(kept)))

    def at(step: Expr, name: str, lead: tuple[Expr, ...] = ()) -> Access:
        idx = [Var(q) for q in kept]
        idx.insert(pos, step)
        return Access(name, lead + tuple(idx))

    rm = f"T{len(b.einsums) + 1}"
    rm_step = Op("max", (at(Var(r), rm), s.expr))
    b.emit(at(plus(r, 1), rm).indices, Val(rm_step, s.iv), init=NEG_INF, poolable=False)
    rescale = Op("exp", (Op("sub", (at(Var(r), rm), at(plus(r, 1), rm))),))
    fresh = Op("exp", (Op("sub", (s.expr, at(plus(r, 1), rm))),))
    rd = f"T{len(b.einsums) + 1}"
    rd_step = Op("add", (Op("mul", (at(Var(r), rd), rescale)), fresh))
    b.emit(
        at(plus(r, 1), rd).indices,
        Val(rd_step, Interval(1.0, n)),
        init=Const(0),
        iterative_dim=pos,
        init_iv=point(0),
    )
    final = Size(r)
    if budget >= 4 and b.draw(st.booleans()):
        spare = [q for q in b.base_ranks if q not in ranks]
        v_ranks = (b.draw(st.sampled_from(spare)), r) if spare else (r,)
        v = b.plain(b.new_input(v_ranks))
        lead = tuple(Var(q) for q in v_ranks[:-1])
        nv = f"T{len(b.einsums) + 1}"
        step = Op("add", (Op("mul", (at(Var(r), nv, lead), rescale)), Op("mul", (fresh, v.expr))))
        b.emit(
            at(plus(r, 1), nv, lead).indices,
            Val(step, v.iv.hull(point(0)).summed(n)),
            init=Const(0),
            iterative_dim=pos + len(lead),
            init_iv=point(0),
        )
        ratio = Op("div", (at(final, nv, lead), at(final, rd)))
        b.emit([*v_ranks[:-1], *kept], Val(ratio, v.iv))
    elif b.draw(st.booleans()):
        lse = Op("add", (Op("log", (at(final, rd),)), at(final, rm)))
        b.emit(kept, Val(lse, Interval(s.iv.lo, s.iv.hi + math.log(n))))
    else:
        b.emit(kept, Val(at(final, rd), Interval(1.0, n)))
    return True


def recurrence(b: CascadeBuilder, budget: int) -> bool:
    """A running sum / max / min / decayed sum along one rank, with an initial value."""
    in_use: set[str] = set()
    g = b.expr_gen(in_use)
    x = b.operand(in_use, min_ranks=1)
    x = g.bounded(x, 8.0)
    ranks = rank_vars(x.expr)
    r = b.draw(st.sampled_from(ranks))
    kept = [q for q in ranks if q != r]
    pos, n = b.draw(st.integers(0, len(kept))), b.sizes[r]
    kind = b.draw(st.sampled_from(("sum", "max", "min", "decay")))
    inits = {"sum": 0, "decay": 1.5, "max": -math.inf, "min": math.inf}
    init_val: Expr = Const(inits[kind])
    init_iv = point(inits[kind])
    if not math.isfinite(inits[kind]) and (budget < 2 or b.draw(st.booleans())):
        init_val, init_iv = Const(-1.0 if kind == "max" else 1.0), point(1.0)
    sources = [t for t in b.pool if t.iterative_dim is None and set(t.ranks) <= set(kept)]
    if sources and b.draw(st.integers(0, 5)) == 0:
        src = b.draw(st.sampled_from(sources))
        init_val, init_iv = Access(src.name, tuple(Var(q) for q in src.ranks)), src.iv
    name = f"T{len(b.einsums) + 1}"

    def at(step: Expr) -> tuple[Expr, ...]:
        idx: list[Expr] = [Var(q) for q in kept]
        idx.insert(pos, step)
        return tuple(idx)

    prev = Access(name, at(Var(r)))
    if kind == "sum":
        step, iv = Op("add", (prev, x.expr)), x.iv.hull(point(0)).summed(n)
        iv = Interval(iv.lo + init_iv.lo, iv.hi + init_iv.hi)
    elif kind == "decay":
        step = Op("add", (Op("mul", (prev, Const(0.5))), x.expr))
        bound = init_iv.bound + 2 * x.iv.bound
        iv = Interval(-bound, bound)
    else:
        step, f = Op(kind, (prev, x.expr)), max if kind == "max" else min
        iv = x.iv
        if init_iv.finite:
            iv = Interval(f(x.iv.lo, init_iv.lo), f(x.iv.hi, init_iv.hi))
    t = b.emit(at(plus(r, 1)), Val(step, iv), init=init_val, iterative_dim=pos, init_iv=init_iv)
    if not init_iv.finite:  # step 0 is infinite: read the last step right away
        b.emit(b.out_order(kept), Val(Access(t.name, at(Size(r))), iv))
    return True
