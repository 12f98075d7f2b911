"""The rewrite behind ``prune-tokens``: importance into each layer, a top-k op after each
pruning point, every later segment resized (see ``prune_tokens`` for the semantics).

``shared`` (causal models) keeps the same tokens for every batch row, so the positions kept
are one vector: a later layer that reads a value over all the original tokens (rotary
tables, recomputed from an ``iota`` in every layer, or anything computed before pruning) reads
it gathered at the kept tokens' original positions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import jax
import jax.numpy as jnp
from jax import lax

from einfuse.einsum_cascade.lift import Opaque, Program, Region, Segment
from einfuse.einsum_cascade.lift_flatten import FlatEqn
from einfuse.passes.program_resize import (
    follow_accesses,
    resize_opaque,
    resize_region,
    with_accumulator,
)
from einfuse.passes.prune_attention import AttentionSite, PruneError, add_importance
from einfuse.passes.prune_heads import OP_PREFIX as HEAD_PREFIX
from einfuse.passes.prune_heads_rewrite import retrace_head_top_k
from einfuse.passes.prune_tokens import GATHER_NAME, OP_PREFIX


def prune_program(
    program: Program, sites: list[AttentionSite | None], kept: list[int], shared: bool = False
) -> Program:
    """``program`` keeping ``kept[i]`` tokens after attention layer ``i`` (sites per region);
    ``shared``: the same tokens for every row (causal models)."""
    return _Rewrite(program, sites, kept, shared).run()


class _Rewrite:
    """One walk over the segments: importance into each layer, top-k after pruned ones."""

    def __init__(
        self, program: Program, sites: list[AttentionSite | None], kept: list[int], shared: bool
    ) -> None:
        self.p, self.sites, self.kept, self.shared = program, sites, kept, shared
        length = next(int(r.cascade.size(s.key)) for r, s in zip(program.regions, sites) if s)
        self.length = length
        counts = [length, *kept]
        # Importance is needed up to the last layer that prunes, and no further.
        self.last_pruning = max(i for i in range(len(kept)) if counts[i + 1] < counts[i])
        self.avals = dict(program.avals)
        self.rename: dict[int, int] = {}
        self.next_id = 1 + max([*program.avals, *program.inputs, *(v for v, _ in program.consts)])
        self.last_read = _last_reads(program)
        self.defined_at = _definitions(program)
        self.token_axes = _token_axes(program, sites, shared)
        self.acc: int | None = None
        self.pos: int | None = None
        self.out: list[Segment] = []
        self.stage: dict[int, int | None] = {length: None}  # token count -> kept positions

    def fresh(self, aval: jax.core.ShapedArray) -> int:
        v, self.next_id = self.next_id, self.next_id + 1
        self.avals[v] = aval
        return v

    def run(self) -> Program:
        out = self.out
        layer = region_index = 0
        for j, seg in enumerate(self.p.segments):
            if isinstance(seg, Opaque):
                eqn = seg.eqn
                invars = tuple(
                    self.rename.get(a, a) if isinstance(a, int) else a for a in eqn.invars
                )
                op = Opaque(replace(eqn, invars=invars))
                if str(eqn.params.get("name", "")).startswith(HEAD_PREFIX):
                    op = retrace_head_top_k(op, self.avals)  # prune-heads ran first
                out.append(resize_opaque(op, self.avals))
                continue
            region = replace(seg, inputs=tuple(self.rename.get(v, v) for v in seg.inputs))
            region = resize_region(self._gather_stale(region), self.avals)
            site = self.sites[region_index]
            region_index += 1
            if site is None or layer > self.last_pruning:
                out.append(region)
                continue
            region = self._with_importance(region, site)
            out.append(region)
            if self.kept[layer] < self.avals[self.acc].shape[-1]:
                out.append(self._prune(layer, j, self.kept[layer]))
            layer += 1
        outputs = tuple(self.rename.get(a, a) if isinstance(a, int) else a for a in self.p.outputs)
        return replace(self.p, segments=tuple(out), outputs=outputs, avals=self.avals)

    def _with_importance(self, region: Region, site: AttentionSite) -> Region:
        cascade, acc, acc_in = add_importance(
            region.cascade, site, self.acc is not None, self.shared
        )
        previous = self.acc
        shape = tuple(int(n) for n in cascade.tensor_shape(acc))
        self.acc = self.fresh(jax.core.ShapedArray(shape, jnp.dtype(site.dtype)))
        return with_accumulator(region, cascade, previous, acc_in, self.acc, acc)

    def _prune(self, layer: int, j: int, k: int) -> Opaque:
        """The top-k op after segment ``j``: gathers every token value read later."""
        current = {old: self.rename.get(old, old) for old in self.token_axes}
        gathered = {
            current[old]: axes
            for old, axes in self.token_axes.items()
            if self.defined_at.get(old, math.inf) <= j < self.last_read.get(old, -1)
        }
        values = list(gathered)
        args = [self.acc] + ([self.pos] if self.pos is not None else []) + values
        axes = [gathered[v] for v in values]
        name = f"{OP_PREFIX}{layer}_keep{k}"
        if self.shared:
            fn = _top_k_shared(k, [t for _, t in axes], self.pos is None, self.length, name)
        else:
            fn = _top_k_gather(k, axes, first=self.pos is None, name=name)
        op, outs = self._opaque(fn, args)
        self.acc, self.pos = outs[0], outs[1]
        self.stage[k] = self.pos
        for value, new in zip(values, outs[2:]):
            old = next(o for o, c in current.items() if c == value)
            self.rename[old] = new
        return op

    def _opaque(self, fn, args: list[int]) -> tuple[Opaque, list[int]]:
        closed = jax.make_jaxpr(fn)(*(self.avals[a] for a in args))
        (eqn,) = closed.jaxpr.eqns
        outs = [self.fresh(o.aval) for o in eqn.outvars]
        return Opaque(FlatEqn(eqn, tuple(args), tuple(outs), source=eqn.source_info)), outs

    def _gather_stale(self, region: Region) -> Region:
        """After a pruning point, an input still over the tokens of an earlier stage along a
        pruned rank (a rotary table recomputed in a later layer, a residual from before the
        last pruning point): with ``shared`` positions, gathered at the tokens the region runs
        on (an op before it); per-row positions would need a batch axis it may lack: refused."""
        if self.pos is None:
            return region
        c = region.cascade
        shapes = [self.avals[v].shape for v in region.inputs]
        sizes: dict[str, int] = {}
        for shape, tensor in zip(shapes, region.input_tensors):
            for rank, have, want in zip(c.tensor_ranks(tensor), shape, c.tensor_shape(tensor)):
                if have != want:
                    sizes[rank] = min(have, sizes.get(rank, have))
        follow_accesses(c, sizes)
        inputs = list(region.inputs)
        for n, (shape, tensor) in enumerate(zip(shapes, region.input_tensors)):
            ranks = c.tensor_ranks(tensor)
            stale = [a for a, r in enumerate(ranks) if r in sizes and shape[a] != sizes[r]]
            if not stale:
                continue
            src, dst = {shape[a] for a in stale}, {sizes[ranks[a]] for a in stale}
            known = len(src) == len(dst) == 1 and src | dst <= set(self.stage)
            if not (self.shared and known):
                raise PruneError(
                    f"prune-tokens: %{inputs[n]} ({tensor}) is read over {list(shape)} where "
                    "the pruned tokens are fewer; it was not pruned with them"
                )
            (have,), (want,) = src, dst
            args = [p for p in (self.stage[have], self.stage[want], inputs[n]) if p is not None]
            op, (inputs[n],) = self._opaque(_regather(tuple(stale), have < self.length), args)
            self.out.append(op)
        return replace(region, inputs=tuple(inputs))


def _token_axes(
    program: Program, sites: list[AttentionSite | None], shared: bool
) -> dict[int, tuple[int | None, int]]:
    """(batch axis, token axis) of every value an attention region reads or writes with a
    token rank: what a pruning point must gather if it is read later (``shared``: the batch
    axis does not matter, and a value over two token axes is left to ``_gather_stale``)."""
    axes: dict[int, tuple[int | None, int]] = {}
    for region, site in zip(program.regions, sites):
        if site is None:
            continue
        c = region.cascade
        interface = list(zip(region.inputs, region.input_tensors))
        interface += list(zip(region.outputs, region.output_tensors))
        for value, tensor in interface:
            ranks = c.tensor_ranks(tensor)
            tokens = [d for d, r in enumerate(ranks) if r in (site.key, site.query)]
            if not tokens or (shared and len(tokens) > 1):
                continue
            if shared:
                axes[value] = (None, tokens[0])
                continue
            if len(tokens) != 1 or (site.batch is not None and site.batch not in ranks):
                raise PruneError(
                    f"prune-tokens: %{value} ({tensor}[{', '.join(ranks)}]) has no single "
                    "token axis beside its batch axis"
                )
            batch = ranks.index(site.batch) if site.batch is not None else None
            found = (batch, tokens[0])
            if axes.setdefault(value, found) != found:
                raise PruneError(f"prune-tokens: %{value} has its tokens on two axes")
    return axes


def _definitions(program: Program) -> dict[int, float]:
    """The segment defining each value id (program inputs and constants: -1)."""
    at: dict[int, float] = {v: -1 for v in program.inputs}
    at.update((v, -1) for v, _ in program.consts)
    for j, seg in enumerate(program.segments):
        writes = seg.eqn.outvars if isinstance(seg, Opaque) else seg.outputs
        at.update((v, j) for v in writes if isinstance(v, int))
    return at


def _last_reads(program: Program) -> dict[int, float]:
    """Each value id's last reading segment (program outputs: infinity)."""
    last: dict[int, float] = {}
    for j, seg in enumerate(program.segments):
        reads = seg.eqn.invars if isinstance(seg, Opaque) else seg.inputs
        for a in reads:
            if isinstance(a, int):
                last[a] = j
    for a in program.outputs:
        if isinstance(a, int):
            last[a] = math.inf
    return last


