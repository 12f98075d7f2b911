"""FuseMax fusion: rewrite a multi-pass softmax-then-contract chain into one pass.

For a rank ``m`` that the cascade traverses several times (``pass_counts``), the pass

1. partitions ``m -> m1, m0`` (unless done already), after folding a constant scale of the
   scores into an operand (``fold-scale``: the loop then never rescales a score tile),
2. defers divisions past sums over ``m1`` (``defer-division``),
3. for every max ``G`` over ``m1`` read inside the loop, replaces it by a running max
   ``RM`` carried along ``m1``; values computed against it (``scale`` analysis) read the
   "safe" running max ``SM``, and every sum of them becomes a running sum rescaled by
   ``PRM = exp(M_old - M_new)`` as the max grows. A running max that a later pass reads
   at its last step (``RM[M1, p]`` in 2-pass attention) is treated the same way,
4. turns the remaining reductions over ``m1`` into running ones, removes dead Einsums,
5. keeps the result only if ``m1`` now takes exactly one pass; otherwise returns the
   cascade unchanged and says why in the ``FuseReport`` (for ``explain``).

``fused_groups`` then names the Einsums that share the loop over ``m1``, for the
backends to emit as one blockwise loop. Fusion changes rounding (the order of the
sums), never values: every rewrite is exact in real arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum, Partition
from einfuse.ir.dtypes import add_dtypes, cast, expr_dtype, keep_output_dtypes, tensor_dtypes
from einfuse.ir.errors import EinfuseError, VerifyError
from einfuse.ir.expr import (
    Access,
    Const,
    Expr,
    Op,
    Size,
    Var,
    accesses,
    rank_vars,
    rename_ranks,
    substitute,
)
from einfuse.ir.verify import verify
from einfuse.passes.dce import reads, remove_unread, unread
from einfuse.passes.defer import defer, unique_name
from einfuse.passes.fold_scale import fold_scale
from einfuse.passes.manager import record_steps, register_pass
from einfuse.passes.partition import PartitionError, partition, whole_outputs
from einfuse.passes.pass_count import RankPasses, analyze_rank, pass_counts
from einfuse.passes.scale import ChainPlan, MaxSource, NotFusable, analyze_chain, max_sources
from einfuse.passes.sink_casts import sink_casts


class FuseError(EinfuseError):
    """A ``fuse`` option names a rank the cascade lacks, or a tile that is no tile."""


@dataclass(frozen=True, slots=True)
class RankFusion:
    """The outcome for one rank: fused or not, and why."""

    rank: str
    fused: bool
    reason: str
    passes_before: int
    passes_after: int

    def __str__(self) -> str:
        verdict = "fused" if self.fused else "not fused"
        passes = f"{self.passes_before} -> {self.passes_after} passes"
        return f"{self.rank}: {verdict} ({passes}): {self.reason}"


@dataclass(frozen=True, slots=True)
class FuseReport:
    ranks: tuple[RankFusion, ...]

    @property
    def fused(self) -> bool:
        return any(r.fused for r in self.ranks)

    def explain(self) -> str:
        return "\n".join(map(str, self.ranks)) or "fuse: no rank takes more than one pass"


@register_pass("fuse")
def fuse(c: Cascade, rank: str = "", tile: int = 512) -> Cascade:
    """Fuse ``rank`` (default: every reduced-away rank taking several passes) into one pass."""
    return fuse_with_report(c, rank=rank, tile=tile)[0]


def fuse_with_report(c: Cascade, rank: str = "", tile: int = 512) -> tuple[Cascade, FuseReport]:
    """``fuse`` and, per rank, whether it fused and why (or why not)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise FuseError(f"fuse: tile must be a positive integer, got {tile!r}")
    outcomes = []
    for r in [rank] if rank else _multi_pass_ranks(c):
        c, outcome = _fuse_rank(c, r, tile)
        outcomes.append(outcome)
    return c, FuseReport(tuple(outcomes))


def _multi_pass_ranks(c: Cascade) -> list[str]:
    """Ranks taking more than one pass, a partitioned rank by its original name."""
    out: dict[str, None] = {}
    for r, n in pass_counts(c).items():
        p = _partition_of(c, r)
        if n > 1 and (p is None or r == p.outer):
            out.setdefault(p.rank if p else r)
    return list(out)


def _partition_of(c: Cascade, rank: str) -> Partition | None:
    return next((p for p in c.partitions if rank in (p.rank, p.outer, p.inner)), None)


