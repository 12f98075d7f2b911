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
* key padding read from an input: each program skips the key tiles that are all padding for
  its row (flags computed before the kernel, as the JAX loop computes them), checked after
  the kernel like a finite fill (on a TPU every tile is visited, masked);
* lengths that do not divide the tiles are zero-padded to whole tiles in XLA and the mask
  the partition wrote (``m1*M0+m0 < M``) stays in the step; padded query rows are dropped.

One kernel is written; ``lax.platform_dependent`` picks how it runs: interpreted on the CPU
(how the tests check it against the float64 reference), through Triton on CUDA and ROCm
(``num_warps``, ``num_stages``), through Mosaic on TPU, where a key input the Schedule places
in ``hbm`` streams its tiles by DMA (``stream``). ``KernelConfig(interpret_tpu=True)`` runs
the TPU form, DMAs included, in Mosaic's interpreter on the CPU. What runs after the loop
runs in the kernel where it is one program's business (``epilogue``). The backward pass is
two more kernels built from the same step (``backward``), or the JAX loop's VJP where those
do not apply, so ``jax.grad`` of a Pallas program equals the JAX backend's.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from einfuse.backends.blockwise_plan import (
    QBLOCK,
    STEP,
    drop_ranks,
    grid_rows,
    split_flat_reads,
    squeezed_dims,
)
from einfuse.backends.jax_backend import LoweredCascade, lower_cascade
from einfuse.backends.jax_blockwise import BlockwiseCascade
from einfuse.backends.jax_mask import band_tiles, skip_is_exact
from einfuse.backends.jax_padding import row_skips, tile_max_by_row
from einfuse.backends.jax_values import BackendUnsupported
from einfuse.backends.pallas.backward import PallasBackward
from einfuse.backends.pallas.config import PLACEMENTS, KernelConfig, PlacementError
from einfuse.backends.pallas.epilogue import plan_epilogue, run_with_epilogue, zeros_or_none
from einfuse.backends.pallas.kernel_compat import compatible
from einfuse.backends.pallas.layout import KernelLayout, row_value
from einfuse.backends.pallas.stream import KeyStream, tile_buffers, tpu_interpreter
from einfuse.ir.cascade import Cascade
from einfuse.ir.expr import Access, Const, Expr
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import FusedGroup

SKIP_TILES = "SKIP__"  # the kernel input holding a program's key tiles to skip (key padding)