def _top_k_gather(k: int, axes: Sequence[tuple[int | None, int]], first: bool, name: str):
    """A jitted op: ``(acc, [pos,] *values) -> (acc, pos, *values)`` on the ``k`` kept tokens."""

    def op(acc: jax.Array, *rest: jax.Array) -> tuple[jax.Array, ...]:
        rows = acc if acc.ndim == 2 else acc[None]  # one row: no batch axis
        if first:
            pos = lax.broadcasted_iota(jnp.int32, rows.shape, 1)
        else:
            pos, rest = rest[0], rest[1:]
        score = jnp.where(pos == 0, jnp.inf, rows)  # the first token (CLS) is never pruned
        idx = jnp.sort(lax.top_k(score, k)[1], axis=-1)
        picked = [_gather(x, idx, b, t) for x, (b, t) in zip(rest, axes)]
        kept_acc = _gather(rows, idx, 0, 1)
        return (kept_acc if acc.ndim == 2 else kept_acc[0], _gather(pos, idx, 0, 1), *picked)

    op.__name__ = op.__qualname__ = name
    return jax.jit(op)


def _gather(x: jax.Array, idx: jax.Array, batch: int | None, token: int) -> jax.Array:
    """``x`` at the kept tokens ``idx[b, :]`` of each batch row ``b``."""
    if batch is None:
        return jnp.take(x, idx[0], axis=token)
    moved = jnp.moveaxis(x, (batch, token), (0, 1))
    picked = jax.vmap(lambda row, i: row[i])(moved, idx)
    return jnp.moveaxis(picked, (0, 1), (batch, token))


