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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from einfuse.backends.blockwise_plan import QBLOCK, STEP, drop_ranks, squeezed_dims
from einfuse.backends.jax_backend import LoweredCascade, lower_cascade
from einfuse.backends.jax_blockwise import BlockwiseCascade, _pad_to
from einfuse.backends.jax_mask import band_tiles, skip_is_exact
from einfuse.backends.jax_values import BackendUnsupported
from einfuse.backends.pallas.config import KernelConfig
from einfuse.ir.cascade import Cascade
from einfuse.ir.expr import Const, Expr, Op, Size, Var
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
        kernel_sizes = dict(self.sizes)
        if self.query is not None:
            kernel_sizes[self.query] = self.q_tile
        # The grid: one program per value of the ranks every carried state has (batch, query
        # heads; a K/V head is read by the programs of its query-head group) and per query
        # block. Those ranks and any other of size 1 leave the step's tiles.
        body = self.body_cascade
        state = [e for e in body.einsums if e.output in group.carried]
        common = set.intersection(*(set(e.output_ranks) for e in state))
        common -= {group.inner, self.query}
        ranks = body.all_ranks()
        self.grid_rows = tuple(r for r in ranks if r in common and kernel_sizes[r] > 1)
        units = tuple(
            r for r in ranks if kernel_sizes.get(r) == 1 and r not in (self.query, group.inner)
        )
        drop = self.grid_rows + units
        self.squeezed = squeezed_dims(body, drop)
        self.kernel_body = lower_cascade(
            drop_ranks(body, drop), kernel_sizes, wide_dots=True, **options
        )
        self.kernel_full: LoweredCascade | None = None
        if self.full_cascade is not None:
            self.kernel_full = lower_cascade(
                drop_ranks(self.full_cascade, drop), kernel_sizes, wide_dots=True, **options
            )

    @property
    def kind(self) -> str:  # type: ignore[override]
        grid = " x ".join([*self.grid_rows, f"{self.q_blocks} query blocks"])
        return f"Pallas kernel (grid {grid}; {self.config}) looping"

    def step_source(self, fn_name: str) -> str:
        return self.kernel_body.source(fn_name)

    # -- layouts: each tensor's dims in the loop's order, on a TPU with the squeezed dims first
    # (Mosaic tiles the last two dims of a block by (8, 128)); a trailing unit dim where a
    # block would keep fewer than two dims -------------------------------------------------
    def _operand(self, name: str) -> tuple[tuple[str, ...], tuple[Expr | None, ...]]:
        """The tensor's ranks and, per dim, the grid index it is squeezed at (or None)."""
        base = name.removesuffix("__prev")
        ranks = self._ranks(name)
        return ranks, self.squeezed.get(base if name.endswith("__prev") else name, ())

    def _perm(self, name: str, tpu: bool) -> tuple[list[int], bool]:
        """The kernel layout's dim order and whether it has a trailing unit dim."""
        ranks, squeeze = self._operand(name)
        kept = [k for k in range(len(ranks)) if squeeze[k] is None]
        perm = [k for k in range(len(ranks)) if squeeze[k] is not None] + kept if tpu else None
        return (perm or list(range(len(ranks)))), len(kept) < 2

    def _query_dim(self, name: str, tpu: bool) -> int | None:
        ranks, squeeze = self._operand(name)
        perm, _ = self._perm(name, tpu)
        for pos, k in enumerate(perm):
            if ranks[k] == self.query and squeeze[k] is None:
                return pos
        return None

    def _to_kernel(self, name: str, x: jax.Array, tpu: bool) -> jax.Array:
        perm, trailing = self._perm(name, tpu)
        x = jnp.transpose(x, perm)
        if trailing:
            x = x[..., None]
        if (d := self._query_dim(name, tpu)) is not None:
            x = _pad_to(x, d, self.q_blocks * self.q_tile)
        return x

    def _from_kernel(self, name: str, y: jax.Array, tpu: bool) -> jax.Array:
        perm, trailing = self._perm(name, tpu)
        if (d := self._query_dim(name, tpu)) is not None:
            y = lax.slice_in_dim(y, 0, self.sizes[self.query], axis=d)
        if trailing:
            y = y[..., 0]
        return jnp.transpose(y, [int(k) for k in np.argsort(perm)])

    def _spec(self, name: str, shape: tuple[int, ...], tpu: bool) -> pl.BlockSpec:
        """Its grid row of every tensor; its query block where it has the query rank; the
        whole key range of a key tile input (the kernel loads one tile per step)."""
        squeeze = self._operand(name)[1]
        perm, trailing = self._perm(name, tpu)
        qd = self._query_dim(name, tpu)
        at = [squeeze[k] for k in perm] + [None] * trailing
        block = tuple(
            None if a is not None else self.q_tile if d == qd else n
            for d, (a, n) in enumerate(zip(at, shape))
        )
        rows, sizes = self.grid_rows, self.sizes

        def index(*ids: Any) -> tuple[Any, ...]:
            env = dict(zip(rows, ids))
            return tuple(
                ids[-1] if d == qd else 0 if a is None else grid_index(a, env, sizes)
                for d, a in enumerate(at)
            )

        return pl.BlockSpec(block, index)

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
        """Each carried state after the last step, by one ``pallas_call`` over the grid rows
        and query blocks; ``skip``: visit only the key tiles inside the mask's band."""
        g = self.plan.group
        names = [n for n in self.body_inputs if n not in (STEP, QBLOCK)]
        grid = (*(self.sizes[r] for r in self.grid_rows), self.q_blocks)

        def call(platform: str) -> list[jax.Array]:
            tpu = platform == "tpu"
            args = [self._to_kernel(n, raw[n], tpu) for n in names]
            outs = [
                jax.ShapeDtypeStruct(
                    self._to_kernel(f"{t}__prev", raw[f"{t}__prev"], tpu).shape, self.carry[t]
                )
                for t in g.carried
            ]
            finals = pl.pallas_call(
                functools.partial(self._program, names, skip, tpu),
                out_shape=outs,
                grid=grid,
                in_specs=[self._spec(n, a.shape, tpu) for n, a in zip(names, args)],
                out_specs=[self._spec(t, o.shape, tpu) for t, o in zip(g.carried, outs)],
                interpret=platform == "cpu",
                compiler_params=self.config.compiler_params(platform, len(grid)),
                name=f"einfuse_{g.rank}",
            )(*args)
            return [self._from_kernel(t, y, tpu) for t, y in zip(g.carried, finals)]

        finals = lax.platform_dependent(
            cpu=lambda: call("cpu"),
            cuda=lambda: call("cuda"),
            rocm=lambda: call("rocm"),
            tpu=lambda: call("tpu"),
        )
        return dict(zip(g.carried, finals))

    def _program(self, names: list[str], skip: bool, tpu: bool, *refs: Any) -> None:
        """One program: a grid row (batch, head) and query block ``j``, the last grid index."""
        g = self.plan.group
        tile, steps = self.sizes[g.inner], self.sizes[g.rank]
        ins = dict(zip(names, refs[: len(names)]))
        outs = refs[len(names) :]
        j = pl.program_id(len(self.grid_rows))

        def load(n: str) -> jax.Array:
            x = ins[n][...]
            return x.reshape(x.shape[:-1]) if self._perm(n, tpu)[1] else x

        fixed = {n: load(n) for n in ins if not n.endswith(("__blk", "__prev"))}
        state = {t: load(f"{t}__prev") for t in g.carried}

        def step_of(body: LoweredCascade) -> Any:
            def step(k: jax.Array, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
                inputs = {**fixed, STEP: k.astype(jnp.float32), QBLOCK: j.astype(jnp.float32)}
                start = pl.multiple_of(k * tile, tile)
                for n, ref in ins.items():
                    if n.endswith("__blk"):
                        idx: list[Any] = [slice(None)] * len(ref.shape)
                        idx[self._key_dim(n, tpu)] = pl.ds(start, tile)
                        x = ref[tuple(idx)]
                        inputs[n] = x.reshape(x.shape[:-1]) if self._perm(n, tpu)[1] else x
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
            ref[...] = state[t].reshape(ref.shape)

    def _key_dim(self, name: str, tpu: bool) -> int:
        """The key tile's dim of a key input inside the kernel (squeezed dims gone)."""
        ranks, squeeze = self._operand(name)
        perm, _ = self._perm(name, tpu)
        kept = [ranks[k] for k in perm if squeeze[k] is None]
        return kept.index(self.plan.group.inner)


def grid_index(index: Expr, env: Mapping[str, Any], sizes: Mapping[str, int]) -> Any:
    """A squeezed dim's block index from the grid ids: ``e*K+k`` of a grouped query head;
    a squeezed rank of size 1 that is not a grid rank is 0."""
    if isinstance(index, Var):
        return env.get(index.rank, 0)
    if isinstance(index, Const):
        return int(index.value)
    if isinstance(index, Size):
        return sizes[index.rank]
    if isinstance(index, Op) and index.op in ("add", "mul", "sub"):
        a, b = (grid_index(x, env, sizes) for x in index.args)
        return a + b if index.op == "add" else a * b if index.op == "mul" else a - b
    raise BackendUnsupported(f"a row is read at {index}, which the kernel's grid cannot index")
