"""Pass-count analysis (FuseMax section III): a lower bound on the traversals of each rank.

A *pass* over rank ``r`` is one traversal of its fibers. An Einsum that iterates over
``r`` can run in the same pass as the producers it reads element by element, but if it
reads a value that needed a *full reduction* over ``r`` (``GM[p] = max(m) QK[m, p]``), it
must wait until that reduction has seen the whole fiber, and so traverse ``r`` again.
A recurrence along ``r`` (the running max ``RM[m1+1, p]``) is not a full reduction: its
value at step ``k`` is ready at step ``k``, which is how the 1-pass cascade escapes.

The analysis is a dataflow over the cascade, per rank: each tensor is either
*streamed* during pass ``k`` (it has the rank and is produced element by element),
*complete* at the end of pass ``k`` (it was reduced over the rank, or read at a fixed
position of a streamed tensor), or *free* of the rank (available before any pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import Expr, Op, accesses, rank_vars, shifted_rank


class Avail(Enum):
    FREE = "free"  # independent of the rank: ready before the first pass
    STREAM = "stream"  # produced element by element during its pass
    DONE = "done"  # complete only when its pass ends


@dataclass(frozen=True, slots=True)
class TensorState:
    avail: Avail
    passes: int  # the pass that produces it (0 for FREE)


@dataclass(frozen=True, slots=True)
class Step:
    """Why an Einsum runs in the pass it does: the read that forced it there."""

    einsum: str
    passes: int
    waits_for: str | None  # a tensor completed by a full reduction in the previous pass


@dataclass(frozen=True, slots=True)
class RankPasses:
    rank: str
    passes: int
    steps: tuple[Step, ...]  # the Einsums that traverse the rank, with their pass

    def explain(self) -> str:
        lines = [f"rank {self.rank}: {self.passes} pass(es)"]
        for s in self.steps:
            why = f" (waits for {s.waits_for})" if s.waits_for else ""
            lines.append(f"  pass {s.passes}: {s.einsum}{why}")
        return "\n".join(lines)


def analyze_rank(c: Cascade, rank: str, inner: str | None = None) -> RankPasses:
    """The passes over one rank, with the Einsum-by-Einsum reasoning.

    With ``inner``, ``rank`` is the outer rank of a partition and the question is about
    the whole original rank: only Einsums that visit both ranks traverse its fibers.
    Einsums over the outer rank alone work on per-tile statistics (FuseMax's local
    maxima and sums); they follow the passes of what they read but cost none.
    """
    state: dict[str, TensorState] = {}
    for t in c.inputs:
        has = rank in t.ranks
        state[t.name] = TensorState(Avail.STREAM if has else Avail.FREE, 1 if has else 0)
    steps: list[Step] = []
    for e in c.einsums:
        costs = rank in e.ranks and (inner is None or inner in e.ranks)
        state[e.output], step = _transfer(e, rank, costs, state)
        if step is not None:
            steps.append(step)
    total = max((s.passes for s in steps), default=0)
    for o in c.outputs:  # an output read at the end still counts its producing pass
        total = max(total, state[o].passes)
    name = rank if inner is None else f"{rank}x{inner}"
    return RankPasses(name, total, tuple(steps))


def _transfer(
    e: Einsum, rank: str, costs: bool, state: dict[str, TensorState]
) -> tuple[TensorState, Step | None]:
    touches = rank in e.ranks
    need, waits = 0, None
    for a in accesses(e.expr):
        st = state.get(a.tensor)
        if a.tensor == e.output or st is None or st.avail is Avail.FREE:
            continue  # a recurrence's previous step is ready by construction
        if st.avail is Avail.STREAM and touches and _streams_along(a.indices, rank):
            k, cause = st.passes, None  # consumed element by element, in the same pass
        elif costs:
            # Reduced over the rank, or read where the whole fiber must exist first (a
            # fixed index such as RM[M1, p]): traverse again once it is complete.
            k, cause = st.passes + 1, a.tensor
        else:
            k, cause = st.passes, None
        if k > need:
            need, waits = k, cause
    if not touches:
        return TensorState(Avail.DONE if need else Avail.FREE, need), None
    need = max(need, 1)
    avail = Avail.DONE if rank in e.reduced_ranks else Avail.STREAM
    return TensorState(avail, need), Step(e.output, need, waits) if costs else None


def _streams_along(indices: tuple[Expr, ...], rank: str) -> bool:
    """A read follows the traversal when the rank appears as ``r``, ``r+1`` or in a tile index."""
    uses = [i for i in indices if rank in rank_vars(i)]
    if not uses:
        return False
    for i in uses:
        sr = shifted_rank(i)
        if sr is not None and sr[0] == rank and sr[1] in (0, 1):
            continue
        if sr is None and _increasing_in(i, rank):
            continue
        return False
    return True


def _increasing_in(index: Expr, rank: str) -> bool:
    """``m1*M0 + m0`` style: the rank enters with a positive coefficient (no subtraction)."""
    return all(not (isinstance(n, Op) and n.op == "sub") for n in index.walk())


def pass_counts(c: Cascade) -> dict[str, int]:
    """``{rank: passes}`` for every rank an Einsum traverses.

    A partitioned rank (``partition m -> m1, m0``) is reported under its original name
    too, counting traversals of whole tiles (see ``analyze_rank``): re-traversing the
    inner rank happens inside one tile, which is what lets the 1-pass cascade keep its
    buffers independent of M.
    """
    ranks: dict[str, None] = {}
    for e in c.einsums:
        ranks.update(dict.fromkeys(e.ranks))
    out = {r: analyze_rank(c, r).passes for r in ranks}
    for p in c.partitions:
        if p.outer in out:
            out.setdefault(p.rank, analyze_rank(c, p.outer, p.inner).passes)
    return out


def explain_passes(c: Cascade) -> str:
    """The per-rank reasoning as text, for ``einfuse passes`` and ``explain``."""
    ranks: dict[str, None] = {}
    for e in c.einsums:
        ranks.update(dict.fromkeys(e.ranks))
    return "\n".join(analyze_rank(c, r).explain() for r in ranks)