def _fuse_rank(c: Cascade, rank: str, tile: int) -> tuple[Cascade, RankFusion]:
    if rank not in c.all_ranks() and not any(p.rank == rank for p in c.partitions):
        raise FuseError(f"fuse: no rank {rank!r}; ranks: {', '.join(c.all_ranks())}")
    p = _partition_of(c, rank)
    if p is not None and rank == p.inner:
        raise FuseError(f"fuse: {rank} is the inner rank of partition {p.rank}; name {p.rank}")
    before = analyze_rank(c, p.outer if p else rank).passes

    def unchanged(reason: str) -> tuple[Cascade, RankFusion]:
        return c, RankFusion(rank, False, reason, before, before)

    if before <= 1:
        return unchanged("already one pass")
    whole = whole_outputs(c, rank)
    outputs = [o for o in c.outputs if rank in c.tensor_ranks(o) and o not in whole]
    if outputs:
        return unchanged(f"output {outputs[0]} has rank {rank}: it must be written whole")
    work = c
    steps: list[tuple[str, Cascade]] = []
    if p is None:
        try:
            work = fold_scale(sink_casts(c), rank)
            steps.append((f"sink-casts, fold-scale{{rank={rank}}}", work))
            work, p = _partition(work, rank, tile)
            steps.append((f"partition {rank} -> {p.outer}, {p.inner} by {p.tile}", work))
        except (PartitionError, VerifyError) as exc:
            return unchanged(f"cannot partition: {exc}")
    work = defer(work, {p.outer})
    steps.append((f"defer-division over {p.outer}", work))
    work, done, problems = _online(work, p)
    steps.append((f"running maxima over {p.outer}", work))
    dead_before = unread(c)  # dead code the rewrite did not make is not ours to remove
    work = _running_reductions(work, p.outer)
    work = remove_unread(work, only={e.output for e in work.einsums} - dead_before)
    after = analyze_rank(work, p.outer)
    if after.passes != 1:
        return unchanged(
            f"{_why_not(after, problems)}; {p.outer} would still take {after.passes} passes"
        )
    work = keep_output_dtypes(c, work)
    record_steps(tuple(steps))  # the last rewrite (running sums, dce) is fuse's own result
    what = f"running max {', '.join(done)}; " if done else ""
    carried = [e.output for e in work.einsums if e.iterative_rank == p.outer]
    reason = f"{what}one loop over {p.outer} carrying {', '.join(carried)}"
    return work, RankFusion(rank, True, reason, before, 1)


def _why_not(after: RankPasses, problems: list[str]) -> str:
    """The first chain that could not be rewritten, else the read that still waits."""
    if problems:
        return problems[0]
    waits = next((s for s in reversed(after.steps) if s.waits_for), None)
    return f"{waits.einsum} needs {waits.waits_for} complete" if waits else "no max to carry"


def _partition(c: Cascade, rank: str, tile: int) -> tuple[Cascade, Partition]:
    """Split ``rank``; only ranks read plainly (``X[m]``), as a tile's padding is masked
    only for those (``X[m-1]`` past the end reads real data)."""
    for e in c.einsums:
        for a in accesses(e.expr):
            for i in a.indices:
                if rank in rank_vars(i) and i != Var(rank):
                    raise PartitionError(f"{e.output} reads {a}, not by {rank} itself")
    size = c.size(rank)
    if isinstance(size, int):
        tile = min(tile, size)
    used = set(c.all_ranks())
    outer, inner = f"{rank}1", f"{rank}0"
    while outer in used or inner in used:
        outer, inner = f"{outer}_", f"{inner}_"
    out = verify(partition(c, rank, tile, outer, inner, keep=_key_side(c, rank)))
    return out, out.partitions[-1]


def _key_side(c: Cascade, rank: str) -> frozenset[str]:
    """Tensors along the key rank that lack some rank of its max (a K or V projection, RoPE
    of K: no query rank): computed once before the loop, not once per query block inside it.
    A score (every rank of the max, and the key rank) stays in the loop, never built whole."""
    maxes = [e for e in c.einsums if e.reduce == "max" and rank in e.reduced_ranks]
    if not maxes:
        return frozenset()
    state = set.intersection(*(set(e.output_ranks) for e in maxes))
    return frozenset(
        e.output for e in c.einsums if rank in e.output_ranks and not state <= set(e.output_ranks)
    )


# --------------------------------------------------------------------------- the online rewrite
def _online(c: Cascade, p: Partition) -> tuple[Cascade, list[str], list[str]]:
    """Rewrite every max over the outer rank read inside the loop; collect what failed."""
    done: list[str] = []
    problems: list[str] = []
    tried: set[str] = set()
    while (src := next((s for s in max_sources(c, p) if s.tensor not in tried), None)) is not None:
        tried.add(src.tensor)
        inlined = _inline_aliases(c, src)
        try:
            plan = analyze_chain(inlined, src)
        except NotFusable as exc:
            problems.append(str(exc))
            continue
        if plan.loop:
            c, rm = _rewrite(inlined, plan)
            done.append(rm)
            tried.add(rm)
    return c, done, problems