class PallasBlockwise(KernelLayout, BlockwiseCascade):
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
        plain: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(
            cascade, group, sizes, query_tile=query_tile, schedule=schedule, loop=loop,
            plain=plain, **options,
        )  # fmt: skip
        self.config = config
        self.schedule = schedule
        for n in self.body_inputs:
            if n.endswith("__blk"):
                self._streamed(n)  # a placement it cannot carry out fails here, by name
        # A state starting from a constant (-inf, 0) starts in the kernel, not read from HBM.
        inits = {e.output: e.expr for e in self.plan.pre.einsums}
        self.const_init = {
            t: float(x.value)
            for t in group.carried
            if isinstance(x := inits.get(f"{t}__init"), Const)
        }
        kernel_sizes = dict(self.sizes)
        if self.query is not None:
            kernel_sizes[self.query] = self.q_tile
        # The grid: one program per value of the ranks every carried state has (batch, query
        # heads; a K/V head is read by the programs of its query-head group) and per query
        # block. Those ranks and any other of size 1 leave the step's tiles.
        self.grid_rows = grid_rows(self.body_cascade, group, self.query, kernel_sizes)
        # A K/V projection read per head from its [tokens, heads*dim] output: split that dim.
        body, self.splits = split_flat_reads(self.body_cascade, self.grid_rows)
        self.kernel_cascade = body
        units = tuple(
            r
            for r in body.all_ranks()
            if kernel_sizes.get(r) == 1 and r not in (self.query, group.inner)
        )
        drop = self.grid_rows + units
        self.drop, self.kernel_sizes = drop, kernel_sizes
        self.squeezed = squeezed_dims(body, drop)
        # A row's value read in the step (an ALiBi slope of the head) is its program id.
        values: dict[str, Expr] = {r: Access(row_value(r), ()) for r in self.grid_rows}
        values.update(dict.fromkeys(units, Const(0)))
        self.values = values
        dropped = drop_ranks(body, drop, values)
        self.kernel_body = lower_cascade(dropped, kernel_sizes, wide_dots=True, **options)
        self.state_shapes = {
            t: tuple(kernel_sizes[r] for r in dropped.tensor_ranks(t)) for t in group.carried
        }
        self.kernel_full: LoweredCascade | None = None
        if self.full_cascade is not None:
            full, _ = split_flat_reads(self.full_cascade, self.grid_rows)
            self.kernel_full = lower_cascade(
                drop_ranks(full, drop, values),
                kernel_sizes,
                wide_dots=True,
                **options,
            )

        self.epilogue = plan_epilogue(self, options)
        self.lower_options = options  # for the backward kernels, built when differentiated

    @functools.cached_property
    def _backward(self) -> tuple[PallasBackward | None, str]:
        """Two Pallas kernels where the loop allows it, else the JAX loop's VJP (and why)."""
        try:
            return PallasBackward(self, self.lower_options), ""
        except BackendUnsupported as e:
            return None, f"backward through the JAX loop: {e}"

    @property
    def backward(self) -> PallasBackward | None:
        return self._backward[0]

    @property
    def backward_note(self) -> str:
        return self._backward[1]

    def __call__(self, arrays: Mapping[str, Any]) -> dict[str, jax.Array]:
        if self.epilogue is None:
            return super().__call__(arrays)
        return run_with_epilogue(self, arrays)

    def query_block(self, tile: int) -> int:
        """A power of two of at least 16: Triton's block shapes and ``tl.dot`` need both."""
        return max(16, 1 << (tile - 1).bit_length())

    @property
    def kind(self) -> str:  # type: ignore[override]
        grid = " x ".join([*self.grid_rows, f"{self.q_blocks} query blocks"])
        return f"Pallas kernel (grid {grid}; {self.config}) looping"

    def step_source(self, fn_name: str) -> str:
        return self.kernel_body.source(fn_name)

    # -- the loop -----------------------------------------------------------------------
    def padding_maxima(self, env: Mapping[str, Any]) -> jax.Array:
        """Key padding's per-tile key maxima by grid row (``[*grid rows, steps]``): one row
        of skip flags per program."""
        assert self.plan.padding is not None and self.keymax is not None
        tmax = tile_max_by_row(self.plan.padding, self.keymax, env, self.grid_rows, self.sizes)
        return tmax.reshape((*(self.sizes[r] for r in self.grid_rows), tmax.shape[-1]))

    def run_loop(
        self, raw: dict[str, jax.Array], top: jax.Array | None, tmax: jax.Array | None
    ) -> dict[str, jax.Array]:
        jax_loop = super().run_loop

        @jax.custom_vjp
        def loop(raw: dict[str, Any], top: Any, tmax: Any) -> dict[str, jax.Array]:
            return self.checked(raw, top, tmax, epilogue=False)

        def forward(raw: Any, top: Any, tmax: Any) -> tuple[Any, Any]:
            finals = loop(raw, top, tmax)
            return finals, (raw, top, tmax, finals)

        def backward(res: Any, ct: Any) -> tuple[Any, Any, Any]:
            raw, top, tmax, finals = res
            if self.backward is not None:
                grads = self.backward(raw, finals, ct)
            else:
                _, vjp = jax.vjp(lambda r: jax_loop(r, top, None), raw)
                grads = vjp(ct)[0]
            return grads, zeros_or_none(top), zeros_or_none(tmax)

        loop.defvjp(forward, backward)
        return loop(raw, top, tmax)

    def checked(
        self, raw: dict[str, Any], top: Any, tmax: Any, *, epilogue: bool
    ) -> dict[str, jax.Array]:
        """The kernel skipping what its mask or key padding lets it, and where a finite fill
        makes that skipping exact only for large enough scores, checked: every real row's
        running max must clear the skipped scores by the underflow margin, else the kernel
        runs again over every tile."""
        mask, pad = self.plan.mask, self.plan.padding
        tiles = None
        if mask is not None and mask.skips and not mask.skips_unchecked and top is not None:
            bound, running_max = top, mask.running_max
        elif pad is not None and pad.skips and tmax is not None and top is not None:
            tiles, bound = row_skips(pad, tmax, top)  # key tiles all padding, per row
            running_max = pad.running_max
        else:
            return self._kernel(raw, skip=True, epilogue=epilogue)
        assert running_max is not None
        fast = self._kernel(raw, skip=True, tiles=tiles, epilogue=epilogue, keep=running_max)
        rm = fast[running_max]
        return lax.cond(
            skip_is_exact(bound, rm, jnp.ones(rm.shape, bool)),
            lambda: fast,
            lambda: self._kernel(raw, skip=False, epilogue=epilogue, keep=running_max),
        )

    def _kernel(
        self,
        raw: dict[str, jax.Array],
        *,
        skip: bool,
        tiles: jax.Array | None = None,
        epilogue: bool = False,
        keep: str | None = None,
    ) -> dict[str, jax.Array]:
        """Each carried state after the last step, by one ``pallas_call`` over the grid rows
        and query blocks; ``skip``: visit only the key tiles inside the mask's band;
        ``tiles``: per grid row, the key tiles to skip (all padding; not on a TPU, where a
        dynamic scalar read of a VMEM block is not what Mosaic does well)."""
        g = self.plan.group
        names = [
            n
            for n in self.body_inputs
            if n not in (STEP, QBLOCK) and n.removesuffix("__prev") not in self.const_init
        ]
        grid = (*(self.sizes[r] for r in self.grid_rows), self.q_blocks)
        placed = [n for n in names if n.endswith("__blk") and self._streamed(n)]
        # What the kernel writes: the final states, or with the epilogue the results (and
        # the running max a finite fill's check reads).
        results = list(g.carried)
        if epilogue:
            results = [*self.epilogue_outputs, *([keep] if keep else [])]

        def call(platform: str) -> list[jax.Array]:
            # Streaming key tiles by DMA is a TPU kernel; Triton streams every key tile from
            # global memory through shared memory anyway, and the CPU interprets the VMEM form.
            tpu = platform in ("tpu", "tpu-interpret")
            streamed = placed if tpu else []
            args = [self.to_kernel(n, raw[n], tpu) for n in names]
            outs = [self._out_shape(t, raw, tpu) for t in results]
            specs = [
                pl.BlockSpec(memory_space=pl.ANY) if n in streamed else self.spec(n, a.shape, tpu)
                for n, a in zip(names, args)
            ]
            kernel_names = list(names)
            if tiles is not None and skip and not tpu:
                kernel_names.append(SKIP_TILES)
                flags = tiles.astype(jnp.int32)
                args.append(flags)
                rows = len(self.grid_rows)
                specs.append(
                    pl.BlockSpec(
                        (*(None for _ in range(rows)), flags.shape[-1]),
                        lambda *ids: (*ids[:rows], 0),
                    )
                )
            scratch = [s for n in streamed for s in tile_buffers(self.tile_shape(n), raw[n].dtype)]
            interpret: Any = platform == "cpu"
            if platform == "tpu-interpret":
                interpret = tpu_interpreter()
            finals = pl.pallas_call(
                functools.partial(
                    self._program,
                    kernel_names,
                    skip,
                    tpu,
                    platform in ("cuda", "rocm"),
                    tuple(streamed),
                    tuple(results) if epilogue else None,
                ),
                out_shape=outs,
                grid=grid,
                in_specs=specs,
                out_specs=[self.spec(t, o.shape, tpu) for t, o in zip(results, outs)],
                scratch_shapes=scratch,
                interpret=interpret,
                compiler_params=self.config.compiler_params(platform, len(grid)),
                name=f"einfuse_{g.rank}",
            )(*args)
            return [self.from_kernel(t, y, tpu) for t, y in zip(results, finals)]

        if self.config.interpret_tpu:
            return dict(zip(results, call("tpu-interpret")))
        finals = lax.platform_dependent(
            cpu=lambda: call("cpu"),
            cuda=lambda: call("cuda"),
            rocm=lambda: call("rocm"),
            tpu=lambda: call("tpu"),
        )
        return dict(zip(results, finals))

    def _out_shape(self, name: str, raw: Mapping[str, Any], tpu: bool) -> Any:
        """A kernel output in its kernel layout: a final state (its dtype widened) or a
        result of the epilogue (its own dtype)."""
        if name in self.plan.group.carried:
            shape = self.to_kernel(f"{name}__prev", raw[f"{name}__prev"], tpu).shape
            return jax.ShapeDtypeStruct(shape, self.carry[name])
        ranks = self.epilogue_cascade.tensor_ranks(name)
        full = jax.ShapeDtypeStruct(tuple(self.sizes[r] for r in ranks), self.dtypes[name])
        return jax.eval_shape(lambda x: self.to_kernel(name, x, tpu), full)

    def _streamed(self, name: str) -> bool:
        """Whether the Schedule places this key input in HBM, streamed tile by tile (else
        each program's whole key range is one block, in VMEM on a TPU)."""
        base = name.removesuffix("__blk")
        level = self.schedule.place(base) if self.schedule is not None else None
        if level not in (None, *PLACEMENTS):
            raise PlacementError(
                f"place {base}={level}: the pallas backend places a key input in "
                f"{' or '.join(PLACEMENTS)}"
            )
        return level == "hbm"

    def _program(
        self,
        names: list[str],
        skip: bool,
        tpu: bool,
        triton: bool,
        streamed: tuple[str, ...],
        results: tuple[str, ...] | None,
        *refs: Any,
    ) -> None:
        """One program: a grid row (batch, head) and query block ``j``, the last grid index."""
        g = self.plan.group
        tile, steps = self.sizes[g.inner], self.sizes[g.rank]
        ins = dict(zip(names, refs[: len(names)]))
        n_out = len(results) if results is not None else len(g.carried)
        outs = refs[len(names) : len(names) + n_out]
        scratch = refs[len(names) + n_out :]
        j = pl.program_id(len(self.grid_rows))
        ids = {r: pl.program_id(k) for k, r in enumerate(self.grid_rows)}

        flags = ins.pop(SKIP_TILES, None)
        fixed = {
            n: self.unit(n, ins[n][...], tpu) for n in ins if not n.endswith(("__blk", "__prev"))
        }
        state = {
            t: jnp.full(self.state_shapes[t], self.const_init[t], self.carry[t])
            if t in self.const_init
            else self.unit(f"{t}__prev", ins[f"{t}__prev"][...], tpu)
            for t in g.carried
        }
        stream = KeyStream(
            {n: ins[n].at[self.hbm_rows(n, ids)] for n in streamed},
            dict(zip(streamed, zip(scratch[::2], scratch[1::2]))),
            {n: self.key_dim(n, True) for n in streamed},
            tile,
            steps,
        )

        def step_of(body: LoweredCascade) -> Any:
            def step(k: jax.Array, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
                inputs = {**fixed, STEP: k.astype(jnp.float32), QBLOCK: j.astype(jnp.float32)}
                inputs.update({row_value(r): i.astype(jnp.float32) for r, i in ids.items()})
                start = pl.multiple_of(k * tile, tile)
                for n, ref in ins.items():
                    if n.endswith("__blk"):
                        if n in streamed:
                            inputs[n] = self.unit(n, stream.tile(n), tpu)
                            continue
                        idx: list[Any] = [slice(None)] * len(ref.shape)
                        idx[self.key_dim(n, tpu)] = pl.ds(start, tile)
                        inputs[n] = self.unit(n, ref[tuple(idx)], tpu)
                for t in g.carried:
                    inputs[f"{t}__prev"] = state[t]
                # Triton takes no half-precision division or transcendental: in float32.
                run = compatible(body, widen=triton, unbatch=False)
                out = run({n: inputs[n] for n, _ in body.inputs})
                return {t: out[t].astype(self.carry[t]) for t in g.carried}

            return step

        masked = step_of(self.kernel_body)
        full = step_of(self.kernel_full) if self.kernel_full is not None else None
        mask = self.plan.mask
        first, upper = jnp.int32(0), jnp.int32(steps)
        lo = hi = first  # the tiles every query of the block sees (run without the mask)
        if mask is not None and skip and mask.skips:
            t = band_tiles(mask, j, self.q_tile, tile, steps, self.sizes.get(self.query, 1))
            first, upper = jnp.asarray(t.first, jnp.int32), jnp.asarray(t.upper, jnp.int32)
            if full is not None:
                lo = jnp.clip(jnp.asarray(t.full_lo, jnp.int32), first, upper)
                hi = jnp.clip(jnp.asarray(t.full_hi, jnp.int32), lo, upper)
        if streamed:  # each step waits for its tile and fetches the next
            state = stream.loop(first, upper, lo, hi, masked, full, state)
        elif flags is not None:  # key padding: a tile of padding only is skipped

            def skipping(k: jax.Array, st: dict[str, jax.Array]) -> dict[str, jax.Array]:
                return lax.cond(flags[k] != 0, lambda: st, lambda: masked(k, st))

            state = lax.fori_loop(first, upper, skipping, state)
        elif full is None:
            state = lax.fori_loop(first, upper, masked, state)
        else:
            state = lax.fori_loop(first, lo, masked, state)
            state = lax.fori_loop(lo, hi, full, state)
            state = lax.fori_loop(hi, upper, masked, state)
        if results is None:  # the final states
            for ref, t in zip(outs, g.carried):
                ref[...] = state[t].reshape(ref.shape)
            return
        assert self.epilogue is not None
        run = compatible(self.epilogue, widen=triton, unbatch=False)
        values = {**state, **run({n: state[n] for n, _ in self.epilogue.inputs})}
        for ref, name in zip(outs, results):
            ref[...] = values[name].astype(ref.dtype).reshape(ref.shape)
