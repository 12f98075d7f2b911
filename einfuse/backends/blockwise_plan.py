"""How a fused group splits into the programs of a blockwise loop (IR only, no JAX).

``plan_group`` cuts the cascade around a ``FusedGroup`` (see ``einfuse.passes.fuse``): what
runs before the loop (and each carried state's initial value), one step of it with the loop
rank fixed (reads of the partitioned rank become reads of one tile, ``STEP__`` its index),
and what runs after it on the final states. The query rank chosen here is tiled too (its
block index ``QBLOCK__``); a band mask over the loop and query ranks (causal, sliding
window, static key padding, whatever its fill: see ``blockwise_mask``) is recognized so the
emitter can skip the tiles outside the band and drop the mask inside it; without one, key
padding read from an input (``blockwise_padding``) lets it skip the all-masked key tiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from einfuse.backends.blockwise_layout import query_major
from einfuse.backends.blockwise_mask import MaskBand, find_mask, flat_key, mask_query
from einfuse.backends.blockwise_padding import KeyPadding, find_padding
from einfuse.backends.jax_values import BackendUnsupported
from einfuse.ir.cascade import Cascade, Einsum, TensorDecl
from einfuse.ir.expr import (
    Access,
    Const,
    Expr,
    Op,
    Size,
    Var,
    rank_vars,
    shifted_rank,
    substitute,
)
from einfuse.passes.dce import reads
from einfuse.passes.fuse import FusedGroup

STEP, QBLOCK = "STEP__", "QBLOCK__"


@dataclass(frozen=True)
class BlockPlan:
    """The three programs of a blockwise group: before, one loop step, after."""

    group: FusedGroup
    query: str | None  # the tiled query rank
    pre: Cascade  # everything before the loop, plus each carried state's initial value
    body: Cascade  # one step: carried state in (``X__prev``), new state out
    post: Cascade  # everything after the loop, reading the final states
    tiles: dict[str, tuple[int, int]]  # external tensor -> (dim, ...) sliced per step
    mask: MaskBand | None  # a band mask over the loop and query ranks (causal, window)
    padding: KeyPadding | None = None  # key padding read from an input (if no band)

    @property
    def causal(self) -> bool:
        """Whether key tiles outside the mask band are skipped (see ``blockwise_mask``)."""
        return self.mask is not None and self.mask.skips


def plan_loop(
    c: Cascade, g: FusedGroup, sizes: Mapping[str, int]
) -> tuple[Cascade, BlockPlan, tuple[str, ...]]:
    """The cascade as the loop runs it (padding masks the sizes make true dropped, the
    score tiles and accumulators query-major), its plan, and the row ranks mapped one at a time.

    The emitter runs this; the autotuner asks it which ranks a Schedule should tile.
    """
    c = drop_true_padding_masks(c, sizes)
    query = choose_query_rank(c, g, sizes)
    c = query_major(c, g, query)
    plan = plan_group(c, g, query)
    return c, plan, row_ranks(c, g, plan.body, query)


def plan_group(c: Cascade, g: FusedGroup, query: str | None) -> BlockPlan:
    """Split the cascade around the group; raise BackendUnsupported for shapes it cannot loop."""
    r1, r0 = g.rank, g.inner
    if r0 is None:
        raise BackendUnsupported(f"group over {r1} has no inner rank")
    members = [c.writer(n) for n in g.einsums]
    names = set(g.einsums)
    carried = set(g.carried)
    flat = flat_key(r1, r0)
    tiles: dict[str, tuple[int, int]] = {}
    body_inputs: dict[str, TensorDecl] = {}

    def need(name: str, ranks: tuple[str, ...]) -> None:
        body_inputs.setdefault(name, TensorDecl(name, ranks))

    def step_read(node: Expr) -> Expr | None:
        if isinstance(node, Var) and node.rank == r1:
            need(STEP, ())
            return Access(STEP, ())
        if not isinstance(node, Access):
            return None
        t = node.tensor
        if t in carried:
            e = c.writer(t)
            d = e.iterative_dim
            back = shifted_rank(node.indices[d])
            if back not in ((r1, 0), (r1, 1)):
                raise BackendUnsupported(f"{t} is read at {node.indices[d]} inside its loop")
            rest = tuple(i for k, i in enumerate(node.indices) if k != d)
            if back == (r1, 0):
                need(f"{t}__prev", _ranks_without(c, t, d))
                return Access(f"{t}__prev", rest)
            return Access(t, rest)
        if t in names:
            dims = [k for k, i in enumerate(node.indices) if r1 in rank_vars(i)]
            if [node.indices[k] for k in dims] != [Var(r1)]:
                raise BackendUnsupported(f"{node} is not read at the current step of {r1}")
            return Access(t, tuple(i for k, i in enumerate(node.indices) if k != dims[0]))
        dims = [k for k, i in enumerate(node.indices) if r1 in rank_vars(i)]
        if not dims:
            need(t, c.tensor_ranks(t))
            return None
        if len(dims) != 1 or node.indices[dims[0]] != flat:
            raise BackendUnsupported(f"{node}: only reads at {r1}*{r0.upper()}+{r0} can be tiled")
        d = dims[0]
        tiles[t] = (d, 0)
        ranks = list(c.tensor_ranks(t))
        ranks[d] = r0
        need(f"{t}__blk", tuple(ranks))
        idx = list(node.indices)
        idx[d] = Var(r0)
        return Access(f"{t}__blk", tuple(idx))

    body: list[Einsum] = []
    init: list[Einsum] = []
    for e in members:
        if r1 in e.reduced_ranks:
            raise BackendUnsupported(f"{e.output} reduces over the loop rank {r1}")
        drop = e.iterative_dim if e.output in carried else _dim_of(e, r1)
        indices = tuple(i for k, i in enumerate(e.indices) if k != drop)
        body.append(Einsum(e.output, indices, substitute(e.expr, step_read), e.reduce))
        if e.output in carried:
            init.append(Einsum(f"{e.output}__init", indices, e.init))
    before, after, later = [], [], set(names)
    for e in c.einsums:
        if e.output in names:
            continue
        if set(reads(e)) & later:
            after.append(e)
            later.add(e.output)
        else:
            before.append(e)
    pre_outputs = tuple(e.output for e in before) + tuple(i.output for i in init)
    pre = Cascade(c.inputs, (*before, *init), pre_outputs or (), c.sizes, c.partitions)
    body_c = Cascade(
        tuple(body_inputs.values()), tuple(body), tuple(g.carried), c.sizes, c.partitions
    )
    post = _post(c, g, after, before)
    mask = find_mask(c, g, query)
    padding = find_padding(c, g, query) if mask is None else None
    return BlockPlan(g, query, pre, body_c, post, tiles, mask, padding)


def _ranks_without(c: Cascade, t: str, d: int) -> tuple[str, ...]:
    return tuple(r for k, r in enumerate(c.tensor_ranks(t)) if k != d)


def _dim_of(e: Einsum, rank: str) -> int | None:
    return next((k for k, i in enumerate(e.indices) if i == Var(rank)), None)


def _post(c: Cascade, g: FusedGroup, after: list[Einsum], before: list[Einsum]) -> Cascade:
    """The Einsums after the loop, reading each carried state's final value ``X[M1, ...]``."""

    def final(node: Expr) -> Expr | None:
        if isinstance(node, Access) and node.tensor in g.carried:
            d = c.writer(node.tensor).iterative_dim
            if node.indices[d] != Size(g.rank):
                raise BackendUnsupported(f"{node} reads a carried state before its last step")
            return Access(node.tensor, tuple(i for k, i in enumerate(node.indices) if k != d))
        return None

    decls = {t.name: t for t in c.inputs}
    for e in before:
        decls[e.output] = TensorDecl(e.output, c.tensor_ranks(e.output))
    for t in g.carried:
        decls[t] = TensorDecl(t, _ranks_without(c, t, c.writer(t).iterative_dim))
    for t in g.results:
        if t not in g.carried:
            raise BackendUnsupported(f"{t} is read after the loop but is not carried")
    # Keep each Einsum whole (a recurrence's initial value) and the partitions: what runs
    # after the loop may be a second fused group (``o.sum()`` of fused attention ``o``).
    einsums = [replace(e, expr=substitute(e.expr, final)) for e in after]
    used = {t for e in einsums for t in reads(e)} | set(c.outputs)
    inputs = tuple(d for n, d in decls.items() if n in used)
    return Cascade(inputs, tuple(einsums), c.outputs, c.sizes, c.partitions)


