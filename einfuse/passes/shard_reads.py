"""An all-reduce that every reader reads only at its own shard is a reduce-scatter.

After ``reorder-norm`` shards a residual (``Y_SH[x, t0, d] = H1_SH[x, t0, d] + MO[x*T0+t0, d]``),
the block's second all-reduce ``MO`` is read only at the rows device ``x`` owns. Summing every
row on every device is then wasted: a reduce-scatter ``MO_SH[x, t0, d]`` gives each device its
rows, read in place (``MO_SH[x, t0, d]``), with no gather at all. This is TokenWeave's layout
(the residual stream stays sharded between norms). ``reorder-norm`` tries it on every
all-reduce it cannot reorder.
"""

from __future__ import annotations

from dataclasses import replace

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.devices import Communication, axes, communications
from einfuse.ir.expr import Access, Expr, Op, Size, Var, accesses, rename_ranks
from einfuse.passes.overlap_common import flat, fresh, int_size, replace_reads, taken_names


def narrow(c: Cascade, comm: Communication) -> tuple[Cascade, str] | str:
    """The cascade with ``comm``'s all-reduce as a reduce-scatter, and who reads it; or why not."""
    e = c.writer(comm.einsum)
    assert e is not None
    readers = c.consumers(e.output)
    if e.output in c.outputs or not readers or any(r.init is not None for r in readers):
        return f"{e.output} is an output, unread, or read by a recurrence"
    devices = int_size(c, comm.reduced_rank or "")
    found: set[tuple[int, int]] = set()
    selves: dict[str, str | None] = {}  # each Einsum's device rank, classified once
    for m in communications(c):
        selves.setdefault(m.einsum, m.self_rank)
    for r in readers:
        me = selves.get(r.output)
        for a in (a for a in accesses(r.expr) if a.tensor == e.output):
            at = [(d, _shard_of(i, me, c)) for d, i in enumerate(a.indices)]
            hits = [(d, size) for d, size in at if size is not None]
            if me is None or len(hits) != 1:
                return f"{r.output} reads {a} beyond its own shard"
            found.add(hits[0])
    if len(found) != 1 or devices is None:
        return f"its readers read it at different shards ({sorted(found)})"
    ((dim, shard),) = found
    token = e.indices[dim]
    if not isinstance(token, Var) or int_size(c, token.rank) != shard * devices:
        return f"its dim {dim} is not {devices} shards of {shard}"
    out = _rewrite(c, e, dim, token.rank, (shard, devices), comm.axis)
    return out, ", ".join(r.output for r in readers)


def _shard_of(index: Expr, me: str | None, c: Cascade) -> int | None:
    """``s*R0 + r0`` for the reader's own device rank ``s``: the shard size R0, else None."""
    if me is None or not (isinstance(index, Op) and index.op == "add"):
        return None
    left, right = index.args
    if (
        isinstance(left, Op)
        and left.op == "mul"
        and left.args[0] == Var(me)
        and isinstance(right, Var)
        and left.args[1] == Size(right.rank)
    ):
        return int_size(c, right.rank)
    return None


def _rewrite(
    c: Cascade, e: Einsum, dim: int, rank: str, counts: tuple[int, int], axis: str
) -> Cascade:
    taken = taken_names(c)
    devs = axes(c)[axis]
    x = next((r for r in devs if r not in e.ranks), None) or fresh("x", taken)
    t0 = fresh(f"{rank}0", taken)
    name = fresh(f"{e.output}_SH", taken | {t0, t0.upper()})
    left = list(e.indices)
    left[dim] = Var(t0)
    body = rename_ranks(e.expr, {rank: flat(Var(x), t0)})
    scatter = Einsum(name, (Var(x), *left), body, e.reduce, loc=e.loc)

    def own_rows(a: Access) -> Access | None:
        if a.tensor != e.output:
            return None
        idx = list(a.indices)
        mine = idx[dim].args[0].args[0]  # type: ignore[attr-defined]  # s of s*R0+r0
        idx[dim] = idx[dim].args[1]  # type: ignore[attr-defined]
        return Access(name, (mine, *idx))

    einsums = [
        scatter if f is e else replace(f, expr=replace_reads(f.expr, own_rows)) for f in c.einsums
    ]
    devices = c.devices if x in devs else (*c.devices, (x, axis))
    return c.with_einsums(einsums, devices=devices).with_sizes(**{t0: counts[0], x: counts[1]})
