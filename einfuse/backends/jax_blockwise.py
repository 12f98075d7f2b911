"""A fused group as one blockwise loop: FuseMax's 1-pass cascade without any P x M tensor.

``fuse`` leaves a group of Einsums over a partitioned rank ``m1`` (see
``einfuse.passes.fuse.FusedGroup``). Emitted Einsum by Einsum, the group would build
tensors over all of ``m1``; here it becomes a ``lax.fori_loop`` over ``m1`` whose body is
the group with ``m1`` fixed, lowered by the ordinary JAX emitter:

* reads ``K[e, m1*M0+m0]`` become reads of one key tile, sliced per step;
* a recurrence ``RM[m1+1, p] = f(RM[m1, p], ...)`` becomes loop-carried state;
* the rank value ``m1`` (in masks) becomes the step index.

The query rank is tiled too (a ``lax.map`` over its blocks), so a step holds one
``P0 x M0`` score tile. With a band mask (causal ``m1*M0+m0 <= p``, a sliding window, any
fill: ``blockwise_mask``) a ``lax.switch`` per step skips the tiles outside the band and runs
the tiles inside it without the mask (so the loop stays differentiable); a finite fill is
checked per query block (``jax_mask``). Key padding read from an input skips the key tiles
whose keys are all masked, read off one max per tile before the loop (``jax_padding``),
under the same check. The split into programs is ``blockwise_plan``'s.

Dtypes: every tile and step result has its tensor's dtype in the IR (so the program's casts
hold where it put them), but the carried state (running max, sums, products) is at least
float32, as flash-attention kernels keep it: a bfloat16 running sum over many key tiles
would lose what one reduction over all keys keeps. The results come out in their own
dtypes, as the Einsum-by-Einsum emitter gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from einfuse.backends.blockwise_mask import MaskBand, without_mask
from einfuse.backends.blockwise_padding import keymax_cascade
from einfuse.backends.blockwise_plan import (
    QBLOCK,
    STEP,
    globalize,
    plan_group,
    plan_loop,
)
from einfuse.backends.jax_backend import LoweredCascade, lower_cascade, with_dtype
from einfuse.backends.jax_mask import band_tiles, masked_top, skip_is_exact
from einfuse.backends.jax_padding import padding_bound, row_skips, tile_max_by_row
from einfuse.backends.jax_values import BackendUnsupported, canonical_dtype
from einfuse.ir.cascade import Cascade, Einsum, TensorDecl
from einfuse.ir.dtypes import tensor_dtypes
from einfuse.ir.expr import Access
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import FusedGroup, fused_groups

LoopFactory = Callable[..., "BlockwiseCascade"]
# Another backend's lowering of what is not a fused group (None: it has nothing to add).
PlainLowering = Callable[..., Any]


def carry_dtype(dtype: Any, accumulate: Any = None) -> np.dtype:
    """The dtype the loop carries its state in: ``dtype`` widened to ``accumulate`` and to at
    least float32 (the cost model prices the loop with it too)."""
    return np.dtype(jnp.promote_types(dtype, accumulate or jnp.float32))


class BlockwiseCascade:
    """Runs a fused cascade as pre-loop, blockwise loop, post-loop programs."""

    def __init__(
        self,
        cascade: Cascade,
        group: FusedGroup,
        sizes: Mapping[str, int],
        *,
        query_tile: int = 512,
        schedule: Schedule | None = None,
        rows: bool = True,
        loop: LoopFactory | None = None,
        plain: PlainLowering | None = None,
        **options: Any,
    ) -> None:
        self.sizes = dict(sizes)
        self.dtypes = {k: canonical_dtype(v) for k, v in tensor_dtypes(cascade).items()}
        accumulate = options.get("accumulate_dtype")
        self.carry = {t: carry_dtype(self.dtypes[t], accumulate) for t in group.carried}
        self.carry_dtype = np.dtype(jnp.result_type(*self.carry.values(), np.float32))
        cascade, self.plan, mapped_rows = plan_loop(cascade, group, self.sizes)
        self.query = query = self.plan.query
        total = self.sizes[query] if query else 1
        if query is not None and schedule is not None:
            query_tile = schedule.tile(query, query_tile) or query_tile
        if query_tile < 1:
            raise BackendUnsupported(f"query tile {query_tile} of rank {query}: must be >= 1")
        self.q_tile = self.query_block(min(query_tile, total)) if query else 1
        self.q_blocks = -(-total // self.q_tile)
        body = self._globalized(self.plan.body)
        self.rows = mapped_rows if rows else ()
        body_sizes = dict(self.sizes)
        if query is not None:
            body_sizes[query] = self.q_tile
        body_sizes.update(dict.fromkeys(self.rows, 1))
        self.body_inputs = tuple(t.name for t in body.inputs)
        self.pre = lower_program(
            self.plan.pre, self.sizes, query_tile=query_tile, schedule=schedule, loop=loop,
            plain=plain, **options,
        )  # fmt: skip
        body = self._typed(body)
        self.body: LoweredCascade = lower_cascade(body, body_sizes, **options)
        # A band mask (causal, window): tiles inside the band run a step without the mask
        # (only the tiles on its edges pay for it), tiles outside it are skipped.
        self.full_body: LoweredCascade | None = None
        self.full_cascade: Cascade | None = None
        if self.plan.mask is not None:
            unmasked = plan_group(without_mask(cascade, self.plan.mask), group, query)
            full = self._typed(self._globalized(unmasked.body))
            if {t.name for t in full.inputs} <= set(self.body_inputs):
                self.full_body = lower_cascade(full, body_sizes, **options)
                self.full_cascade = full
        # Key padding read from an input: the per-tile maxima deciding which tiles to skip.
        self.keymax: LoweredCascade | None = None
        if self.plan.padding is not None and self.plan.padding.skips:
            keymax = keymax_cascade(cascade, group, self.plan.padding)
            self.keymax = lower_cascade(self._typed(keymax), self.sizes, **options)
        self.post = lower_program(
            self._typed(self.plan.post), self.sizes, query_tile=query_tile, schedule=schedule,
            loop=loop, plain=plain, **options,
        )  # fmt: skip
        self.body_cascade = body

    def _typed(self, c: Cascade) -> Cascade:
        """``c`` with each input declared in the dtype it arrives in: carried state in its
        ``carry_dtype``, anything else (a tile too) in its tensor's dtype in the cascade."""

        def dtype(name: str) -> str:
            base = name.removesuffix("__prev").removesuffix("__blk")
            if base in self.carry:
                return self.carry[base].name
            return self.dtypes.get(base, np.dtype(np.float32)).name

        decls = tuple(TensorDecl(t.name, t.ranks, dtype(t.name), t.loc) for t in c.inputs)
        return Cascade(decls, c.einsums, c.outputs, c.sizes, c.partitions)

    def _globalized(self, body: Cascade) -> Cascade:
        """The step with the query rank's value and size those of the whole rank."""
        query = self.query
        if query is None:
            return body
        total = self.sizes[query]
        einsums = tuple(
            Einsum(e.output, e.indices, globalize(e.expr, query, self.q_tile, total), e.reduce)
            for e in body.einsums
        )
        decls = body.inputs
        if any(a == Access(QBLOCK, ()) for e in einsums for a in e.expr.walk()):
            decls = (*decls, TensorDecl(QBLOCK, ()))
        return Cascade(decls, einsums, body.outputs, body.sizes, body.partitions)

    def __call__(self, arrays: Mapping[str, Any]) -> dict[str, jax.Array]:
        env = dict(arrays)
        if self.plan.pre.einsums:
            env.update(self.pre(env))
        raw, top, tmax = self.loop_inputs(env)
        env.update(self.run_loop(raw, top, tmax))
        return {o: x.astype(self.dtypes[o]) for o, x in self.post(env).items()}

    def loop_inputs(
        self, env: Mapping[str, Any]
    ) -> tuple[dict[str, jax.Array], jax.Array | None, jax.Array | None]:
        """The loop's inputs by body name (key tiles padded to whole tiles, carried state
        at its initial value), the bound on masked scores where skipping must be checked, and
        with key padding the per-tile key maxima by row."""
        g = self.plan.group
        tile, steps = self.sizes[g.inner], self.sizes[g.rank]
        raw: dict[str, jax.Array] = {}
        for name in self.body_inputs:
            if name in (STEP, QBLOCK) or name.endswith("__prev"):
                continue
            base = name.removesuffix("__blk")
            x = jnp.asarray(env[base])
            if name.endswith("__blk"):  # zero-pad the loop rank to whole tiles
                x = pad_to(x, self.plan.tiles[base][0], steps * tile)
            raw[name] = x
        for t in g.carried:
            raw[f"{t}__prev"] = jnp.asarray(env[f"{t}__init"], self.carry[t])
        mask = self.plan.mask
        top = None
        if mask is not None and mask.skips and not mask.skips_unchecked:
            top = masked_top(mask, env, self.carry_dtype)
        pad, tmax = self.plan.padding, None
        if self.keymax is not None and pad is not None:
            tmax = self.padding_maxima(env)
            top = padding_bound(pad, env)
        return raw, top, tmax

    def padding_maxima(self, env: Mapping[str, Any]) -> jax.Array:
        """Key padding's per-tile key maxima, one row per mapped row (``[rows, steps]``)."""
        assert self.plan.padding is not None and self.keymax is not None
        return tile_max_by_row(self.plan.padding, self.keymax, env, self.rows, self.sizes)

    def run_loop(
        self, raw: dict[str, jax.Array], top: jax.Array | None, tmax: jax.Array | None
    ) -> dict[str, jax.Array]:
        """Each carried state's value after the last step."""
        if not self.rows:
            return self._run_row(raw, top, tmax)
        # One (batch, head) row at a time: every product in the loop is a plain 2-D
        # GEMM, which XLA:CPU runs faster than the batched form.
        folded = {n: self._rows_to_front(x, self._dims(n, self.rows)) for n, x in raw.items()}
        finals = lax.map(lambda xs: self._run_row(xs[0], top, xs[1]), (folded, tmax))
        return {t: self._rows_back(y, self._dims(t, self.rows)) for t, y in finals.items()}

    def _ranks(self, name: str) -> tuple[str, ...]:
        t = name.removesuffix("__prev")
        if name.endswith("__prev") or name in self.plan.group.carried:
            return self.body_cascade.writer(t).output_ranks
        return next(d.ranks for d in self.body_cascade.inputs if d.name == name)

    def _dims(self, name: str, ranks: tuple[str, ...]) -> list[int]:
        mine = self._ranks(name)
        return [mine.index(r) for r in ranks]

    def _rows_to_front(self, x: jax.Array, dims: list[int]) -> jax.Array:
        """``[.., b, .., h, ..]`` -> ``[b*h, .., 1, .., 1, ..]``: rows first, kept as unit dims."""
        x = jnp.moveaxis(x, dims, list(range(len(dims))))
        x = x.reshape((-1, *x.shape[len(dims) :]))
        for d in sorted(dims):
            x = jnp.expand_dims(x, 1 + d)
        return x

    def _rows_back(self, y: jax.Array, dims: list[int]) -> jax.Array:
        y = jnp.squeeze(y, [1 + d for d in dims])
        y = y.reshape((*(self.sizes[r] for r in self.rows), *y.shape[1:]))
        return jnp.moveaxis(y, list(range(len(dims))), dims)

    def _run_row(
        self, raw: dict[str, jax.Array], top: jax.Array | None, tmax: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """The loop for every query block of one row; returns each carried state's last step.
        ``top`` bounds the masked scores where skipping them must be checked; with key
        padding, ``tmax`` is the row's per-tile key maxima and ``top`` the score bound."""
        skip = None
        if tmax is not None and self.plan.padding is not None and top is not None:
            skip, top = row_skips(self.plan.padding, tmax, top)
        g = self.plan.group
        tile, steps = self.sizes[g.inner], self.sizes[g.rank]
        mapped: dict[str, jax.Array] = {}
        shared: dict[str, jax.Array] = {}
        for name, x in raw.items():
            d = self._dims(name, (self.query,))[0] if self.query in self._ranks(name) else None
            if d is None and not name.endswith("__prev"):
                shared[name] = x
            else:
                mapped[name] = self._q_split(x, d) if self.query else x[None]

        def run_block(xs: tuple[jax.Array, dict[str, jax.Array]]) -> dict[str, jax.Array]:
            j, block = xs
            state0 = {t: block[f"{t}__prev"] for t in g.carried}

            def step_of(body: LoweredCascade) -> Any:
                def step(k: jax.Array, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
                    inputs = {**shared, **block, STEP: k.astype(jnp.float32)}
                    inputs[QBLOCK] = j.astype(jnp.float32)
                    for name in self.body_inputs:
                        if name.endswith("__blk"):
                            d = self.plan.tiles[name.removesuffix("__blk")][0]
                            x = inputs[name]
                            inputs[name] = lax.dynamic_slice_in_dim(x, k * tile, tile, d)
                    for t in g.carried:
                        inputs[f"{t}__prev"] = state[t]
                    return body({n: inputs[n] for n, _ in body.inputs})

                return step

            step = step_of(self.body)
            mask = self.plan.mask
            if skip is not None and self.plan.padding is not None:
                # Key padding: a tile whose keys are all masked is skipped (checked below).
                def skipping(k: jax.Array, s: dict[str, jax.Array]) -> dict[str, jax.Array]:
                    return lax.cond(skip[k], lambda: s, lambda: step(k, s))

                fast, checked = lax.fori_loop(0, steps, skipping, state0), self.plan.padding
            elif mask is None:
                return lax.fori_loop(0, steps, step, state0)
            else:
                fast = lax.fori_loop(0, steps, self._banded(mask, j, step, step_of), state0)
                if mask.skips_unchecked or not mask.skips:
                    return fast
                checked = mask
            # A finite fill: the skipped tiles were exact zeros only if every row's running
            # max clears the masked scores by the underflow margin; else visit every tile.
            rm = fast[checked.running_max]
            d = self._qdim_of(checked.running_max)
            valid = jnp.ones(rm.shape, bool)
            if d is not None:
                rows = j * self.q_tile + jnp.arange(self.q_tile) < self.sizes[self.query]
                valid = jnp.expand_dims(rows, [k for k in range(rm.ndim) if k != d])
            return lax.cond(
                skip_is_exact(top, rm, valid),
                lambda: fast,
                lambda: lax.fori_loop(0, steps, step, state0),
            )

        finals = lax.map(run_block, (jnp.arange(self.q_blocks), mapped))
        if self.query is None:
            return {t: finals[t][0] for t in g.carried}
        return {t: self._q_merge(finals[t], self._qdim_of(t)) for t in g.carried}

    def _banded(self, mask: MaskBand, j: jax.Array, step: Any, step_of: Any) -> Any:
        """One step of block ``j``'s loop: tiles inside the band without the mask, tiles on
        its edges with it, tiles outside it skipped (if ``mask.skips``). A ``lax.switch``,
        not a dynamic trip count, so the loop stays reverse-differentiable."""
        g = self.plan.group
        tile, steps = self.sizes[g.inner], self.sizes[g.rank]
        t = band_tiles(mask, j, self.q_tile, tile, steps, self.sizes.get(self.query, 1))
        branches = [step, lambda _, s: s]
        if self.full_body is not None:
            branches.insert(0, step_of(self.full_body))

        def guarded(k: jax.Array, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
            which = jnp.where((k >= t.first) & (k < t.upper) | (not mask.skips), 0, 1)
            if self.full_body is not None:
                which = jnp.where((k >= t.full_lo) & (k < t.full_hi), 0, which + 1)
            return lax.switch(which, branches, k, state)

        return guarded

    def source(self, fn_name: str = "cascade") -> str:
        """The three programs, for ``explain``: before, one step of the loop, after."""
        parts = [f"# {self.describe()}"]
        if self.plan.pre.einsums:
            parts.append(self.pre.source(f"{fn_name}_before"))
        parts.append(self.step_source(f"{fn_name}_step"))
        parts.append(self.post.source(f"{fn_name}_after"))
        return "\n".join(parts)

    kind = "blockwise loop"

    def query_block(self, tile: int) -> int:
        """The query block for a tile (already at most the rank's size); a kernel backend may
        round it up to what its compiler takes, padding the rows."""
        return tile

    def describe(self) -> str:
        """One line: what runs the group, its tiles, and what its mask lets it skip."""
        g = self.plan.group
        return (
            f"{self.kind} over {g.rank} (tile {g.inner}={self.sizes[g.inner]}), "
            f"query rank {self.query} in blocks of {self.q_tile}"
            + (f", {self.plan.mask.describe()}" if self.plan.mask else "")
            + (f", {self.plan.padding.describe()}" if self.plan.padding else "")
        )

    def step_source(self, fn_name: str) -> str:
        return self.body.source(fn_name)

    def _q_split(self, x: jax.Array, d: int | None) -> jax.Array:
        """``[..., P, ...]`` -> ``[blocks, ..., P0, ...]``, zero-padded to whole blocks."""
        if d is None:
            return x
        x = pad_to(x, d, self.q_blocks * self.q_tile)
        x = x.reshape((*x.shape[:d], self.q_blocks, self.q_tile, *x.shape[d + 1 :]))
        return jnp.moveaxis(x, d, 0)

    def _qdim_of(self, t: str) -> int | None:
        ranks = self.body_cascade.writer(t).output_ranks
        return ranks.index(self.query) if self.query in ranks else None

    def _q_merge(self, x: jax.Array, d: int) -> jax.Array:
        x = jnp.moveaxis(x, 0, d)
        shape = (*x.shape[:d], self.q_blocks * self.q_tile, *x.shape[d + 2 :])
        x = x.reshape(shape)
        return lax.slice_in_dim(x, 0, self.sizes[self.query], axis=d)


def pad_to(x: jax.Array, d: int, n: int) -> jax.Array:
    pad = n - x.shape[d]
    if pad <= 0:
        return x
    return jnp.pad(x, [(0, pad) if k == d else (0, 0) for k in range(x.ndim)])


def lower_program(
    cascade: Cascade,
    sizes: Mapping[str, int],
    *,
    query_tile: int = 512,
    schedule: Schedule | None = None,
    loop: LoopFactory | None = None,
    plain: PlainLowering | None = None,
    notes: list[str] | None = None,
    **options: Any,
) -> Any:
    """Lower a cascade, emitting its first fused group (if any) as a blockwise loop.

    What runs before and after the loop is lowered the same way, so a cascade with one
    fused attention per layer becomes one loop per layer. The loop's query tile is the
    schedule's tile of the query rank where it has one, else ``query_tile``. ``loop`` makes
    the loop (another backend's kernel: ``einfuse.backends.pallas``); default the JAX one.
    ``plain`` may lower what is not a fused group (the Pallas row-wise kernels), else the
    Einsum-by-Einsum emitter does.
    """
    groups = fused_groups(cascade)
    if groups:
        typed = {k: v for k, v in options.items() if k != "dtype"}  # declared from here on
        try:
            return (loop or BlockwiseCascade)(
                with_dtype(cascade, options.get("dtype")),
                groups[0],
                sizes,
                query_tile=query_tile,
                schedule=schedule,
                loop=loop,
                plain=plain,
                **typed,
            )
        except BackendUnsupported as e:
            # The Einsum-by-Einsum emitter still computes it, only not blockwise; say why.
            if notes is not None and str(e) not in " ".join(notes):
                notes.append(f"group over {groups[0].rank} runs Einsum by Einsum: {e}")
    if plain is not None and (other := plain(cascade, sizes, **options)) is not None:
        return other
    return lower_cascade(cascade, sizes, **options)
