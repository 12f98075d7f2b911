"""The backward pass of a fused group as two Pallas kernels (FlashAttention's, from the IR).

The loop's result reads the final sums (``RD``, ``RNV``) and not the running max. With the
running max fixed at its final value ``m``, a sum is the plain sum over key tiles of what
one tile adds in that frame (``exp(s - m)``, ``exp(s - m) v``), and the result does not
depend on ``m`` at all. So the gradient is a sum over tiles of one tile's VJP: the step
with the max state held at ``m`` and the sums starting from zero (``tile_cascade``), whose
``jax.vjp`` is taken inside the kernels. Two kernels avoid atomics:

* dQ: the forward grid (rows x query blocks), each program looping over the key tiles its
  band reaches (every tile where the mask's fill must be checked);
* dK, dV: a grid of rows x key tiles, each program looping over every query block; a K/V
  head read by a group of query heads gets one partial per query head, summed after.

Nothing is saved but the inputs and the final states (O(P) per row, no per-step state).
Where the result reads the running max, an initial state is not a constant, or an input
is read by every query block (its gradient would be a sum across programs), the backward
is the JAX loop's (``BackendUnsupported`` says which).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from einfuse.backends.blockwise_plan import QBLOCK, STEP, drop_ranks
from einfuse.backends.jax_backend import lower_cascade
from einfuse.backends.jax_mask import band_tiles
from einfuse.backends.jax_values import BackendUnsupported
from einfuse.backends.pallas.kernel_compat import compatible
from einfuse.ir.cascade import Cascade
from einfuse.ir.expr import Access, Const, Op, Var
from einfuse.passes.dce import reads

if TYPE_CHECKING:
    from einfuse.backends.pallas.attention import PallasBlockwise


def tile_cascade(body: Cascade, carried: tuple[str, ...]) -> tuple[Cascade, tuple[str, ...]]:
    """The step with each running max held at its ``__prev`` (the final max) and which
    carried states are those maxima."""
    maxima = []
    einsums = []
    for e in body.einsums:
        x = e.expr
        prev = Access(f"{e.output}__prev", e.indices)
        if e.output in carried and isinstance(x, Op) and x.op == "max" and prev in x.args:
            maxima.append(e.output)
            e = replace(e, expr=prev)
        einsums.append(e)
    return body.with_einsums(einsums), tuple(maxima)


class PallasBackward:
    """The VJP of a ``PallasBlockwise`` loop's final sums with respect to its inputs."""

    def __init__(self, fwd: PallasBlockwise, options: Mapping[str, Any]) -> None:
        self.fwd = fwd
        g = fwd.plan.group
        tile, self.maxima = tile_cascade(fwd.kernel_cascade, g.carried)
        self.sums = tuple(t for t in g.carried if t not in self.maxima)
        if not self.maxima or not self.sums:
            raise BackendUnsupported("the loop has no running max and sums to differentiate")
        if set(g.carried) - set(fwd.const_init):
            raise BackendUnsupported("an initial state is not a constant")
        if set(self.maxima) & {t for e in fwd.plan.post.einsums for t in reads(e)}:
            raise BackendUnsupported("the result reads the running max")
        self.tile = lower_cascade(
            drop_ranks(tile, fwd.drop, fwd.values), fwd.kernel_sizes, wide_dots=True, **options
        )
        names = [t.name for t in fwd.kernel_cascade.inputs if t.name not in (STEP, QBLOCK)]
        tiled = [n for n in names if n.endswith("__blk")]
        # A tiled input with the query rank too (scores the lifter computed before the
        # loop): each of its (query block, key tile) tiles is read once, in the dQ kernel.
        self.scores = [n for n in tiled if fwd.query_dim(n, False) is not None]
        self.keys = [n for n in tiled if n not in self.scores]
        self.queries = [n for n in names if n not in tiled and not n.endswith("__prev")]
        self.queries = [n for n in self.queries if not n.endswith("__ROW")]
        for n in self.queries:
            if fwd.query_dim(n, False) is None:
                raise BackendUnsupported(f"{n} is read by every query block")
        for n in self.keys:
            for index in fwd.operand(n)[1]:
                if index is not None and not isinstance(index, Var | Const):
                    raise BackendUnsupported(f"{n} is read at row {index}: no plain head")

    # -- the two kernels -----------------------------------------------------------------
    def __call__(
        self, raw: Mapping[str, jax.Array], finals: Mapping[str, jax.Array], ct: Mapping[str, Any]
    ) -> dict[str, jax.Array]:
        def call(platform: str) -> list[jax.Array]:
            tpu = platform == "tpu"
            dq = self._dq(raw, finals, ct, platform, tpu)
            dk = self._dk(raw, finals, ct, platform, tpu) if self.keys else []
            return [*dq, *dk]

        if self.fwd.config.interpret_tpu:
            grads = call("tpu-interpret")
        else:
            grads = lax.platform_dependent(
                cpu=lambda: call("cpu"),
                cuda=lambda: call("cuda"),
                rocm=lambda: call("rocm"),
                tpu=lambda: call("tpu"),
            )
        out = dict(zip([*self.queries, *self.scores, *self.keys], grads))
        return {n: out[n].astype(x.dtype) if n in out else _zero(x) for n, x in raw.items()}

    def _stats(
        self, finals: Mapping[str, jax.Array], ct: Mapping[str, Any], tpu: bool
    ) -> tuple[list[str], list[jax.Array]]:
        """The final maxima and the sums' cotangents, laid out as the carried states."""
        fwd, names, arrays = self.fwd, [], []
        for t in self.maxima:
            names.append(t)
            arrays.append(fwd.to_kernel(t, finals[t], tpu))
        for t in self.sums:
            names.append(t)
            c = ct[t]
            c = jnp.zeros(finals[t].shape, fwd.carry[t]) if _is_zero(c) else c
            arrays.append(fwd.to_kernel(t, jnp.asarray(c, fwd.carry[t]), tpu))
        return names, arrays

    def _dq(self, raw: Any, finals: Any, ct: Any, platform: str, tpu: bool) -> list[jax.Array]:
        fwd = self.fwd
        ins = [*self.queries, *self.scores, *self.keys]
        written = [*self.queries, *self.scores]
        args = [fwd.to_kernel(n, raw[n], tpu) for n in ins]
        stats, stat_args = self._stats(finals, ct, tpu)
        grid = (*(fwd.sizes[r] for r in fwd.grid_rows), fwd.q_blocks)
        outs = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in args[: len(written)]]
        specs = [fwd.spec(n, a.shape, tpu) for n, a in zip(ins, args)]
        specs += [fwd.spec(t, a.shape, tpu) for t, a in zip(stats, stat_args)]
        out_specs = [fwd.spec(n, o.shape, tpu) for n, o in zip(written, outs)]
        program = functools.partial(self._dq_program, ins, stats, tpu, _triton(platform))
        grads = self._call(program, platform, grid, specs, outs, out_specs)(*args, *stat_args)
        return [fwd.from_kernel(n, y, tpu) for n, y in zip(written, grads)]

    def _dk(self, raw: Any, finals: Any, ct: Any, platform: str, tpu: bool) -> list[jax.Array]:
        fwd = self.fwd
        g = fwd.plan.group
        ins = [*self.queries, *self.scores, *self.keys]
        args = [fwd.to_kernel(n, raw[n], tpu) for n in ins]
        stats, stat_args = self._stats(finals, ct, tpu)
        rows = tuple(fwd.sizes[r] for r in fwd.grid_rows)
        grid = (*rows, fwd.sizes[g.rank])
        tile = fwd.sizes[g.inner]
        # One partial gradient per grid row (a query head), its key tile at the grid's last id.
        outs, out_specs = [], []
        for n in self.keys:
            kept = fwd.kept_shape(n, raw[n], tpu)
            outs.append(jax.ShapeDtypeStruct((*rows, *kept), jnp.float32))
            kd = fwd.key_dim(n, tpu)
            block = (*(None for _ in rows), *(tile if d == kd else s for d, s in enumerate(kept)))
            out_specs.append(pl.BlockSpec(block, _partial_index(len(rows), len(kept), kd)))
        specs = [self._whole_spec(n, a.shape, tpu) for n, a in zip(ins, args)]
        specs += [self._whole_spec(t, a.shape, tpu) for t, a in zip(stats, stat_args)]
        program = functools.partial(self._dk_program, ins, stats, tpu, _triton(platform))
        partials = self._call(program, platform, grid, specs, outs, out_specs)(*args, *stat_args)
        return [fwd.key_grad(n, y, tpu) for n, y in zip(self.keys, partials)]

    def _call(
        self, program: Any, platform: str, grid: Any, specs: Any, outs: Any, out_specs: Any
    ) -> Any:
        from einfuse.backends.pallas.stream import tpu_interpreter

        interpret: Any = platform == "cpu"
        if platform == "tpu-interpret":
            interpret = tpu_interpreter()
        return pl.pallas_call(
            program,
            out_shape=outs,
            grid=grid,
            in_specs=specs,
            out_specs=out_specs,
            interpret=interpret,
            compiler_params=self.fwd.config.compiler_params(
                platform.removesuffix("-interpret"), len(grid)
            ),
            name=f"einfuse_backward_{self.fwd.plan.group.rank}",
        )

    def _whole_spec(self, name: str, shape: tuple[int, ...], tpu: bool) -> pl.BlockSpec:
        """The forward's block of ``name`` but over the whole query and key range (the dK
        program loops over query blocks and holds one key tile)."""
        fwd = self.fwd
        spec = fwd.spec(name, shape, tpu)
        qd = fwd.query_dim(name, tpu)
        block = tuple(n if d == qd else b for d, (b, n) in enumerate(zip(spec.block_shape, shape)))
        kd = fwd.key_dim_full(name, tpu) if name.endswith("__blk") else None
        if kd is not None:
            block = tuple(
                fwd.sizes[fwd.plan.group.inner] if d == kd else b for d, b in enumerate(block)
            )
        index = spec.index_map

        def whole(*ids: Any) -> tuple[Any, ...]:
            at = list(index(*ids))
            if qd is not None:
                at[qd] = 0
            if kd is not None:
                at[kd] = ids[-1]
            return tuple(at)

        return pl.BlockSpec(block, whole)

    # -- programs --------------------------------------------------------------------------
    def _inputs(
        self, refs: Mapping[str, Any], stats: Mapping[str, Any], k: Any, j: Any, ids: Any
    ) -> dict[str, jax.Array]:
        from einfuse.backends.pallas.attention import row_value

        fwd = self.fwd
        inputs = {STEP: k.astype(jnp.float32), QBLOCK: j.astype(jnp.float32)}
        inputs.update({row_value(r): i.astype(jnp.float32) for r, i in ids.items()})
        inputs.update(refs)
        for t in self.maxima:
            inputs[f"{t}__prev"] = stats[t]
        for t in self.sums:
            inputs[f"{t}__prev"] = jnp.zeros(stats[f"{t}__ct"].shape, fwd.carry[t])
        return inputs

    def _vjp(
        self,
        inputs: dict[str, jax.Array],
        wrt: list[str],
        stats: Mapping[str, jax.Array],
        triton: bool,
    ) -> dict[str, jax.Array]:
        def f(xs: dict[str, jax.Array]) -> dict[str, jax.Array]:
            out = self.tile({n: {**inputs, **xs}[n] for n, _ in self.tile.inputs})
            return {t: out[t].astype(self.fwd.carry[t]) for t in self.sums}

        def grads(xs: dict[str, jax.Array], cts: dict[str, jax.Array]) -> dict[str, jax.Array]:
            _, vjp = jax.vjp(f, xs)
            return vjp(cts)[0]

        # Triton takes no half-precision division or transcendental (the VJP of a scale
        # is one): those run in float32 and round back, as XLA's GPU backend does.
        run = compatible(grads, widen=triton, unbatch=False)
        return run({n: inputs[n] for n in wrt}, {t: stats[f"{t}__ct"] for t in self.sums})

    def _dq_program(
        self, ins: list[str], stats: list[str], tpu: bool, triton: bool, *refs: Any
    ) -> None:
        fwd = self.fwd
        g = fwd.plan.group
        tile, steps = fwd.sizes[g.inner], fwd.sizes[g.rank]
        in_refs, stat_refs, outs, ids, j = _program_refs(fwd.grid_rows, ins, stats, refs)
        fixed = {n: fwd.unit(n, in_refs[n][...], tpu) for n in self.queries}
        st = self._stat_values(stat_refs, tpu)

        score_refs = dict(zip(self.scores, outs[len(self.queries) :]))
        for ref in score_refs.values():  # tiles the band never reaches have no gradient
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

        def at_tile(n: str, k: jax.Array) -> tuple[Any, ...]:
            idx: list[Any] = [slice(None)] * len(in_refs[n].shape)
            idx[fwd.key_dim(n, tpu)] = pl.ds(pl.multiple_of(k * tile, tile), tile)
            return tuple(idx)

        def step(k: jax.Array, acc: dict[str, jax.Array]) -> dict[str, jax.Array]:
            tiles = {
                n: fwd.unit(n, in_refs[n][at_tile(n, k)], tpu) for n in [*self.keys, *self.scores]
            }
            inputs = self._inputs({**fixed, **tiles}, st, k, j, ids)
            grads = self._vjp(inputs, [*self.queries, *self.scores], st, triton)
            for n, ref in score_refs.items():
                where = at_tile(n, k)
                ref[where] = grads[n].astype(jnp.float32).reshape(ref[where].shape)
            return {n: acc[n] + grads[n].astype(jnp.float32) for n in self.queries}

        acc = {n: jnp.zeros(fixed[n].shape, jnp.float32) for n in self.queries}
        mask = fwd.plan.mask
        first, upper = jnp.int32(0), jnp.int32(steps)
        if mask is not None and mask.skips and mask.skips_unchecked:
            t = band_tiles(mask, j, fwd.q_tile, tile, steps, fwd.sizes.get(fwd.query, 1))
            first, upper = jnp.asarray(t.first, jnp.int32), jnp.asarray(t.upper, jnp.int32)
        acc = lax.fori_loop(first, upper, step, acc)
        for ref, n in zip(outs, self.queries):
            ref[...] = acc[n].reshape(ref.shape)

    def _dk_program(
        self, ins: list[str], stats: list[str], tpu: bool, triton: bool, *refs: Any
    ) -> None:
        fwd = self.fwd
        in_refs, stat_refs, outs, ids, k = _program_refs(fwd.grid_rows, ins, stats, refs)
        tiles = {n: fwd.unit(n, in_refs[n][...], tpu) for n in self.keys}
        q_tile = fwd.q_tile

        def block(ref: Any, name: str, j: jax.Array) -> jax.Array:
            qd = fwd.query_dim_kept(name, tpu)
            if qd is None:
                return fwd.unit(name, ref[...], tpu)
            idx: list[Any] = [slice(None)] * len(ref.shape)
            idx[qd] = pl.ds(pl.multiple_of(j * q_tile, q_tile), q_tile)
            return fwd.unit(name, ref[tuple(idx)], tpu)

        def step(j: jax.Array, acc: dict[str, jax.Array]) -> dict[str, jax.Array]:
            fixed = {n: block(in_refs[n], n, j) for n in [*self.queries, *self.scores]}
            st = {s: block(r, s, j) for s, r in stat_refs.items()}
            st = self._named_stats(st)
            inputs = self._inputs({**fixed, **tiles}, st, k, j, ids)
            grads = self._vjp(inputs, self.keys, st, triton)
            return {n: acc[n] + grads[n].astype(jnp.float32) for n in self.keys}

        acc = {n: jnp.zeros(tiles[n].shape, jnp.float32) for n in self.keys}
        lo, hi = self._query_blocks_seeing(k)
        acc = lax.fori_loop(lo, hi, step, acc)
        for ref, n in zip(outs, self.keys):
            ref[...] = acc[n].reshape(ref.shape)

    def _query_blocks_seeing(self, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The query blocks ``[lo, hi)`` whose band reaches key tile ``k`` (all of them
        where the band's fill must be checked): the band's tile ranges grow with the block,
        so two binary searches over ``band_tiles`` find them."""
        fwd = self.fwd
        mask, n = fwd.plan.mask, fwd.q_blocks
        if mask is None or not (mask.skips and mask.skips_unchecked):
            return jnp.int32(0), jnp.int32(n)
        g = fwd.plan.group
        tile, steps = fwd.sizes[g.inner], fwd.sizes[g.rank]

        def band(j: jax.Array) -> Any:
            return band_tiles(mask, j, fwd.q_tile, tile, steps, fwd.sizes.get(fwd.query, 1))

        def first_true(pred: Any) -> jax.Array:  # smallest j in [0, n] with pred(j)
            def body(_: Any, bounds: tuple[jax.Array, jax.Array]) -> Any:
                a, b = bounds
                mid = lax.div(a + b, 2)  # both >= 0: no floor division (Mosaic)
                ok = pred(mid)
                return jnp.where(ok, a, mid + 1), jnp.where(ok, mid, b)

            rounds = max(1, n.bit_length())
            return lax.fori_loop(0, rounds, body, (jnp.int32(0), jnp.int32(n)))[0]

        lo = first_true(lambda j: jnp.asarray(band(j).upper, jnp.int32) > k)
        hi = first_true(lambda j: jnp.asarray(band(j).first, jnp.int32) > k)
        return lo, jnp.maximum(lo, hi)

    def _stat_values(self, refs: Mapping[str, Any], tpu: bool) -> dict[str, jax.Array]:
        return self._named_stats({s: self.fwd.unit(s, r[...], tpu) for s, r in refs.items()})

    def _named_stats(self, values: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        out = {t: values[t] for t in self.maxima}
        out.update({f"{t}__ct": values[t] for t in self.sums})
        return out


def _program_refs(
    rows: tuple[str, ...], ins: list[str], stats: list[str], refs: tuple[Any, ...]
) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, ...], dict[str, Any], Any]:
    """A backward program's input refs, statistic refs and output refs by name, its grid
    row ids, and its last grid id (the query block for dQ, the key tile for dK/dV)."""
    n = len(ins)
    in_refs = dict(zip(ins, refs[:n]))
    stat_refs = dict(zip(stats, refs[n : n + len(stats)]))
    ids = {r: pl.program_id(k) for k, r in enumerate(rows)}
    return in_refs, stat_refs, refs[n + len(stats) :], ids, pl.program_id(len(rows))


def _triton(platform: str) -> bool:
    return platform in ("cuda", "rocm")


def _partial_index(rows: int, kept: int, key_dim: int) -> Any:
    def index(*ids: Any) -> tuple[Any, ...]:
        return (*ids[:rows], *(ids[-1] if d == key_dim else 0 for d in range(kept)))

    return index


def _zero(x: jax.Array) -> jax.Array:
    """The cotangent of an input nothing differentiates (a mask, an integer input)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _is_zero(ct: Any) -> bool:
    return type(ct).__name__ == "Zero" or ct is None