def _inline_aliases(c: Cascade, src: MaxSource) -> Cascade:
    """Inline elementwise functions of G (``GB[p] = max(GM[p], -inf)``) into loop readers,
    so the loop reads G itself, which the rewrite replaces by the running max."""
    aliases: dict[str, Einsum] = {}
    for e in c.einsums:
        if e.reduced_ranks or e.is_recurrence or src.rank in e.ranks:
            continue
        if any(src.read_at(a) is not None or a.tensor in aliases for a in accesses(e.expr)):
            aliases[e.output] = e

    def inline(node: Expr) -> Expr | None:
        if not (isinstance(node, Access) and node.tensor in aliases):
            return None
        if not all(isinstance(i, Var) for i in node.indices):
            return None
        w = aliases[node.tensor]
        body = rename_ranks(w.expr, dict(zip(w.output_ranks, node.indices, strict=True)))
        return substitute(body, inline)

    if not aliases:
        return c
    einsums = [
        Einsum(e.output, e.indices, substitute(e.expr, inline), e.reduce, e.init, loc=e.loc)
        if src.rank in e.ranks
        else e
        for e in c.einsums
    ]
    return c.with_einsums(einsums)


def _safe(x: Expr) -> Expr:
    """``x``, or 0 where it is -inf: a fully masked prefix then gives exp(-inf - 0) = 0."""
    return Op("where", (Op("gt", (x, Const(-math.inf))), x, Const(0.0)))


def _rewrite(c: Cascade, plan: ChainPlan) -> tuple[Cascade, str]:
    src = plan.src
    r1 = src.rank
    taken = {t.name for t in c.inputs} | {e.output for e in c.einsums}

    def fresh(name: str) -> str:
        out = unique_name(name, taken)
        taken.add(out)
        return out

    step, nxt, o = Var(r1), Op("add", (Var(r1), Const(1))), src.out
    dtypes = tensor_dtypes(c)
    new: list[Einsum] = []
    rm = src.tensor
    g = c.writer(src.tensor)
    assert g is not None
    if src.running_dim is None:
        rm, local = fresh("RM"), g.expr
        if len(g.reduced_ranks) > 1:
            lm = fresh("LM")
            new.append(Einsum(lm, (step, *o), g.expr, "max", loc=g.loc))
            local = Access(lm, (step, *o))
        new_max = Op("max", (Access(rm, (step, *o)), widened(local, dtypes)))
        new.append(Einsum(rm, (nxt, *o), new_max, init=Const(-math.inf), loc=g.loc))
        new.append(Einsum(g.output, g.indices, Access(rm, (Size(r1), *o)), loc=g.loc))
    else:
        new.append(g)

    def running_max(k: Expr) -> Access:
        if src.running_dim is None:
            return Access(rm, (k, *o))
        idx = list(g.indices)
        idx[src.running_dim] = k
        return Access(rm, tuple(idx))

    sm = fresh("SM")
    new.append(Einsum(sm, (step, *o), _safe(running_max(nxt))))
    prm: dict[float, str] = {}
    for scale in plan.scales:
        prm[scale] = fresh("PRM")
        shift: Expr = Op("sub", (running_max(step), Access(sm, (step, *o))))
        if scale != 1:
            shift = Op("mul", (Const(float(scale)), shift))
        # Nothing to rescale before the first step, nor while every score so far was -inf
        # (the sums are still 0; a sliding window's first tiles): there exp(0 - SM) could
        # overflow and 0 * inf give NaN. Elsewhere RM <= SM, so exp never overflows.
        seen = Op(
            "and", (Op("gt", (step, Const(0))), Op("gt", (running_max(step), Const(-math.inf))))
        )
        new.append(
            Einsum(prm[scale], (step, *o), Op("where", (seen, Op("exp", (shift,)), Const(1.0))))
        )

    def to_running(node: Expr) -> Expr | None:
        at = src.read_at(node) if isinstance(node, Access) else None
        return Access(sm, (step, *at)) if at is not None else None

    out: list[Einsum] = []
    written = {t.name: t.dtype for t in c.inputs}  # the dtypes of ``out``, as it grows

    def emit(einsums: list[Einsum]) -> None:
        out.extend(einsums)
        add_dtypes(written, einsums)

    for e in c.einsums:
        if e.output == g.output:
            emit(new)
            continue
        if e.output not in plan.loop:
            emit([e])
            continue
        e = Einsum(e.output, e.indices, substitute(e.expr, to_running), e.reduce, e.init, loc=e.loc)
        td = plan.running.get(e.output)
        if td is None:
            emit([e])
            continue
        at = tuple(e.indices[d] for d in td.dims)
        rescale = Access(prm[td.coef], (step, *at))
        emit(_running(e, r1, taken, rescale, written))
    return c.with_einsums(out), rm