def choose_query_rank(c: Cascade, g: FusedGroup, sizes: Mapping[str, int]) -> str | None:
    """The rank to tile besides the loop: on every carried state's left side, never reduced.

    A rank a mask compares the key index against wins; otherwise the largest one. Only the
    state decides: a member that computes keys or values in the loop (a K/V projection the
    lifter put in the same region) has no query rank, and is computed per query block.
    """
    members = [c.writer(n) for n in g.einsums]
    state = [e for e in members if e.output in g.carried] or members
    common = set.intersection(*(set(e.output_ranks) for e in state)) - {g.rank, g.inner}
    if not common:
        return None
    if g.inner is not None:
        flat = flat_key(g.rank, g.inner)
        for e in members:
            for node in e.expr.walk():
                if (q := mask_query(node, flat)) in common:
                    return q
    return max(sorted(common), key=lambda r: sizes[r])


def globalize(expr: Expr, query: str, q_tile: int, total: int) -> Expr:
    """In a query block, the rank value ``p`` is ``QBLOCK*P0 + p`` and the size ``P`` is P."""
    if isinstance(expr, Access):
        return expr  # indices address the block, not the whole rank
    if expr == Var(query):
        return Op("add", (Op("mul", (Access(QBLOCK, ()), Const(q_tile))), Var(query)))
    if expr == Size(query):
        return Const(total)
    if isinstance(expr, Op):
        return Op(expr.op, tuple(globalize(a, query, q_tile, total) for a in expr.args))
    return expr


