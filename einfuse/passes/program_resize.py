"""Run a program's later segments on values whose shapes a program pass changed.

After prune-tokens gathers the kept tokens, every later region and opaque equation reads
shorter values. A region follows by resizing the ranks its inputs now disagree on (a rank's
new size must be the same from every input); an opaque equation by rewriting the shape
parameters of ``reshape`` and ``broadcast_in_dim`` and re-deriving its output shapes. What
cannot follow is refused by name, never run at the old shape. A resized region refuses to be
differentiated (``derivative="none"``): its original equations, which carry the user's
derivative rules (softmax's stop_gradient), have the old shapes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import replace

import jax
from jax._src import core

from einfuse.einsum_cascade.lift import Opaque, Region
from einfuse.einsum_cascade.lift_flatten import FlatEqn
from einfuse.ir.cascade import Cascade
from einfuse.ir.expr import Const, Expr, Op, Var, accesses
from einfuse.ir.verify import verify
from einfuse.passes.prune_attention import COMPARISONS, PruneError

# Shapes these primitives produce come from their parameters, not their inputs.
_SHAPE_PARAMS = frozenset({"iota", "full", "broadcast", "rng_uniform", "random_bits"})


def resize_region(
    region: Region,
    avals: MutableMapping[int, core.ShapedArray],
    extra: Mapping[str, int] | None = None,
) -> Region:
    """``region`` at the shapes ``avals`` now gives its inputs; updates its outputs' avals.
    ``extra`` resizes ranks no input shows (prune-heads: the head rank of ``Q[s*U+u]``)."""
    c = region.cascade
    sizes = new_sizes(region, avals)
    sizes.update(extra or {})
    if not sizes:
        return region
    follow_accesses(c, sizes)
    _refuse_baked_counts(c, sizes)
    _refuse_index_values(c, sizes)
    cascade = verify(c.with_sizes(**sizes))
    for value, tensor in zip(region.outputs, region.output_tensors):
        shape = tuple(int(n) for n in cascade.tensor_shape(tensor))
        avals[value] = avals[value].update(shape=shape)
    # Its original equations, which carry its derivative rules, hold the old shapes.
    return replace(region, cascade=cascade, derivative="none")


def new_sizes(region: Region, avals: Mapping[int, core.ShapedArray]) -> dict[str, int]:
    """The ranks whose size the region's inputs now disagree on, with their new sizes."""
    c = region.cascade
    sizes: dict[str, int] = {}
    for value, tensor in zip(region.inputs, region.input_tensors):
        have = tuple(avals[value].shape)
        for rank, h, w in zip(c.tensor_ranks(tensor), have, c.tensor_shape(tensor)):
            if h != w and sizes.setdefault(rank, h) != h:
                raise PruneError(
                    f"prune-tokens: rank {rank} would be both {sizes[rank]} and {h} long "
                    f"(tensor {tensor} holds %{value}): a value over the pruned tokens was "
                    "not pruned with them"
                )
    return sizes


def follow_accesses(c: Cascade, sizes: dict[str, int]) -> None:
    """Resize the ranks that read a resized rank whole (``K[g] = X[b]`` with ``b`` resized: the
    key rank ``g`` is the same tokens under another name), until nothing changes."""
    pairs = set()
    for e in c.einsums:
        for a in accesses(e.expr):
            for index, rank in zip(a.indices, c.tensor_ranks(a.tensor)):
                if (
                    isinstance(index, Var)
                    and index.rank != rank
                    and c.size(index.rank) == c.size(rank)
                ):
                    pairs.add((index.rank, rank))
    changed = True
    while changed:
        changed = False
        for x, y in pairs:
            for u, v in ((x, y), (y, x)):
                if u in sizes and v not in sizes:
                    sizes[v], changed = sizes[u], True


def _refuse_baked_counts(c: Cascade, sizes: dict[str, int]) -> None:
    """Refuse a sum over a resized rank divided by its old size as a literal (``jnp.mean`` over
    the tokens): it would silently divide by the old count."""
    for e in c.einsums:
        for rank in set(e.reduced_ranks) & set(sizes):
            old = c.size(rank)
            for user in c.consumers(e.output):
                if any(isinstance(x, Const) and x.value == old for x in user.expr.walk()):
                    raise PruneError(
                        f"prune-tokens: {user.output} divides a sum over the pruned tokens by "
                        f"their original count {old} (a mean over tokens); pool with a mask "
                        "sum instead"
                    )


def _refuse_index_values(c: Cascade, sizes: dict[str, int]) -> None:
    """Refuse a resized rank's index used as a value (rotary angles or ALiBi from an int
    ``iota``): it would count the kept entries, not their original positions. A comparison of
    two resized ranks (a causal mask ``r >= j``) keeps its meaning: kept entries stay in order."""
    for e in c.einsums:
        for parent, var in _index_values(e.expr, None):
            if var.rank not in sizes:
                continue
            both = (
                parent is not None
                and parent.op in COMPARISONS
                and all(isinstance(a, Var) and a.rank in sizes for a in parent.args)
            )
            if not both:
                raise PruneError(
                    f"prune: {e.output} uses the index of the pruned rank {var.rank} as a "
                    "value (positions from an integer iota); it would count the kept entries, "
                    "not their original positions"
                )