def _top_k_shared(k: int, axes: Sequence[int], first: bool, length: int, name: str):
    """A jitted op: ``(acc, [pos,] *values) -> (acc, pos, *values)`` on the ``k`` kept tokens,
    the same for every row. The last token (whose output predicts the next one) is kept first,
    then the first (the attention sink), then the top-k of ``acc``."""

    def op(acc: jax.Array, *rest: jax.Array) -> tuple[jax.Array, ...]:
        if first:
            pos = lax.iota(jnp.int32, acc.shape[0])
        else:
            pos, rest = rest[0], rest[1:]
        score = jnp.where(pos == 0, jnp.finfo(acc.dtype).max, acc)
        score = jnp.where(pos == length - 1, jnp.inf, score)
        idx = jnp.sort(lax.top_k(score, k)[1])
        picked = [jnp.take(x, idx, axis=t) for x, t in zip(rest, axes)]
        return (acc[idx], pos[idx], *picked)

    op.__name__ = op.__qualname__ = name
    return jax.jit(op)


def _regather(axes: tuple[int, ...], relative: bool):
    """A jitted op: ``([src,] dst, x) -> x`` at the tokens of original positions ``dst`` along
    ``axes``, from a value over all tokens or (``relative``) over the positions ``src``."""

    def op(*args: jax.Array) -> jax.Array:
        *pos, x = args
        idx = jnp.searchsorted(pos[0], pos[1]) if relative else pos[0]
        for axis in axes:
            x = jnp.take(x, idx, axis=axis)
        return x

    op.__name__ = op.__qualname__ = GATHER_NAME
    return jax.jit(op)
