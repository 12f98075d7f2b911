"""TokenWeave's reordering: all-reduce + residual + RMSNorm -> reduce-scatter + residual +
RMSNorm on the shard + all-gather.

An all-reduce ``O[p, d] = OP[y, p, d]`` gives every device every token; if what follows is
per token (the residual add, the norm's statistic over ``d``, the scaling) each device can
compute it for its ``P/X`` tokens only, on a reduce-scatter's shard, and gather the result
where a consumer needs whole tokens. The legality analysis follows the all-reduce's
consumers in program order and admits an Einsum to the *row-local region* when it

- reads the region's tensors only at a plain rank ``r`` of its own left side on their token
  dim (per token: no read crosses tokens), with ``r`` the token count's size,
- is no recurrence, writes plain ranks, and neither uses a device rank nor reads a tensor
  sharded over the axis (it would communicate on its own).

The region must contain a per-token reduction (a norm's statistic), else there is nothing
to shard; an all-reduce that is then read only at shard rows becomes a plain reduce-scatter
(``shard_reads``). Every region tensor that a non-region Einsum reads, or that is an output, is
all-gathered (``G[p1, p0, d]``) and read back through its old name
(``XN2[p, d] = G[p/P0, mod(p, P0), d]``), so the rest of the cascade is untouched. The
rewrite is exact: only where each sum runs changes, not its terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.devices import Communication, axes, collectives
from einfuse.ir.expr import Access, Op, Size, Var, accesses, rank_vars, rename_ranks
from einfuse.passes.manager import register_pass
from einfuse.passes.overlap_common import (
    Decision,
    OverlapError,
    OverlapReport,
    Verdict,
    chooser_for,
    flat,
    fresh,
    int_size,
    not_paying,
    replace_reads,
    taken_names,
    unpack,
)
from einfuse.passes.shard_reads import narrow

NAME = "reorder-norm"


@dataclass(frozen=True, slots=True)
class Member:
    """One Einsum of the row-local region and its token rank (a plain left index)."""

    einsum: Einsum
    rank: str
    dim: int


@dataclass(frozen=True, slots=True)
class Plan:
    axis: str
    tokens: int
    devices: int
    members: tuple[Member, ...]
    gathered: tuple[str, ...]


@register_pass(NAME)
def reorder_norm(c: Cascade, when: str = "always", cost: str = "") -> Cascade:
    """Every all-reduce followed by a per-token norm becomes reduce-scatter, norm, all-gather;
    ``when=pays`` only where the cost model (on target ``cost``, or ``cost_target``'s) says so."""
    return reorder_norm_with_report(c, when=when, cost=cost)[0]


def reorder_norm_with_report(
    c: Cascade,
    pays: Callable[[Cascade, str], Verdict] | None = None,
    when: str = "always",
    cost: str = "",
) -> tuple[Cascade, OverlapReport]:
    """``reorder-norm`` and why per all-reduce; ``pays(cascade, all_reduce)`` (the cost
    model's, on ``cost``, with ``when="pays"``) may veto a legal rewrite."""
    if when not in ("always", "pays"):
        raise OverlapError(f"{NAME}: when must be always or pays, got {when!r}")
    if when == "pays" and pays is None:
        pays = chooser_for(NAME, "when=pays", "pays", cost)
    decisions = []
    for name in [m.einsum for m in collectives(c) if m.kind == "all_reduce"]:
        comm = next((m for m in collectives(c) if m.einsum == name), None)
        if comm is None or comm.kind != "all_reduce":
            decisions.append(Decision(name, False, "no longer an all-reduce"))
            continue
        ok, model = unpack(pays(c, name)) if pays is not None else (True, "")
        if not ok:
            decisions.append(Decision(name, False, not_paying(model)))
            continue
        plan = plan_reorder(c, comm)
        if isinstance(plan, str):
            narrowed = narrow(c, comm)
            if isinstance(narrowed, str):
                decisions.append(Decision(name, False, f"{plan}; nor a reduce-scatter: {narrowed}"))
                continue
            c = narrowed[0]
            why = f"read only at its own shards (by {narrowed[1]}): a reduce-scatter, no gather"
            decisions.append(Decision(name, True, why))
            continue
        c = apply_plan(c, plan)
        region = ", ".join(m.einsum.output for m in plan.members[1:])
        why = (
            f"reduce-scatter over {plan.devices} devices ({plan.tokens // plan.devices} tokens "
            f"each), row-local {region} on the shard, all-gather {', '.join(plan.gathered)}"
        )
        decisions.append(Decision(name, True, why + (f"; cost model: {model}" if model else "")))
    return c, OverlapReport(NAME, tuple(decisions))


def plan_reorder(c: Cascade, comm: Communication) -> Plan | str:
    """The region and gathers for one all-reduce, or why it cannot be reordered."""
    e = c.writer(comm.einsum)
    assert e is not None
    devices = int_size(c, comm.reduced_rank or "")
    reasons = []
    for dim, rank in enumerate(i.rank if isinstance(i, Var) else None for i in e.indices):
        if rank is None or c.device_axis(rank) is not None:
            continue
        tokens = int_size(c, rank)
        if tokens is None or devices is None:
            reasons.append(f"{rank}: sizes must be bound integers")
            continue
        if tokens % devices:
            reasons.append(f"{rank}: size {tokens} does not split over {devices} devices")
            continue
        members, gathered, blocked = _region(c, Member(e, rank, dim), comm.axis)
        if any(m.einsum.reduced_ranks for m in members[1:]):
            return Plan(comm.axis, tokens, devices, tuple(members), tuple(gathered))
        stop = f" ({blocked[0]})" if blocked else ""
        rows = ", ".join(m.einsum.output for m in members[1:]) or "nothing"
        reasons.append(
            f"{rank}: no per-token reduction (norm) among its row-local consumers ({rows}){stop}"
        )
    return "; ".join(reasons) or "its output has no plain token rank"


def _region(c: Cascade, ar: Member, axis: str) -> tuple[list[Member], list[str], list[str]]:
    """Row-local consumers in program order, the region tensors to gather, why others stop."""
    dims = {ar.einsum.output: ar.dim}
    members, gathered, blocked = [ar], [], []
    start = c.einsums.index(ar.einsum)
    for e in c.einsums[start + 1 :]:
        reads = [a for a in accesses(e.expr) if a.tensor in dims]
        if not reads:
            continue
        member = _row_local(c, e, reads, dims, axis, c.size(ar.rank))
        if isinstance(member, Member):
            dims[e.output] = member.dim
            members.append(member)
        else:
            blocked.append(member)
            gathered += [a.tensor for a in reads if a.tensor not in gathered]
    gathered += [o for o in c.outputs if o in dims and o not in gathered]
    return members, [g for m in members if (g := m.einsum.output) in gathered], blocked


def _row_local(
    c: Cascade, e: Einsum, reads: list[Access], dims: dict[str, int], axis: str, size: object
) -> Member | str:
    who = e.output
    if e.init is not None or e.is_recurrence:
        return f"{who} is a recurrence"
    if not all(isinstance(i, Var) for i in e.indices):
        return f"{who} writes a non-plain index"
    sharded = [t for t in e.inputs if c.device_dim(t, axis) is not None]
    if sharded or any(r in e.ranks for r in axes(c)[axis]):
        return f"{who} reads {sharded[0] if sharded else 'a device rank'} of axis {axis}"
    first = reads[0].indices[dims[reads[0].tensor]]
    left = [i.rank for i in e.indices if isinstance(i, Var)]
    if not isinstance(first, Var) or first.rank not in left:
        return f"{who} reads {reads[0].tensor} at {first} on its token dim, not at its own rank"
    r = first.rank
    for a in reads:
        others = [i for d, i in enumerate(a.indices) if d != dims[a.tensor]]
        if a.indices[dims[a.tensor]] != first or any(r in rank_vars(i) for i in others):
            return f"{who} reads {a} across tokens"
    if c.size(r) != size:
        return f"{who}'s rank {r} is not the token count"
    return Member(e, r, left.index(r))


def apply_plan(c: Cascade, plan: Plan) -> Cascade:
    """Shard the region's Einsums, gather what others read (``chunk-collective`` calls this
    with the all-reduce alone, to write it as reduce-scatter + all-gather)."""
    ar = plan.members[0]
    taken = taken_names(c)
    devs = axes(c)[plan.axis]
    x = next((r for r in devs if r not in ar.einsum.ranks), None) or fresh("x", taken)
    t0, t1 = fresh(f"{ar.rank}0", taken), fresh(f"{ar.rank}1", taken)
    taken |= {x, t0, t1, t0.upper(), t1.upper()}
    shard = {}
    for m in plan.members:
        shard[m.einsum.output] = fresh(f"{m.einsum.output}_SH", taken)
        taken.add(shard[m.einsum.output])
    dims = {m.einsum.output: m.dim for m in plan.members}

    def sharded_read(a: Access) -> Access | None:
        if a.tensor not in shard:
            return None
        idx = list(a.indices)
        idx[dims[a.tensor]] = Var(t0)
        return Access(shard[a.tensor], (Var(x), *idx))

    rewritten: dict[str, list[Einsum]] = {}
    for m in plan.members:
        e = m.einsum
        expr = rename_ranks(replace_reads(e.expr, sharded_read), {m.rank: flat(Var(x), t0)})
        left = list(e.indices)
        left[m.dim] = Var(t0)
        out = [Einsum(shard[e.output], (Var(x), *left), expr, e.reduce, loc=e.loc)]
        if e.output in plan.gathered:
            g = fresh(f"G_{e.output}", taken)
            taken.add(g)
            out.append(Einsum(g, (Var(t1), *left), Access(shard[e.output], (Var(t1), *left))))
            view = list(e.indices)
            view[m.dim] = Op("mod", (Var(m.rank), Size(t0)))
            back = Access(g, (Op("div", (Var(m.rank), Size(t0))), *view))
            out.append(Einsum(e.output, e.indices, back, loc=e.loc))
        rewritten[e.output] = out
    einsums = [n for e in c.einsums for n in rewritten.get(e.output, [e])]
    devices = c.devices if x in devs else (*c.devices, (x, plan.axis))
    out = c.with_einsums(einsums, devices=devices)
    return out.with_sizes(**{t0: plan.tokens // plan.devices, t1: plan.devices, x: plan.devices})