def drop_true_padding_masks(c: Cascade, sizes: Mapping[str, int]) -> Cascade:
    """Remove ``where(m1*M0+m0 < M, x, pad)`` where the bound sizes make the tile divide M.

    Partitioning with symbolic sizes must mask; once sizes are known the mask is often
    always true, and each one costs a select over a whole score tile per step.
    """
    true_conds = set()
    for p in c.partitions:
        if sizes[p.outer] * sizes[p.inner] == sizes[p.rank]:
            true_conds.add(Op("lt", (flat_key(p.outer, p.inner), Size(p.rank))))
    if not true_conds:
        return c

    def simplify(node: Expr) -> Expr | None:
        if isinstance(node, Op) and node.op == "where" and node.args[0] in true_conds:
            return substitute(node.args[1], simplify)
        return None

    einsums = [
        Einsum(e.output, e.indices, substitute(e.expr, simplify), e.reduce, e.init, loc=e.loc)
        for e in c.einsums
    ]
    return c.with_einsums(einsums)


def row_ranks(c: Cascade, g: FusedGroup, body: Cascade, query: str | None) -> tuple[str, ...]:
    """Ranks every loop tensor has besides the query (batch, heads): mapped one by one."""
    members = [c.writer(n) for n in g.einsums]
    common = set.intersection(*(set(e.output_ranks) for e in members))
    common -= {g.rank, g.inner, query}
    for t in body.inputs:
        if t.ranks:
            common &= set(t.ranks)
    common -= value_ranks(body)  # mapped one at a time, its value in the step would be 0
    return tuple(r for r in c.all_ranks() if r in common)


def value_ranks(c: Cascade) -> set[str]:
    """Ranks whose value an Einsum reads (``h`` of an ALiBi slope), not only as an index."""
    found: set[str] = set()

    def visit(node: Expr) -> Expr | None:
        if isinstance(node, Access):
            return node  # indices are not values; do not descend
        if isinstance(node, Var):
            found.add(node.rank)
        return None

    for e in c.einsums:
        substitute(e.expr, visit)
        if e.init is not None:
            substitute(e.init, visit)
    return found


def grid_rows(
    body: Cascade, g: FusedGroup, query: str | None, sizes: Mapping[str, int]
) -> tuple[str, ...]:
    """The ranks a kernel's grid runs over besides the query blocks: those every carried state
    has (batch, query heads; a K/V input without a query-head rank is read by its group's
    programs), of size above 1."""
    state = [e for e in body.einsums if e.output in g.carried]
    common = set.intersection(*(set(e.output_ranks) for e in state)) - {g.inner, query}
    return tuple(r for r in body.all_ranks() if r in common and sizes[r] > 1)


Splits = dict[str, tuple[tuple[int, str, str], ...]]  # input -> (dim, outer, inner) split


def split_flat_reads(c: Cascade, ranks: tuple[str, ...]) -> tuple[Cascade, Splits]:
    """``c`` with each input dim read at ``a*B+b`` (``a`` one of ``ranks``: a K/V projection
    read per head from its ``[tokens, heads*dim]`` output) declared as two dims ``a, b``, and
    which dims were split (the array is reshaped to match: row-major, ``a`` outer)."""
    drop = set(ranks)
    found: dict[str, dict[int, tuple[str, str]]] = {}
    for e in c.einsums:
        for a in e.expr.walk():
            if isinstance(a, Access) and c.input_decl(a.tensor) is not None:
                for d, i in enumerate(a.indices):
                    if (pair := _flat_pair(i)) is not None and pair[0] in drop:
                        found.setdefault(a.tensor, {})[d] = pair
    if not found:
        return c, {}

    def split(node: Expr) -> Expr | None:
        if not isinstance(node, Access) or node.tensor not in found:
            return None
        out: list[Expr] = []
        for d, i in enumerate(node.indices):
            pair = found[node.tensor].get(d)
            if pair is None:
                out.append(i)
            elif i == flat_key(*pair):
                out += [Var(pair[0]), Var(pair[1])]
            else:
                raise BackendUnsupported(f"{node} reads a split dim of {node.tensor} otherwise")
        return Access(node.tensor, tuple(out))

    decls = []
    for t in c.inputs:
        ranks_t: list[str] = []
        for d, r in enumerate(t.ranks):
            pair = found.get(t.name, {}).get(d)
            ranks_t += list(pair) if pair else [r]
        decls.append(TensorDecl(t.name, tuple(ranks_t), t.dtype, t.loc))
    einsums = tuple(replace(e, expr=substitute(e.expr, split)) for e in c.einsums)
    splits = {t: tuple((d, a, b) for d, (a, b) in sorted(ds.items())) for t, ds in found.items()}
    return Cascade(tuple(decls), einsums, c.outputs, c.sizes, c.partitions), splits


