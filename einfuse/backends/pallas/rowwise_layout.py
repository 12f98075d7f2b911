"""How a row-wise kernel blocks its operands: the blocks per platform, and each tensor's layout.

A kernel program holds a block of rows (the row ranks flattened to one, first) and a block
of output features. Rows and output features that do not divide their blocks are
zero-padded (rows are independent, output features never reduced in the group; the
padding is sliced off after). Every operand has at least two dims, as Mosaic tiles the
last two by (8, 128) and wants a chip's tiling for anything with fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclass(frozen=True)
class Blocks:
    """A kernel's block of rows and of output features on one platform."""

    rows: int
    cols: int

    @classmethod
    def candidates(cls, platform: str, n_rows: int, n_cols: int) -> list[Blocks]:
        """Triton: powers of two from 16 (its dot's minimum); Mosaic: rows in 8s, columns in
        128s or whole; interpreted: few programs (each runs in turn). Smallest last."""
        if platform in ("cuda", "rocm"):
            rows = [r for r in (64, 32, 16) if r <= _pow2_at_least(n_rows, 16)]
            cols = [c for c in (128, 64, 32, 16) if c <= _pow2_at_least(n_cols, 16)]
        elif platform == "tpu":
            whole = -(-n_rows // 8) * 8
            rows = list(dict.fromkeys(min(r, whole) for r in (256, 128, 64, 32, 16, 8)))
            cols = [n_cols] if n_cols <= 512 else [512, 256, 128]
        else:
            rows, cols = [min(128, n_rows)], [n_cols]
        return [cls(r, c) for c in cols for r in rows]


@dataclass(frozen=True)
class Layout:
    """A tensor as the kernel takes it: row ranks flattened first (and padded to whole
    blocks), output features padded to whole blocks, at least two dims (Mosaic's tiles)."""

    row_dims: tuple[int, ...]  # where the row ranks are (none: a weight, a gain)
    row_sizes: tuple[int, ...]
    rest_sizes: tuple[int, ...]  # the other dims, in order
    col_dim: int | None  # the output features' dim after flattening
    blocks: Blocks
    row_blocks: int
    col_blocks: int

    @property
    def logical(self) -> list[int]:
        """The flattened, padded shape, before unit dims make it two-dimensional."""
        shape = ([self.row_blocks * self.blocks.rows] if self.row_dims else []) + list(
            self.rest_sizes
        )
        if self.col_dim is not None:
            shape[self.col_dim] = self.col_blocks * self.blocks.cols
        return shape

    @property
    def lead(self) -> int:
        """Unit dims added in front of a weight (behind a row vector) to make two dims."""
        return max(0, 2 - len(self.logical))

    @property
    def padded(self) -> tuple[int, ...]:
        shape = self.logical
        if self.row_dims:
            return (*shape, *([1] * self.lead))
        return (*([1] * self.lead), *shape)

    def to_kernel(self, x: jax.Array) -> jax.Array:
        if self.row_dims:
            x = jnp.moveaxis(x, self.row_dims, list(range(len(self.row_dims))))
            x = x.reshape((-1, *x.shape[len(self.row_dims) :]))
        pads = [(0, n - m) for n, m in zip(self.logical, x.shape)]
        if any(p for _, p in pads):
            x = jnp.pad(x, pads)
        return x.reshape(self.padded)

    def from_kernel(self, y: jax.Array) -> jax.Array:
        y = y.reshape(self.logical)
        n_rows = math.prod(self.row_sizes)
        true = ([n_rows] if self.row_dims else []) + list(self.rest_sizes)
        y = y[tuple(slice(0, n) for n in true)]
        if not self.row_dims:
            return y
        y = y.reshape((*self.row_sizes, *y.shape[1:]))
        return jnp.moveaxis(y, list(range(len(self.row_dims))), self.row_dims)

    def spec(self) -> pl.BlockSpec:
        shape = list(self.padded)
        off = 0 if self.row_dims else self.lead
        col = None if self.col_dim is None else off + self.col_dim
        if self.row_dims:
            shape[0] = self.blocks.rows
        if col is not None:
            shape[col] = self.blocks.cols
        row = bool(self.row_dims)

        def index(i: Any, j: Any) -> tuple[Any, ...]:
            return tuple(i if (k == 0 and row) else j if k == col else 0 for k in range(len(shape)))

        return pl.BlockSpec(tuple(shape), index)


def _pow2_at_least(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())
