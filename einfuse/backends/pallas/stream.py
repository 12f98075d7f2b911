"""Key tiles streamed from HBM by double-buffered DMA: a key input placed in ``hbm``.

Where a program's whole key range does not fit VMEM (a TPU core has 16 MiB by default, a
32K-token K and V in bfloat16 with head dim 128 take 16 MiB, twice for the pipeline's two
buffers), the kernel leaves K and V in HBM and copies one tile at a time into a two-slot VMEM
buffer: tile ``k+1`` is in flight while tile ``k`` is computed on (the last step fetches its
own tile again, waited for after the loop, so no copy is conditional). Only the tiles the loop
visits are copied (a causal block never fetches the tiles above the diagonal).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pl_tpu

Step = Callable[[jax.Array, Any], Any]


def tile_buffers(shape: tuple[int, ...], dtype: Any) -> list[Any]:
    """The scratch of one streamed input: two tile slots in VMEM and their DMA semaphores."""
    return [pl_tpu.VMEM((2, *shape), dtype), pl_tpu.SemaphoreType.DMA((2,))]


def tpu_interpreter() -> Any:
    """Mosaic's interpreter: runs a TPU kernel, DMAs and semaphores included, on the CPU."""
    return pl_tpu.InterpretParams()


class KeyStream:
    """The DMAs of the streamed key inputs of one program (``hbm``: each input at its row)."""

    def __init__(
        self,
        hbm: Mapping[str, Any],
        buffers: Mapping[str, tuple[Any, Any]],
        key_dims: Mapping[str, int],
        tile: int,
        steps: int,
    ) -> None:
        self.hbm, self.buffers, self.key_dims, self.size = hbm, buffers, key_dims, tile
        self.steps = steps
        self.slot: Any = 0

    def _copy(self, name: str, k: Any, slot: Any) -> Any:
        src = self.hbm[name]
        idx: list[Any] = [slice(None)] * len(src.shape)
        idx[self.key_dims[name]] = pl.ds(pl.multiple_of(k * self.size, self.size), self.size)
        buf, sem = self.buffers[name]
        return pl_tpu.make_async_copy(src.at[tuple(idx)], buf.at[slot], sem.at[slot])

    def tile(self, name: str) -> jax.Array:
        """The current step's tile of ``name`` (its DMA has been waited for)."""
        return self.buffers[name][0][self.slot]

    def loop(
        self,
        first: jax.Array,
        upper: jax.Array,
        lo: jax.Array,
        hi: jax.Array,
        masked: Step,
        full: Step | None,
        state: Any,
    ) -> Any:
        """Steps ``first .. upper-1``: ``full`` on ``[lo, hi)`` (if given), else ``masked``."""

        last = upper - 1  # clamped prefetches: no ``pl.when``, which Mosaic's interpreter
        # cannot run inside a loop with dynamic bounds; the one surplus copy is waited for below

        def ahead(k: jax.Array) -> jax.Array:
            return jnp.clip(jnp.minimum(k, last), 0, self.steps - 1)

        for n in self.hbm:
            self._copy(n, ahead(first), 0).start()

        def streamed(body: Step) -> Step:
            def step(k: jax.Array, state: Any) -> Any:
                slot = lax.rem(k - first, 2)
                for n in self.hbm:
                    self._copy(n, ahead(k + 1), 1 - slot).start()
                for n in self.hbm:
                    self._copy(n, ahead(k), slot).wait()
                self.slot = slot
                return body(k, state)

            return step

        # Three loops rather than a ``cond`` per step: the prefetch of tile k+1 runs in
        # whichever loop holds step k, so the stream does not care where the band edges are.
        if full is None:
            state = lax.fori_loop(first, upper, streamed(masked), state)
        else:
            state = lax.fori_loop(first, lo, streamed(masked), state)
            state = lax.fori_loop(lo, hi, streamed(full), state)
            state = lax.fori_loop(hi, upper, streamed(masked), state)
        pending = lax.rem(jnp.maximum(upper - first, 0), 2)
        for n in self.hbm:
            self._copy(n, ahead(first), pending).wait()
        return state


__all__ = ["KeyStream", "tile_buffers", "tpu_interpreter"]
