"""A fused group as one Pallas kernel: FuseMax's 1-pass cascade on a GPU or TPU.

The loop plan is the JAX backend's (``blockwise_plan``: what runs before the loop, one step,
what runs after); only the loop itself differs. Where ``jax_blockwise`` maps the (batch,
head) rows and the query blocks one after another, here they are the kernel's grid, run in
parallel, and each program loops over the key tiles with the carried state (running max,
sum, P·V, in at least float32) in registers or VMEM:

* a program holds one row, so the step is the plan's body with the row ranks dropped: 2-D
  tiles, the GEMMs Triton and Mosaic lower (``drop_ranks``);
* a band mask (causal, sliding window) bounds the key loop per query block: tiles outside
  the band are never loaded, tiles inside it run the step without the mask, only the edge
  tiles pay for it; a finite fill is checked after the kernel, as the JAX loop does it, and
  where the check fails the kernel runs again visiting every tile;
* key padding read from an input is masked in every tile (the per-tile skipping of the JAX
  loop is not done here);
* lengths that do not divide the tiles are zero-padded to whole tiles in XLA and the mask
  the partition wrote (``m1*M0+m0 < M``) stays in the step; padded query rows are dropped.

One kernel is written; ``lax.platform_dependent`` picks how it runs: interpreted on the CPU
(how the tests check it against the float64 reference), through Triton on CUDA and ROCm
(``num_warps``, ``num_stages``), through Mosaic on TPU. The backward pass is the JAX loop's
(``jax.vjp`` of ``jax_blockwise``'s loop on the same inputs), so ``jax.grad`` of a Pallas
program equals the JAX backend's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from einfuse.backends.blockwise_plan import QBLOCK, STEP, drop_ranks
from einfuse.backends.jax_backend import LoweredCascade, lower_cascade
from einfuse.backends.jax_blockwise import BlockwiseCascade, _pad_to
from einfuse.backends.jax_mask import band_tiles, skip_is_exact
from einfuse.backends.pallas.config import KernelConfig
from einfuse.ir.cascade import Cascade
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import FusedGroup


class PallasBlockwise(BlockwiseCascade):
    """The blockwise loop of ``jax_blockwise`` with its loop as one ``pallas_call``."""

    def __init__(
        self,
        cascade: Cascade,
        group: FusedGroup,
        sizes: Mapping[str, int],
        *,
        config: KernelConfig,
        query_tile: int,
        schedule: Schedule | None = None,
        loop: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(
            cascade, group, sizes, query_tile=query_tile, schedule=schedule, loop=loop,
            **options,
        )  # fmt: skip
        self.config = config
        kernel_sizes = {r: n for r, n in self.sizes.items() if r not in self.rows}
        if self.query is not None:
            kernel_sizes[self.query] = self.q_tile
        self.kernel_body = lower_cascade(
            drop_ranks(self.body_cascade, self.rows), kernel_sizes, **options
        )
        self.kernel_full: LoweredCascade | None = None
        if self.full_cascade is not None:
            self.kernel_full = lower_cascade(
                drop_ranks(self.full_cascade, self.rows), kernel_sizes, **options
            )
        self.row_count = math.prod(self.sizes[r] for r in self.rows)

    # -- layouts: [rows..., rest] in the loop's rank order <-> [R, rest without rows] -------
    def _qdim(self, name: str) -> int | None:
        """The query rank's dim in the kernel layout (after the flattened rows)."""
        ranks = [r for r in self._ranks(name) if r not in self.rows]
        return 1 + ranks.index(self.query) if self.query in ranks else None

    def _to_kernel(self, name: str, x: jax.Array) -> jax.Array:
        dims = self._dims(name, self.rows) if self._ranks(name) else []
        x = jnp.moveaxis(x, dims, list(range(len(dims))))
        x = x.reshape((-1, *x.shape[len(dims) :])) if dims else x[None]
        if (d := self._qdim(name)) is not None:
            x = _pad_to(x, d, self.q_blocks * self.q_tile)
        return x

    def _from_kernel(self, name: str, y: jax.Array) -> jax.Array:
        if (d := self._qdim(name)) is not None:
            y = lax.slice_in_dim(y, 0, self.sizes[self.query], axis=d)
        dims = self._dims(name, self.rows)
        y = y.reshape((*(self.sizes[r] for r in self.rows), *y.shape[1:]))
        return jnp.moveaxis(y, list(range(len(dims))), dims)

    def _spec(self, name: str, shape: tuple[int, ...]) -> pl.BlockSpec:
        """Row ``r`` of every tensor; its query block ``j`` where it has the query rank; the
        whole key range of a key tile input (the kernel loads one tile per step)."""
        qd = self._qdim(name)
        block: list[int | None] = [None, *shape[1:]]
        if qd is not None:
            block[qd] = self.q_tile

        def index(r: Any, j: Any) -> tuple[Any, ...]:
            return tuple(r if k == 0 else j if k == qd else 0 for k in range(len(shape)))

        return pl.BlockSpec(tuple(block), index)

    # -- the loop -----------------------------------------------------------------------
    def run_loop(
        self, raw: dict[str, jax.Array], top: jax.Array | None, tmax: jax.Array | None
    ) -> dict[str, jax.Array]:
        mask = self.plan.mask
        checked = mask is not None and mask.skips and not mask.skips_unchecked
        jax_loop = super().run_loop

        @jax.custom_vjp
        def loop(raw: dict[str, jax.Array], top: jax.Array | None) -> dict[str, jax.Array]:
            fast = self._kernel(raw, skip=True)
            if not checked or top is None:
                return fast
            # A finite fill: the skipped tiles were exact zeros only if every real row's
            # running max clears the masked scores by the underflow margin.
            assert mask is not None
            rm = fast[mask.running_max]
            return lax.cond(
                skip_is_exact(top, rm, jnp.ones(rm.shape, bool)),
                lambda: fast,
                lambda: self._kernel(raw, skip=False),
            )

        def forward(raw: Any, top: Any) -> tuple[Any, Any]:
            return loop(raw, top), (raw, top)

        def backward(res: Any, ct: Any) -> tuple[Any, Any]:
            raw, top = res
            _, vjp = jax.vjp(lambda r: jax_loop(r, top, None), raw)
            return vjp(ct)[0], None if top is None else jnp.zeros_like(top)

        loop.defvjp(forward, backward)
        return loop(raw, top)

    def _kernel(self, raw: dict[str, jax.Array], *, skip: bool) -> dict[str, jax.Array]:
        """Each carried state after the last step, by one ``pallas_call`` over rows x query
        blocks; ``skip``: visit only the key tiles inside the mask's band."""
        g = self.plan.group
        names = [n for n in self.body_inputs if n not in (STEP, QBLOCK)]
        args = [self._to_kernel(n, raw[n]) for n in names]
        outs = [
            jax.ShapeDtypeStruct(self._to_kernel(f"{t}__prev", raw[f"{t}__prev"]).shape,
                                 self.carry[t])
            for t in g.carried
        ]  # fmt: skip
        kernel = functools.partial(self._program, names, skip)
        grid = (self.row_count, self.q_blocks)

        def call(platform: str) -> Any:
            return pl.pallas_call(
                kernel,
                out_shape=outs,
                grid=grid,
                in_specs=[self._spec(n, a.shape) for n, a in zip(names, args)],
                out_specs=[self._spec(t, o.shape) for t, o in zip(g.carried, outs)],
                interpret=platform == "cpu",
                compiler_params=self.config.compiler_params(platform),
                name=f"einfuse_{g.rank}",
            )(*args)

        finals = lax.platform_dependent(
            cpu=lambda: call("cpu"),
            cuda=lambda: call("cuda"),
            rocm=lambda: call("rocm"),
            tpu=lambda: call("tpu"),
        )
        return {t: self._from_kernel(t, y) for t, y in zip(g.carried, finals)}

    def _program(self, names: list[str], skip: bool, *refs: Any) -> None:
        """One program: row ``program_id(0)``, query block ``program_id(1)``."""
        g = self.plan.group
        tile, steps = self.sizes[g.inner], self.sizes[g.rank]
        ins = dict(zip(names, refs[: len(names)]))
        outs = refs[len(names) :]
        j = pl.program_id(1)
        fixed = {n: ref[...] for n, ref in ins.items() if not n.endswith(("__blk", "__prev"))}
        state = {t: ins[f"{t}__prev"][...] for t in g.carried}

        def step_of(body: LoweredCascade) -> Any:
            def step(k: jax.Array, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
                inputs = {**fixed, STEP: k.astype(jnp.float32), QBLOCK: j.astype(jnp.float32)}
                start = pl.multiple_of(k * tile, tile)
                for n, ref in ins.items():
                    if n.endswith("__blk"):
                        d = self.plan.tiles[n.removesuffix("__blk")][0]
                        d = d - sum(1 for r in self._ranks(n)[:d] if r in self.rows)
                        idx = [slice(None)] * (len(ref.shape))
                        idx[d] = pl.ds(start, tile)
                        inputs[n] = ref[tuple(idx)]
                for t in g.carried:
                    inputs[f"{t}__prev"] = state[t]
                out = body({n: inputs[n] for n, _ in body.inputs})
                return {t: out[t].astype(self.carry[t]) for t in g.carried}

            return step

        masked = step_of(self.kernel_body)
        mask = self.plan.mask
        if mask is None or not (skip and mask.skips):
            state = lax.fori_loop(0, steps, masked, state)
        else:
            t = band_tiles(mask, j, self.q_tile, tile, steps, self.sizes.get(self.query, 1))
            first, upper = jnp.asarray(t.first, jnp.int32), jnp.asarray(t.upper, jnp.int32)
            if self.kernel_full is None:
                state = lax.fori_loop(first, upper, masked, state)
            else:
                lo = jnp.clip(jnp.asarray(t.full_lo, jnp.int32), first, upper)
                hi = jnp.clip(jnp.asarray(t.full_hi, jnp.int32), lo, upper)
                state = lax.fori_loop(first, lo, masked, state)
                state = lax.fori_loop(lo, hi, step_of(self.kernel_full), state)
                state = lax.fori_loop(hi, upper, masked, state)
        for ref, t in zip(outs, g.carried):
            ref[...] = state[t]