def _stem(name: str) -> str:
    """FuseMax's naming: the sum ``SD`` runs as ``RD`` (``SNV`` as ``RNV``); long names stay."""
    return name[1:] if 1 < len(name) <= 3 and name[0] in "SG" else name


def widened(x: Expr, dtypes: dict[str, str]) -> Expr:
    """``x`` in at least float32: the state a loop carries across steps never rounds to
    bfloat16 (a product's factors are cast each, so a bfloat16 ``P V`` stays one dot that
    accumulates in float32, as flash kernels run it)."""
    if expr_dtype(x, dtypes.get) not in ("bfloat16", "float16"):
        return x
    if isinstance(x, Op) and x.op == "mul":
        return Op("mul", tuple(widened(a, dtypes) for a in x.args))
    return cast("float32", x)


def _running(
    e: Einsum, r1: str, taken: set[str], rescale: Expr | None, dtypes: dict[str, str]
) -> list[Einsum]:
    """``S[o] = reduce(r1, rest) x`` as ``L[r1, o] = reduce(rest) x``, a recurrence
    ``R[r1+1, o] = R[r1, o] (*rescale) (+) L[r1, o]`` and ``S[o] = R[R1, o]``; ``L`` and
    ``R`` in at least float32 (``dtypes`` holds those of what ``x`` reads)."""
    step, o = Var(r1), e.indices
    out: list[Einsum] = []
    local = widened(e.expr, dtypes)
    if len(e.reduced_ranks) > 1:
        lname = unique_name(f"L{_stem(e.output)}", taken)
        taken.add(lname)
        out.append(Einsum(lname, (step, *o), local, e.reduce, loc=e.loc))
        local = Access(lname, (step, *o))
    rname = unique_name(f"R{_stem(e.output)}", taken)
    taken.add(rname)
    prev: Expr = Access(rname, (step, *o))
    if rescale is not None:
        prev = Op("mul", (prev, rescale))
    combine = {"sum": ("add", 0.0), "max": ("max", -math.inf), "min": ("min", math.inf)}
    combine["prod"] = ("mul", 1.0)
    op, init = combine[e.reduce]
    body = Op(op, (local, prev) if op == "add" else (prev, local))
    nxt = Op("add", (step, Const(1)))
    out.append(Einsum(rname, (nxt, *o), body, init=Const(init), loc=e.loc))
    out.append(Einsum(e.output, o, Access(rname, (Size(r1), *o)), loc=e.loc))
    return out


def _running_reductions(c: Cascade, r1: str) -> Cascade:
    """Every remaining reduction over the loop rank accumulates across steps instead, so
    each Einsum of the loop writes one step (what ``fused_groups`` promises)."""
    taken = {t.name for t in c.inputs} | {e.output for e in c.einsums}
    dtypes = tensor_dtypes(c)
    out: list[Einsum] = []
    for e in c.einsums:
        if e.is_recurrence or r1 not in e.reduced_ranks:
            out.append(e)
        else:
            out.extend(_running(e, r1, taken, None, dtypes))
    return c.with_einsums(out)


# --------------------------------------------------------------------------- fused groups
@dataclass(frozen=True, slots=True)
class FusedGroup:
    """Einsums that share one loop over ``rank``, for a backend to emit as one kernel.

    Each step of the loop evaluates ``einsums`` in order with ``rank`` fixed; ``carried``
    are the recurrences along ``rank`` (their state crosses steps), ``reads`` what the
    loop reads from outside it, ``results`` what is read after it (or is an output).
    Every other Einsum of the cascade runs before the loop (it reads nothing of it) or
    after it. A member that reduces over ``rank`` accumulates across steps; ``fuse``
    leaves none (it makes them recurrences), but a hand-written cascade may have them.
    """

    rank: str
    inner: str | None
    einsums: tuple[str, ...]
    carried: tuple[str, ...]
    reads: tuple[str, ...]
    results: tuple[str, ...]


def fused_groups(c: Cascade) -> list[FusedGroup]:
    """One group per rank carried by a recurrence and traversed in a single pass."""
    groups = []
    ranks = dict.fromkeys(e.iterative_rank for e in c.einsums if e.iterative_rank)
    for r in ranks:
        if r is None or analyze_rank(c, r).passes != 1:
            continue
        members = [e for e in c.einsums if r in e.ranks]
        names = {e.output for e in members}
        outside = dict.fromkeys(t for e in members for t in reads(e) if t not in names)
        after = {t for e in c.einsums if e.output not in names for t in reads(e)}
        results = [e.output for e in members if e.output in after or e.output in c.outputs]
        inner = next((p.inner for p in c.partitions if p.outer == r), None)
        carried = tuple(e.output for e in members if e.iterative_rank == r)
        groups.append(
            FusedGroup(
                r, inner, tuple(e.output for e in members), carried, tuple(outside), tuple(results)
            )
        )
    return groups
