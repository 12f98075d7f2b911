"""T3's fine-grained overlap: a reduce-scatter run as a ppermute ring, fused with its producer.

A reduce-scatter ``RS[x, t0, d] = P[y, x*T0+t0, d]`` over ``X`` devices becomes a ring of
``X-1`` ppermutes. At step ``s`` device ``x`` computes its partial sums for block
``b = mod(x+s+1, X)`` and adds the running sum received from its neighbour::

    RS_P0[x, t0, d] = P[x, mod(x+1, X)*T0+t0, d]       (step 0: own partials for block x+1)
    RS_P1[x, t0, d] = P[x, mod(x+2, X)*T0+t0, d]       (step 1's partials ...)
    RS_R1[x, t0, d] = RS_P0[mod(x+1, X), t0, d]        (... and the neighbour's: ppermute)
    RS_S1[x, t0, d] = RS_P1[x, t0, d] + RS_R1[x, t0, d]
    ...                                 (after X-1 steps, block x holds every partial)

When the reduce-scatter reads its producer plainly and is its only reader, the producer is
*chunked* (T3's fusion): step ``s`` computes only block ``b``'s rows of the matmul, so the
ppermute of step ``s`` depends on nothing that step ``s+1`` computes, and the two overlap.
``chunks=N`` further splits each block's ``T0`` rows into ``N`` independent rings, so the
pipeline is finer; ``bidirectional`` sends the odd chunks round the ring the other way
(``mod(x-1, X)``), using both directions of each link. An all-reduce is first written as a
reduce-scatter plus an all-gather (``reorder-norm``'s rewrite with an empty region), then its
reduce-scatter half is ringed. Every rewrite is exact in real arithmetic; the ring adds the
partial sums in another order, so float results move by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.devices import Communication, collectives
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, rank_vars, rename_ranks
from einfuse.passes.manager import register_pass
from einfuse.passes.overlap_common import (
    Chooser,
    Decision,
    OverlapReport,
    chooser_for,
    fresh,
    int_option,
    int_size,
    not_paying,
    taken_names,
    unpack,
)
from einfuse.passes.reorder_norm import Member, Plan, apply_plan

NAME = "chunk-collective"


@dataclass(frozen=True, slots=True)
class Ring:
    """A reduce-scatter the ring can replace: who it is and what its steps substitute."""

    rs: Einsum
    devices: int
    self_rank: str
    reduced: str
    shard_rank: str  # the scattered dim's shard-local rank (t0)
    shard_dim: int
    producer: Einsum | None  # fused into the steps when not None


@register_pass(NAME)
def chunk_collective(
    c: Cascade,
    chunks: int | str = 1,
    bidirectional: bool = False,
    target: str = "",
    cost: str = "",
) -> Cascade:
    """Every reduce-scatter (and all-reduce) as a ring over its chunked producer; ``target``
    names one collective to ring (default: all); ``chunks=auto`` asks the cost model on the
    hardware target ``cost`` (or the one ``cost_target`` sets)."""
    return chunk_collective_with_report(c, chunks, bidirectional, target, cost=cost)[0]


def chunk_collective_with_report(
    c: Cascade,
    chunks: int | str = 1,
    bidirectional: bool = False,
    target: str = "",
    chooser: Chooser | None = None,
    cost: str = "",
    plan_only: bool = False,
) -> tuple[Cascade, OverlapReport]:
    """``chunk-collective`` and why each collective was or was not ringed. ``chunks="auto"``
    asks ``chooser(cascade, collective)`` (default: the cost model's on ``cost``) for the
    count; None skips it. ``plan_only`` decides without rewriting (the autotuner prices the
    decisions; a ring of ``X * chunks`` steps is thousands of Einsums to build)."""
    if chunks != "auto":
        int_option(NAME, "chunks", chunks, 1)
    elif chooser is None:
        chooser = chooser_for(NAME, "chunks", "chunks", cost, bidirectional=bidirectional)
    decisions = []
    names = [m.einsum for m in collectives(c) if m.kind in ("reduce_scatter", "all_reduce")]
    if target:
        names = [n for n in names if n == target]
        if not names:
            return c, OverlapReport(NAME, (Decision(target, False, "not a reduction"),))
    for name in names:
        n, why = unpack(chooser(c, name)) if chunks == "auto" and chooser else (chunks, "")
        if n is None:
            decisions.append(Decision(name, False, not_paying(why)))
            continue
        comm = next(m for m in collectives(c) if m.einsum == name)
        c, decision = _one(c, comm, int(n), bidirectional, plan_only)
        if why and decision.applied:
            decision = Decision(name, True, f"{decision.reason}; cost model: {why}")
        decisions.append(decision)
    return c, OverlapReport(NAME, tuple(decisions))


def _one(
    c: Cascade, comm: Communication, n: int, both: bool, plan_only: bool = False
) -> tuple[Cascade, Decision]:
    name = comm.einsum
    if both and n % 2:
        return c, Decision(name, False, f"bidirectional needs an even chunk count, not {n}")
    work, name0 = c, name
    if comm.kind == "all_reduce":
        split = _scatter_then_gather(c, comm, n)
        if isinstance(split, str):
            return c, Decision(name, False, split)
        work, name = split
        comm = next(m for m in collectives(work) if m.einsum == name)
    ring = plan_ring(work, comm, n)
    if isinstance(ring, str):
        return c, Decision(name0, False, ring)
    out = c if plan_only else _apply(work, ring, n, both)
    fused = f"producer {ring.producer.output} chunked" if ring.producer else "producer kept"
    gather = f" (all-reduce {name0}: then an all-gather)" if name0 != comm.einsum else ""
    how = f"{ring.devices - 1}-step ring x {n} chunks{' both ways' if both else ''}"
    return out, Decision(name0, True, f"{how}, {fused}{gather}")


def _scatter_then_gather(c: Cascade, comm: Communication, n: int) -> tuple[Cascade, str] | str:
    """An all-reduce as reduce-scatter + all-gather along its first token-like dim."""
    e = c.writer(comm.einsum)
    assert e is not None
    devices = int_size(c, comm.reduced_rank or "")
    for dim, i in enumerate(e.indices):
        if not isinstance(i, Var) or c.device_axis(i.rank) is not None:
            continue
        size = int_size(c, i.rank)
        if devices and size and size % (devices * n) == 0:
            plan = Plan(comm.axis, size, devices, (Member(e, i.rank, dim),), (e.output,))
            out = apply_plan(c, plan)
            return out, next(m.einsum for m in collectives(out) if m.kind == "reduce_scatter")
    return f"no dim of {e.output} splits into {devices} devices x {n} chunks"


def plan_ring(c: Cascade, comm: Communication, n: int) -> Ring | str:
    """The ring for one reduce-scatter, or why not."""
    rs = c.writer(comm.einsum)
    assert rs is not None
    x, y = comm.self_rank, comm.reduced_rank
    devices = int_size(c, y or "")
    if x is None or y is None or devices is None:
        return "the device count must be a bound integer"
    if rs.reduce != "sum":
        return f"a {rs.reduce} reduce-scatter: the ring adds partial sums"
    if set(rs.reduced_ranks) != {y}:
        return f"it also reduces {', '.join(r for r in rs.reduced_ranks if r != y)}"
    shard = _shard_rank(rs, x)
    if isinstance(shard, str):
        return shard
    rank, dim = shard
    size = int_size(c, rank)
    if size is None or size % n:
        return f"its shard rank {rank} ({c.size(rank)}) does not split into {n} chunks"
    return Ring(rs, devices, x, y, rank, dim, _fusable_producer(c, rs, comm))


def _shard_rank(rs: Einsum, x: str) -> tuple[str, int] | str:
    """The left rank that indexes within a block (``t0`` of ``x*T0+t0``), and its dim."""
    found = set()
    for a in [e for e in rs.expr.walk() if isinstance(e, Access)]:
        for i in a.indices:
            vs = rank_vars(i)
            if x in vs:
                found |= set(vs) - {x}
    left = [i.rank if isinstance(i, Var) else None for i in rs.indices]
    cands = [r for r in found if r in left]
    if len(cands) != 1:
        return f"no single shard rank beside {x} in its reads (found {sorted(found) or 'none'})"
    return cands[0], left.index(cands[0])


def _fusable_producer(c: Cascade, rs: Einsum, comm: Communication) -> Einsum | None:
    """The producer the steps may compute chunk by chunk: read plainly, by the ring alone."""
    if not isinstance(rs.expr, Access):
        return None
    p = c.writer(rs.expr.tensor)
    if p is None or p.init is not None or p.is_recurrence or p.output in c.outputs:
        return None
    if len(c.consumers(p.output)) != 1 or not all(isinstance(i, Var) for i in p.indices):
        return None
    # Its summed ranks must not meet the ranks of the reduce-scatter's side (t0, the ring's
    # own), or inlining it would capture them.
    if set(p.reduced_ranks) & (set(rs.ranks) | {r for r, _ in c.devices}):
        return None
    return p


def _apply(c: Cascade, ring: Ring, n: int, both: bool) -> Cascade:
    rs, x, X = ring.rs, ring.self_rank, ring.devices
    taken = taken_names(c)
    t0 = ring.shard_rank
    sizes = {}
    if n > 1:
        t00 = fresh(f"{t0}0", taken)
        taken |= {t00, t00.upper()}
        sizes[t00] = int_size(c, t0) // n  # type: ignore[operator]
    else:
        t00 = t0
    left = list(rs.indices)
    left[ring.shard_dim] = Var(t00)
    base = rs.output.removesuffix("_SH")
    lt = tuple(left)
    new: list[Einsum] = []
    finals = []
    for k in range(n):
        back = both and k % 2 == 1
        within = _row(k, t00) if n > 1 else Var(t0)
        src = Op("mod", (Op("sub" if back else "add", (Var(x), Const(1))), Size(x)))
        sent = tuple(src if isinstance(i, Var) and i.rank == x else i for i in left)
        acc = ""
        for s in range(X):
            names = [fresh(f"{base}_{kind}{s}{f'_{k}' if n > 1 else ''}", taken) for kind in "PRS"]
            taken |= set(names)
            prev = acc
            part, recv, acc = names
            summand = _summand(ring, _block(x, s, X, back), within)
            new.append(Einsum(part, lt, summand))
            if s == 0:
                acc = part
                continue
            new.append(Einsum(recv, lt, Access(prev, sent)))
            new.append(Einsum(acc, lt, Op("add", (Access(part, lt), Access(recv, lt)))))
        finals.append(acc)
    new.append(Einsum(rs.output, rs.indices, _concat(finals, rs.indices, ring, t00), loc=rs.loc))
    drop = {rs.output} | ({ring.producer.output} if ring.producer else set())
    einsums = []
    for e in c.einsums:
        if e.output == rs.output:
            einsums += new
        elif e.output not in drop:
            einsums.append(e)
    return c.with_einsums(einsums).with_sizes(**sizes)


def _row(k: int, t00: str) -> Expr:
    """Row ``t00`` of chunk ``k`` within a block: ``t00``, ``T00+t00``, ``k*T00+t00``."""
    if k == 0:
        return Var(t00)
    step = Size(t00) if k == 1 else Op("mul", (Const(k), Size(t00)))
    return Op("add", (step, Var(t00)))


def _block(x: str, s: int, X: int, back: bool) -> Expr:
    """The block device ``x`` works on at step ``s``: ``mod(x+s+1, X)`` (or ``x-s-1``)."""
    if s == X - 1:
        return Var(x)
    return Op("mod", (Op("sub" if back else "add", (Var(x), Const(s + 1))), Size(x)))


def _summand(ring: Ring, block: Expr, within: Expr) -> Expr:
    """Device ``x``'s partial sums for ``block``'s rows ``within``: the reduce-scatter's body
    read at its own device (``y -> x``) and that block, or its producer's body there."""
    x, y = ring.self_rank, ring.reduced
    body = rename_ranks(ring.rs.expr, {y: Var(x), x: block, ring.shard_rank: within})
    if ring.producer is None:
        return body
    assert isinstance(body, Access)
    p = ring.producer
    mapping = {i.rank: idx for i, idx in zip(p.indices, body.indices)}  # type: ignore[union-attr]
    return rename_ranks(p.expr, mapping)


def _concat(finals: list[str], out_left: tuple[Expr, ...], ring: Ring, t00: str) -> Expr:
    """The reduce-scatter's output from its chunks' last steps (reads past a chunk give 0)."""
    terms: list[Expr] = []
    for k, name in enumerate(finals):
        idx = list(out_left)
        t0 = Var(ring.shard_rank)
        # t0-k*T00 even for k = 0: a plain t0 would index the T00-long chunk with a T0 rank.
        idx[ring.shard_dim] = Op("sub", (t0, Op("mul", (Const(k), Size(t00)))))
        terms.append(Access(name, tuple(idx)) if len(finals) > 1 else Access(name, out_left))
    out = terms[0]
    for t in terms[1:]:
        out = Op("add", (out, t))
    return out
