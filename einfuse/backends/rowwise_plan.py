"""Row-wise groups of a cascade: normalizations and the matmul after them (IR only, no JAX).

A transformer's RMSNorm and LayerNorm are row-wise: each row (a token: batch x sequence)
is reduced over its features and rescaled by its own statistics, and the projection that
follows contracts those features with a weight that no row owns. Such a group can run as
one kernel over blocks of rows (and of the projection's output features), reading every
activation once, where XLA emits a reduction fusion, an elementwise fusion and a GEMM.

Which Einsums form a group is a legality analysis over the IR, whatever the spelling:

* the **row ranks** ``R`` are the left side of a reduction over features (a statistic,
  ``SUM0[a, b] = MUL0[a, b, c]``): the anchor;
* a **prologue** Einsum has every row rank on its left, read at the same row by every
  tensor that has them (the rest, weights and gains, have none of them) and reduces only
  ranks of row tensors (so no weight is contracted in it: it reads whole feature rows);
* the **epilogue** holds the Einsums after it with left side ``R`` plus one output-feature
  rank ``n`` that is never reduced and read at the same ``n`` everywhere: the contractions
  with a weight (``DOT0[a, b, d] = MUL1[a, b, c] * W[c, d]``, SwiGLU's two) and the maps
  over their results (bias, activation, residual); ``n`` is tiled in blocks by the kernel;
* the group is convex: nothing outside it reads one of its tensors and feeds it again.

``plan_rowwise`` cuts a cascade into such groups and the Einsums around them, in an order
that runs; the emitter runs each group as a kernel and the rest as the JAX backend does.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum, TensorDecl
from einfuse.ir.dtypes import tensor_dtypes
from einfuse.ir.expr import Access, Expr, Op, Var, accesses, rank_vars
from einfuse.passes.dce import reads

ROW = "row__"  # the flattened row ranks in a kernel's cascade


@dataclass(frozen=True)
class RowGroup:
    """One row-wise group: its Einsums as a cascade of their own, and how it is tiled."""

    cascade: Cascade  # inputs: what it reads from outside; outputs: what is read after it
    rows: tuple[str, ...]  # the row ranks, in the order every row tensor holds them
    cols: str | None  # the epilogue's output-feature rank (None: no epilogue)
    col_dims: dict[str, int]  # tensor -> its dim of ``cols`` (only tensors tiled by it)

    def is_row_tensor(self, name: str) -> bool:
        return bool(set(self.rows) & set(self.cascade.tensor_ranks(name)))


@dataclass(frozen=True)
class RowwisePlan:
    """The cascade as steps in an order that runs: row-wise groups and plain sub-cascades."""

    steps: tuple[RowGroup | Cascade, ...]
    dtypes: dict[str, str]  # every tensor's dtype in the whole cascade


def plan_rowwise(c: Cascade) -> RowwisePlan | None:
    """The cascade cut around its row-wise groups; None if it has none (or has recurrences,
    partitions: a fused group's loop, which is not row-wise)."""
    if c.partitions or any(e.is_recurrence or e.init is not None for e in c.einsums):
        return None
    groups: list[tuple[list[str], tuple[str, ...], str | None, dict[str, int]]] = []
    taken: set[str] = set()
    for e in c.einsums:
        if e.output not in taken and (found := _grow(c, e, taken)) is not None:
            groups.append(found)
            taken.update(found[0])
    if not groups:
        return None
    dtypes = tensor_dtypes(c)
    units = _order(c, [g[0] for g in groups])
    group_of = {tuple(g[0]): g for g in groups}
    steps: list[RowGroup | Cascade] = []
    plain: list[str] = []
    for k, unit in enumerate(units):
        if tuple(unit) in group_of:
            if plain:
                steps.append(_sub_cascade(c, plain, units[k:], dtypes))
                plain = []
            members, rows, cols, col_dims = group_of[tuple(unit)]
            sub = _sub_cascade(c, members, units[k + 1 :], dtypes)
            if sub.outputs:  # a group nobody reads is dead code: dropped
                steps.append(RowGroup(sub, rows, cols, col_dims))
        else:
            plain += unit
    if plain:
        steps.append(_sub_cascade(c, plain, [], dtypes))
    return RowwisePlan(tuple(steps), dtypes)


# -- growing one group from its anchor ---------------------------------------------------
def _grow(
    c: Cascade, anchor: Einsum, taken: set[str]
) -> tuple[list[str], tuple[str, ...], str | None, dict[str, int]] | None:
    """The group anchored at a feature reduction, or None if ``anchor`` is not one."""
    if not anchor.reduced_ranks or not all(isinstance(i, Var) for i in anchor.indices):
        return None
    rows = anchor.output_ranks
    if not rows or not _prologue_legal(c, anchor, rows):
        return None
    members: dict[str, Einsum] = {}

    def pull(e: Einsum) -> None:  # the anchor and its row-wise producers
        members[e.output] = e
        for t in e.inputs:
            w = c.writer(t)
            if w is None or w.output in members or w.output in taken:
                continue
            if _prologue_legal(c, w, rows):
                pull(w)

    pull(anchor)
    for e in c.einsums:  # the row-wise Einsums after it (norm's scaling, gain, bias)
        new = e.output not in members and e.output not in taken and _reads_any(e, members)
        if new and _prologue_legal(c, e, rows) and not _tainted(c, members, e):
            members[e.output] = e
    if not any(anchor.output in e.inputs for e in members.values()):
        return None  # a reduction alone (``x.sum(-1)``) is XLA's to emit
    cols, col_dims = _epilogue(c, members, rows, taken)
    if not _convex(c, members):
        return None
    names = [e.output for e in c.einsums if e.output in members]
    return names, rows, cols, col_dims


def _epilogue(
    c: Cascade, members: dict[str, Einsum], rows: tuple[str, ...], taken: set[str]
) -> tuple[str | None, dict[str, int]]:
    """Add the contractions with a weight after the prologue and the maps over their results;
    their one output-feature rank (None if there are none) and the tensors tiled along it."""
    prologue = dict(members)
    used = {r for e in prologue.values() for r in e.ranks}
    used |= {r for e in prologue.values() for t in e.inputs for r in c.tensor_ranks(t)}
    cols: str | None = None
    col_dims: dict[str, int] = {}
    whole = {t for e in prologue.values() for t in e.inputs}  # read whole by every program
    for e in c.einsums:
        if e.output in members or e.output in taken or not _reads_any(e, members):
            continue
        extra = [r for r in e.output_ranks if r not in rows]
        if len(extra) != 1 or extra[0] in used or (cols is not None and extra[0] != cols):
            continue
        if _tainted(c, members, e):
            continue
        dims = _epilogue_dims(c, e, rows, extra[0], prologue, col_dims, whole)
        if dims is not None:
            cols = extra[0]
            members[e.output] = e
            col_dims.update(dims)
            whole |= {a.tensor for a in accesses(e.expr) if a.tensor not in dims}
    return cols, col_dims


def _epilogue_dims(
    c: Cascade,
    e: Einsum,
    rows: tuple[str, ...],
    n: str,
    prologue: dict[str, Einsum],
    col_dims: dict[str, int],
    whole: set[str],
) -> dict[str, int] | None:
    """Where ``e`` reads ``n`` in each tensor, if it is a legal epilogue Einsum over ``n``."""
    if not _row_legal(c, e, rows) or n in e.reduced_ranks or n in _value_ranks(e.expr):
        return None
    if not all(isinstance(i, Var) for i in e.indices):
        return None
    dims = {e.output: e.output_ranks.index(n)}
    for a in accesses(e.expr):
        at = [d for d, i in enumerate(a.indices) if n in rank_vars(i)]
        if not at:  # read whole: a prologue tensor, a row statistic, a weight without n
            if a.tensor in col_dims or a.tensor in dims:
                return None
            continue
        if a.tensor in whole or a.tensor in prologue or len(at) != 1 or a.indices[at[0]] != Var(n):
            return None
        if dims.setdefault(a.tensor, at[0]) != at[0] or col_dims.get(a.tensor, at[0]) != at[0]:
            return None
    return dims


# -- legality of one Einsum --------------------------------------------------------------
def _prologue_legal(c: Cascade, e: Einsum, rows: tuple[str, ...]) -> bool:
    """Row-wise, and what it reduces it reads from row tensors only (no weight contraction)."""
    if not _row_legal(c, e, rows):
        return False
    reduced = set(e.reduced_ranks)
    for a in accesses(e.expr):
        touches = reduced & {r for i in a.indices for r in rank_vars(i)}
        if touches and not set(rows) <= set(c.tensor_ranks(a.tensor)):
            return False
    return True


def _row_legal(c: Cascade, e: Einsum, rows: tuple[str, ...]) -> bool:
    """``e`` maps row to row: every row rank on its left, never reduced nor read as a value,
    and every tensor read either at this very row (in the rows' order) or at none."""
    if e.is_recurrence or e.init is not None:
        return False
    if _row_dims(e.output_ranks, rows) is None or not all(isinstance(i, Var) for i in e.indices):
        return False
    if set(rows) & (set(e.reduced_ranks) | _value_ranks(e.expr)):
        return False
    for a in accesses(e.expr):
        ranks = c.tensor_ranks(a.tensor)
        dims = _row_dims(ranks, rows)
        if dims is None and set(rows) & set(ranks):
            return False  # some row ranks but not all: a broadcast across rows
        for d, i in enumerate(a.indices):
            mentions = set(rows) & set(rank_vars(i))
            if dims is not None and d in dims:
                if i != Var(ranks[d]):
                    return False
            elif mentions:
                return False
    return True


def _row_dims(ranks: tuple[str, ...], rows: tuple[str, ...]) -> list[int] | None:
    """The dims holding the row ranks, if ``ranks`` holds each once and in their order."""
    if not all(ranks.count(r) == 1 for r in rows):
        return None
    dims = [ranks.index(r) for r in rows]
    return dims if dims == sorted(dims) else None


def _value_ranks(expr: Expr) -> set[str]:
    """Ranks read as values (masks), not as indices."""
    if isinstance(expr, Var):
        return {expr.rank}
    if isinstance(expr, Op):
        return set().union(*(_value_ranks(a) for a in expr.args))
    return set()


# -- convexity and order -----------------------------------------------------------------
def _reads_any(e: Einsum, members: dict[str, Einsum]) -> bool:
    return any(t in members for t in e.inputs)


def _tainted(c: Cascade, members: dict[str, Einsum], e: Einsum) -> bool:
    """Whether ``e`` reads, outside ``members``, something computed from them."""
    return any(t not in members and _depends_on(c, t, members) for t in e.inputs)


def _depends_on(c: Cascade, tensor: str, members: dict[str, Einsum]) -> bool:
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        w = c.writer(t)
        if w is None or t in seen:
            continue
        seen.add(t)
        for s in reads(w):
            if s in members:
                return True
            stack.append(s)
    return False


def _convex(c: Cascade, members: dict[str, Einsum]) -> bool:
    return not any(_tainted(c, members, e) for e in members.values())


def _order(c: Cascade, groups: list[list[str]]) -> list[list[str]]:
    """Groups and single Einsums in an order that runs (each unit as early as it can)."""
    unit_of = {n: k for k, g in enumerate(groups) for n in g}
    units: list[list[str]] = [list(g) for g in groups]
    for e in c.einsums:
        if e.output not in unit_of:
            unit_of[e.output] = len(units)
            units.append([e.output])
    deps = [
        {unit_of[t] for n in u for t in reads(c.writer(n)) if t in unit_of} - {k}
        for k, u in enumerate(units)
    ]
    first = [min(c.einsums.index(c.writer(n)) for n in u) for u in units]
    done: list[int] = []
    while len(done) < len(units):
        ready = [k for k in range(len(units)) if k not in done and deps[k] <= set(done)]
        done.append(min(ready, key=first.__getitem__))
    return [units[k] for k in done]


def _sub_cascade(
    c: Cascade, names: list[str], later: list[list[str]], dtypes: dict[str, str]
) -> Cascade:
    """The Einsums ``names`` as a cascade: inputs what they read from outside (in their
    dtypes), outputs what ``later`` units or the cascade's outputs read."""
    einsums = tuple(c.writer(n) for n in names)
    mine = set(names)
    needed = {t for u in later for n in u for t in reads(c.writer(n))} | set(c.outputs)
    ins = dict.fromkeys(t for e in einsums for t in reads(e) if t not in mine)
    decls = tuple(TensorDecl(t, c.tensor_ranks(t), dtypes[t]) for t in ins)
    outs = tuple(n for n in names if n in needed)
    return Cascade(decls, einsums, outs, c.sizes)


def kernel_cascade(g: RowGroup) -> Cascade:
    """The group as one kernel program sees it: the row ranks flattened to one, ``ROW``,
    first in every row tensor (weights and gains as they are)."""
    c, rows = g.cascade, set(g.rows)

    def flat(ranks: tuple[str, ...]) -> tuple[str, ...]:
        return (ROW, *(r for r in ranks if r not in rows)) if rows & set(ranks) else ranks

    def index(name: str, indices: tuple[Expr, ...]) -> tuple[Expr, ...]:
        ranks = c.tensor_ranks(name)
        if not rows & set(ranks):
            return indices
        return (Var(ROW), *(i for i, r in zip(indices, ranks) if r not in rows))

    def strip(expr: Expr) -> Expr:
        if isinstance(expr, Access):
            return Access(expr.tensor, index(expr.tensor, expr.indices))
        if isinstance(expr, Op):
            return Op(expr.op, tuple(strip(a) for a in expr.args))
        return expr

    decls = tuple(TensorDecl(t.name, flat(t.ranks), t.dtype) for t in c.inputs)
    einsums = tuple(
        Einsum(e.output, index(e.output, e.indices), strip(e.expr), e.reduce) for e in c.einsums
    )
    return Cascade(decls, einsums, c.outputs, c.sizes)
