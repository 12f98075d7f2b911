"""The rewrite behind ``prune-heads``: head importance into each layer, a top-k op after each
pruning point, later weights gathered to the kept heads and every later segment resized
(see ``prune_heads`` for the semantics)."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
from jax import lax

from einfuse.einsum_cascade.lift import Opaque, Program, Region, Segment
from einfuse.einsum_cascade.lift_flatten import FlatEqn
from einfuse.ir.cascade import Einsum, TensorDecl
from einfuse.ir.expr import Access, Op, Var
from einfuse.passes.defer import unique_name
from einfuse.passes.program_resize import (
    follow_accesses,
    new_sizes,
    resize_opaque,
    resize_region,
    with_accumulator,
)
from einfuse.passes.prune_attention import AttentionSite, PruneError
from einfuse.passes.prune_heads import GATHER_NAME, OP_PREFIX, HeadSite


def prune_program_heads(
    program: Program,
    sites: list[AttentionSite | None],
    heads: list[HeadSite | None],
    kept: list[int],
) -> Program:
    """``program`` keeping ``kept[i]`` heads after attention layer ``i`` (sites per region)."""
    return _Rewrite(program, sites, heads, kept).run()


class _Rewrite:
    """One walk over the segments: importance into each layer, top-k after pruned ones,
    kept-head gathers before every region reading a full-width projection."""

    def __init__(
        self,
        program: Program,
        sites: list[AttentionSite | None],
        heads: list[HeadSite | None],
        kept: list[int],
    ) -> None:
        self.p, self.sites, self.heads, self.kept = program, sites, heads, kept
        self.total = next(h.heads for h in heads if h is not None)
        counts = [self.total, *kept]
        self.last_pruning = max(i for i in range(len(kept)) if counts[i + 1] < counts[i])
        self.avals = dict(program.avals)
        self.rename: dict[int, int] = {}
        self.next_id = 1 + max([*program.avals, *program.inputs, *(v for v, _ in program.consts)])
        self.acc: int | None = None
        self.pos: int | None = None  # original indices of the kept heads
        self.current = self.total
        self.out: list[Segment] = []

    def fresh(self, aval: jax.core.ShapedArray) -> int:
        v, self.next_id = self.next_id, self.next_id + 1
        self.avals[v] = aval
        return v

    def run(self) -> Program:
        layer = region_index = 0
        for seg in self.p.segments:
            if isinstance(seg, Opaque):
                eqn = seg.eqn
                invars = tuple(
                    self.rename.get(a, a) if isinstance(a, int) else a for a in eqn.invars
                )
                self.out.append(resize_opaque(Opaque(replace(eqn, invars=invars)), self.avals))
                continue
            region = replace(seg, inputs=tuple(self.rename.get(v, v) for v in seg.inputs))
            site, hs = self.sites[region_index], self.heads[region_index]
            region_index += 1
            extra = self._head_sizes(region, hs)
            region = resize_region(self._gather_inputs(region, extra), self.avals, extra)
            if site is None or hs is None or layer > self.last_pruning:
                self.out.append(region)
                layer += site is not None
                continue
            region, context, axis = self._with_importance(region, site, hs)
            self.out.append(region)
            if self.kept[layer] < self.current:
                self.out.append(self._prune(layer, self.kept[layer], context, axis))
            layer += 1
        outputs = tuple(self.rename.get(a, a) if isinstance(a, int) else a for a in self.p.outputs)
        return replace(self.p, segments=tuple(self.out), outputs=outputs, avals=self.avals)

    def _head_sizes(self, region: Region, hs: HeadSite | None) -> dict[str, int]:
        """A later layer computes only the kept heads: its head and projection ranks shrink."""
        if hs is None or self.pos is None:
            return {}
        c = region.cascade
        sizes = {hs.head: self.current}
        sizes.update({r: int(c.size(r)) // hs.heads * self.current for r in hs.flat})
        return sizes

    def _gather_inputs(self, region: Region, extra: dict[str, int]) -> Region:
        """Gather, before ``region``, every full-width input (a projection's weights or bias)
        along the ranks that now hold only the kept heads."""
        c = region.cascade
        sizes = {**new_sizes(region, self.avals), **extra}
        if not sizes:
            return region
        follow_accesses(c, sizes)
        inputs = list(region.inputs)
        for n, (value, tensor) in enumerate(zip(region.inputs, region.input_tensors)):
            for axis, rank in enumerate(c.tensor_ranks(tensor)):
                old = int(c.size(rank))
                if rank not in sizes or sizes[rank] == old or self.avals[value].shape[axis] != old:
                    continue
                if self.pos is None or old % self.total:
                    raise PruneError(
                        f"prune-heads: %{value} ({tensor}) has {old} entries along {rank}, "
                        f"not a multiple of the {self.total} heads; it cannot be pruned by head"
                    )
                inputs[n] = self._gather_weight(inputs[n], axis, old // self.total)
        return replace(region, inputs=tuple(inputs))

    def _with_importance(
        self, region: Region, site: AttentionSite, hs: HeadSite
    ) -> tuple[Region, int, int]:
        """``region`` also writing ``ACC[head]`` = accumulated ``sum |context|``; returns it,
        the context value and its head axis."""
        c = region.cascade
        found = [
            (v, t)
            for v, t in zip(region.outputs, region.output_tensors)
            if hs.head in c.tensor_ranks(t)
        ]
        if len(found) != 1:
            raise PruneError(
                f"prune-heads: the attention writing {site.probs} needs its per-head output as "
                "the one region output with a head rank (the output projection after it)"
            )
        value, ctx = found[0]
        ranks = c.tensor_ranks(ctx)
        taken = {t.name for t in c.inputs} | {e.output for e in c.einsums}
        imp = unique_name("HEAD_IMPORTANCE", taken)
        acc = unique_name("HEAD_ACCUMULATED", taken | {imp})
        acc_in = unique_name("HEAD_ACCUMULATED_IN", taken | {imp, acc})
        left = (Var(hs.head),)
        einsums = [*c.einsums, Einsum(imp, left, Op("abs", (Access(ctx, tuple(map(Var, ranks))),)))]
        decls = list(c.inputs)
        if self.acc is not None:
            decls.append(TensorDecl(acc_in, (hs.head,), site.dtype))
            einsums.append(Einsum(acc, left, Op("add", (Access(imp, left), Access(acc_in, left)))))
        else:
            acc = imp
        cascade = c.with_einsums(einsums, inputs=tuple(decls), outputs=(*c.outputs, acc))
        previous = self.acc
        self.acc = self.fresh(jax.core.ShapedArray((self.current,), jnp.dtype(site.dtype)))
        region = with_accumulator(region, cascade, previous, acc_in, self.acc, acc)
        return region, value, ranks.index(hs.head)

    def _prune(self, layer: int, k: int, context: int, axis: int) -> Opaque:
        """The top-k op after layer ``layer``: keeps ``k`` heads of its context."""
        args = [self.acc] + ([self.pos] if self.pos is not None else []) + [context]
        fn = _top_k_heads(k, axis, first=self.pos is None, name=f"{OP_PREFIX}{layer}_keep{k}")
        op, outs = self._opaque(fn, args)
        self.acc, self.pos, self.rename[context] = outs
        self.current = k
        return op

    def _gather_weight(self, value: int, axis: int, width: int) -> int:
        """A gather op (appended before the region) keeping the kept heads' ``width`` entries
        each along ``axis`` of ``value``."""
        op, (out,) = self._opaque(_gather_heads(axis, width), [self.pos, value])
        self.out.append(op)
        return out

    def _opaque(self, fn, args: list) -> tuple[Opaque, list[int]]:
        closed = jax.make_jaxpr(fn)(*(self.avals[a] for a in args))
        (eqn,) = closed.jaxpr.eqns
        outs = [self.fresh(o.aval) for o in eqn.outvars]
        return Opaque(FlatEqn(eqn, tuple(args), tuple(outs), source=eqn.source_info)), outs


def retrace_head_top_k(op: Opaque, avals: dict[int, jax.core.ShapedArray]) -> Opaque:
    """A head top-k op of an earlier ``prune-heads`` traced again at the shapes ``avals`` now
    gives its inputs (``prune-tokens`` gathered its context over fewer tokens); updates its
    outputs' avals. Its axis is the one where the context loses heads."""
    eqn = op.eqn
    args = [a for a in eqn.invars if isinstance(a, int)]
    context_in, context_out = eqn.in_avals()[-1], eqn.out_avals()[-1]
    axis = next(d for d, (a, b) in enumerate(zip(context_in.shape, context_out.shape)) if a != b)
    k = context_out.shape[axis]
    name = str(eqn.params["name"])
    fn = _top_k_heads(k, axis, first=len(args) == 2, name=name)
    closed = jax.make_jaxpr(fn)(*(avals[a] for a in args))
    (new,) = closed.jaxpr.eqns
    outs = tuple(eqn.outvars)
    for var, out in zip(outs, new.outvars):
        avals[var] = out.aval
    return Opaque(FlatEqn(new, tuple(args), outs, source=eqn.source))


def _top_k_heads(k: int, axis: int, first: bool, name: str):
    """A jitted op: ``(acc, [pos,] context) -> (acc, pos, context)`` on the ``k`` kept heads
    (``lax.top_k`` keeps the lower index on ties; kept heads stay in their order)."""

    def op(acc: jax.Array, *rest: jax.Array) -> tuple[jax.Array, ...]:
        if first:
            pos, (context,) = lax.iota(jnp.int32, acc.shape[0]), rest
        else:
            pos, context = rest
        idx = jnp.sort(lax.top_k(acc, k)[1])
        return acc[idx], pos[idx], jnp.take(context, idx, axis=axis)

    op.__name__ = op.__qualname__ = name
    return jax.jit(op)


def _gather_heads(axis: int, width: int):
    """A jitted op: ``(pos, w) -> w`` at entries ``h*width + u`` of the kept heads ``h``."""

    def op(pos: jax.Array, w: jax.Array) -> jax.Array:
        flat = (pos[:, None] * width + jnp.arange(width, dtype=pos.dtype)).reshape(-1)
        return jnp.take(w, flat, axis=axis)

    op.__name__ = op.__qualname__ = GATHER_NAME
    return jax.jit(op)