def _flat_pair(index: Expr) -> tuple[str, str] | None:
    """``(a, b)`` of an index ``a*B+b``, else None."""
    if isinstance(index, Op) and index.op == "add" and isinstance(index.args[1], Var):
        inner, head = index.args[1].rank, index.args[0]
        mul = isinstance(head, Op) and head.op == "mul" and head.args[1:] == (Size(inner),)
        if mul and isinstance(head.args[0], Var):  # type: ignore[union-attr]
            return head.args[0].rank, inner  # type: ignore[union-attr]
    return None


def squeezed_dims(c: Cascade, ranks: tuple[str, ...]) -> dict[str, tuple[Expr | None, ...]]:
    """Per tensor, per dim: the index it is read at where that reads only ``ranks`` (the dim
    holds one value per kernel program: a batch row, a head, ``e*K+k`` of a grouped query
    head), else None. Every read of a tensor must agree."""
    drop = set(ranks)
    out: dict[str, tuple[Expr | None, ...]] = {}
    for e in c.einsums:
        out[e.output] = tuple(i if set(rank_vars(i)) & drop else None for i in e.indices)
    for e in c.einsums:
        for a in e.expr.walk():
            if not isinstance(a, Access) or c.input_decl(a.tensor) is None:
                continue
            dims = tuple(
                i if rank_vars(i) and set(rank_vars(i)) <= drop else None for i in a.indices
            )
            if out.setdefault(a.tensor, dims) != dims:
                raise BackendUnsupported(f"{a.tensor} is read at different rows in one step")
    return out


def drop_ranks(
    c: Cascade, ranks: tuple[str, ...], values: Mapping[str, Expr] | None = None
) -> Cascade:
    """``c`` with ``ranks`` removed from every tensor: one kernel program holds one value of
    each (a batch row, a head), so a step's tiles are the 2-D blocks GPU and TPU kernels
    multiply (``squeezed_dims`` says which dims go). A dropped rank's value read anywhere but
    an index becomes ``values[rank]`` (a scalar input the kernel fills from its program id,
    declared here), and is refused where none is given."""
    if not ranks:
        return c
    drop, squeezed, values = set(ranks), squeezed_dims(c, ranks), dict(values or {})
    used: dict[str, TensorDecl] = {}

    def strip(node: Expr) -> Expr | None:
        if isinstance(node, Access) and node.tensor in squeezed:
            dims = squeezed[node.tensor]
            kept = tuple(i for i, d in zip(node.indices, dims) if d is None)
            for i in kept:
                if set(rank_vars(i)) & drop:
                    raise BackendUnsupported(f"{node} mixes a row rank into a tiled index")
            return Access(node.tensor, kept)
        if isinstance(node, Var) and node.rank in drop:
            if node.rank not in values:
                raise BackendUnsupported(f"the rank {node.rank} is read as a value in the loop")
            value = values[node.rank]
            if isinstance(value, Access) and c.input_decl(value.tensor) is None:
                used[value.tensor] = TensorDecl(value.tensor, ())
            return value
        return None

    decls = tuple(
        TensorDecl(
            t.name,
            tuple(r for r, d in zip(t.ranks, squeezed.get(t.name, ())) if d is None)
            if t.name in squeezed
            else t.ranks,
            t.dtype,
            t.loc,
        )
        for t in c.inputs
    )
    einsums = tuple(
        replace(
            e,
            indices=tuple(i for i, d in zip(e.indices, squeezed[e.output]) if d is None),
            expr=substitute(e.expr, strip),
            init=None if e.init is None else substitute(e.init, strip),
        )
        for e in c.einsums
    )
    return Cascade((*decls, *used.values()), einsums, c.outputs, c.sizes, c.partitions)