def _index_values(expr: Expr, parent: Op | None) -> Iterator[tuple[Op | None, Var]]:
    """Rank variables read as values (not as tensor indices), with the op reading each."""
    if isinstance(expr, Var):
        yield parent, expr
    elif isinstance(expr, Op):
        for a in expr.args:
            yield from _index_values(a, expr)


def resize_opaque(op: Opaque, avals: MutableMapping[int, core.ShapedArray]) -> Opaque:
    """``op`` at the shapes ``avals`` now gives its inputs; updates its outputs' avals."""
    eqn = op.eqn
    old = eqn.in_avals()
    new = [avals[a] if isinstance(a, int) else a.aval for a in eqn.invars]
    if all(o.shape == n.shape for o, n in zip(old, new)):
        return op
    where = f"prune-tokens: {op.primitive} at {op.source}"
    if op.primitive in _SHAPE_PARAMS:
        raise PruneError(
            f"{where} makes a shape from its parameters; it cannot run on fewer tokens"
        )
    params = dict(eqn.params)
    if op.primitive == "reshape":
        params["new_sizes"] = _reshaped(old[0].shape, new[0].shape, params["new_sizes"], where)
    elif op.primitive == "broadcast_in_dim":
        shape = list(params["shape"])
        for j, d in enumerate(params["broadcast_dimensions"]):
            if old[0].shape[j] != new[0].shape[j]:
                shape[d] = new[0].shape[j]
        params["shape"] = tuple(shape)
    elif op.primitive == "slice":
        params["limit_indices"] = _sliced(old[0].shape, new[0].shape, params, where)
    flat = replace(eqn, eqn=eqn.eqn.replace(params=params))
    try:
        closed = jax.make_jaxpr(lambda *xs: _bind(flat, xs))(*new)
    except Exception as exc:  # any failure means: this op cannot follow the new shapes
        raise PruneError(f"{where} cannot run on the pruned shapes: {exc}") from exc
    # The equation traced again holds the new shapes, so a later program pass sees them.
    eqns = closed.jaxpr.eqns
    for var, out in zip(eqn.outvars, closed.out_avals):
        if isinstance(var, int):
            avals[var] = avals[var].update(shape=tuple(out.shape))
    return Opaque(replace(flat, eqn=eqns[0]) if len(eqns) == 1 else flat)


def _sliced(old_in: tuple[int, ...], new_in: tuple[int, ...], params: dict, where: str):
    """A slice's new limits: a resized axis must have been taken whole (rotate-half slices
    the head dimension, not the tokens)."""
    limits = list(params["limit_indices"])
    strides = params.get("strides") or (1,) * len(limits)
    for j, (o, n) in enumerate(zip(old_in, new_in)):
        if o == n:
            continue
        if params["start_indices"][j] != 0 or limits[j] != o or strides[j] != 1:
            raise PruneError(f"{where} slices the pruned axis; it cannot be resized")
        limits[j] = n
    return tuple(limits)


def _bind(flat: FlatEqn, xs: tuple) -> list:
    e = flat.eqn
    out = e.primitive.bind(*xs, **e.primitive.get_bind_params(e.params))
    return list(out) if e.primitive.multiple_results else [out]


def _reshaped(
    old_in: tuple[int, ...], new_in: tuple[int, ...], sizes: tuple[int, ...], where: str
) -> tuple[int, ...]:
    """A reshape's new sizes: each resized input dim must start an output dim at the same
    offset (the product of the dims before it), alone or merged with the unchanged dims after
    it (prune-heads: ``[b, t, heads, d] -> [b, t, heads*d]``)."""
    out = list(sizes)
    for j, (o, n) in enumerate(zip(old_in, new_in)):
        if o == n:
            continue
        before = _prod(old_in[:j])
        match = [i for i in range(len(sizes)) if _prod(sizes[:i]) == before and sizes[i] % o == 0]
        if len(match) != 1:
            raise PruneError(f"{where} merges or splits the pruned axis; it cannot be resized")
        out[match[0]] = sizes[match[0]] // o * n
    return tuple(out)


def _prod(xs: tuple[int, ...]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def with_accumulator(
    region: Region, cascade: Cascade, previous: int | None, acc_in: str, new: int, acc: str
) -> Region:
    """``region`` running ``cascade``, which reads the running importance (value
    ``previous``, if any) as tensor ``acc_in`` and writes the updated one as ``acc`` (value
    ``new``); its derivative is none: its original equations do not compute the importance."""
    inputs, tensors = region.inputs, region.input_tensors
    if previous is not None:
        inputs, tensors = (*inputs, previous), (*tensors, acc_in)
    return replace(
        region,
        cascade=cascade,
        inputs=inputs,
        input_tensors=tensors,
        outputs=(*region.outputs, new),
        output_tensors=(*region.output_tensors, acc),
        derivative="none",
    )
