"""Where each array of a fused group's kernel lives: block specs, layouts, gradients' shapes.

The kernel reads every tensor in its loop rank order; a dim read at a grid row (a batch
row, a head, ``e*K+k`` of a grouped query head) is squeezed out of the block and indexed
from the program ids. On a TPU the squeezed dims go first (Mosaic tiles the last two dims of
a block by (8, 128)), and a block that would keep fewer than two dims gets a trailing unit
dim. A K/V input read per head at ``h*D+d`` is reshaped so the head is its own dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from einfuse.backends.jax_blockwise import pad_to
from einfuse.backends.jax_values import BackendUnsupported
from einfuse.ir.expr import Const, Expr, Op, Size, Var

if TYPE_CHECKING:
    from einfuse.backends.blockwise_plan import BlockPlan, Splits
    from einfuse.ir.cascade import Cascade


class KernelLayout:
    """The layout half of ``PallasBlockwise``: what it needs of the loop is declared here."""

    sizes: dict[str, int]
    query: str | None
    q_tile: int
    q_blocks: int
    plan: BlockPlan
    grid_rows: tuple[str, ...]
    squeezed: dict[str, tuple[Expr | None, ...]]
    splits: Splits
    kernel_cascade: Cascade
    epilogue_cascade: Cascade
    epilogue_outputs: tuple[str, ...]
    _ranks: Any  # BlockwiseCascade's: a loop tensor's ranks

    # -- layouts: each tensor's dims in the loop's order, on a TPU with the squeezed dims first
    # (Mosaic tiles the last two dims of a block by (8, 128)); a trailing unit dim where a
    # block would keep fewer than two dims -------------------------------------------------
    def operand(self, name: str) -> tuple[tuple[str, ...], tuple[Expr | None, ...]]:
        """The tensor's ranks and, per dim, the grid index it is squeezed at (or None)."""
        base = name.removesuffix("__prev")
        decl = self.kernel_cascade.input_decl(name)
        if decl is not None:
            ranks = decl.ranks
        elif name in self.epilogue_outputs:  # a result the kernel's epilogue writes
            ranks = self.epilogue_cascade.tensor_ranks(name)
        else:
            ranks = self._ranks(name)
        return ranks, self.squeezed.get(base if name.endswith("__prev") else name, ())

    def perm(self, name: str, tpu: bool) -> tuple[list[int], bool]:
        """The kernel layout's dim order and whether it has a trailing unit dim."""
        ranks, squeeze = self.operand(name)
        kept = [k for k in range(len(ranks)) if squeeze[k] is None]
        perm = [k for k in range(len(ranks)) if squeeze[k] is not None] + kept if tpu else None
        return (perm or list(range(len(ranks)))), len(kept) < 2

    def query_dim(self, name: str, tpu: bool) -> int | None:
        ranks, squeeze = self.operand(name)
        perm, _ = self.perm(name, tpu)
        for pos, k in enumerate(perm):
            if ranks[k] == self.query and squeeze[k] is None:
                return pos
        return None

    def to_kernel(self, name: str, x: jax.Array, tpu: bool) -> jax.Array:
        for d, outer, inner in reversed(self.splits.get(name, ())):
            x = x.reshape((*x.shape[:d], self.sizes[outer], self.sizes[inner], *x.shape[d + 1 :]))
        perm, trailing = self.perm(name, tpu)
        x = jnp.transpose(x, perm)
        if trailing:
            x = x[..., None]
        if (d := self.query_dim(name, tpu)) is not None:
            x = pad_to(x, d, self.q_blocks * self.q_tile)
        return x

    def from_kernel(self, name: str, y: jax.Array, tpu: bool) -> jax.Array:
        perm, trailing = self.perm(name, tpu)
        if (d := self.query_dim(name, tpu)) is not None:
            y = lax.slice_in_dim(y, 0, self.sizes[self.query], axis=d)
        if trailing:
            y = y[..., 0]
        y = jnp.transpose(y, [int(k) for k in np.argsort(perm)])
        for d, _, _ in self.splits.get(name, ()):  # merge what ``_to_kernel`` split
            y = y.reshape((*y.shape[:d], y.shape[d] * y.shape[d + 1], *y.shape[d + 2 :]))
        return y

    def spec(self, name: str, shape: tuple[int, ...], tpu: bool) -> pl.BlockSpec:
        """Its grid row of every tensor; its query block where it has the query rank; the
        whole key range of a key tile input (the kernel loads one tile per step)."""
        squeeze = self.operand(name)[1]
        perm, trailing = self.perm(name, tpu)
        qd = self.query_dim(name, tpu)
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

    def tile_shape(self, name: str) -> tuple[int, ...]:
        """One key tile of ``name`` as the kernel holds it (TPU layout, squeezed dims gone)."""
        ranks, squeeze = self.operand(name)
        perm, trailing = self.perm(name, True)
        sizes = {**self.sizes, self.plan.group.inner: self.sizes[self.plan.group.inner]}
        shape = [sizes[ranks[k]] for k in perm if squeeze[k] is None]
        return (*shape, 1) if trailing else tuple(shape)

    def hbm_rows(self, name: str, ids: Mapping[str, Any]) -> tuple[Any, ...]:
        """An HBM input (TPU layout) at this program's row: its squeezed dims fixed."""
        _, squeeze = self.operand(name)
        perm, trailing = self.perm(name, True)
        idx = [
            slice(None) if squeeze[k] is None else grid_index(squeeze[k], ids, self.sizes)
            for k in perm
        ]
        return tuple(idx + [slice(None)] * trailing)

    def unit(self, name: str, x: jax.Array, tpu: bool) -> jax.Array:
        """``x`` without the trailing unit dim its kernel layout has (if any)."""
        return x.reshape(x.shape[:-1]) if self.perm(name, tpu)[1] else x

    def full_dims(self, name: str, tpu: bool) -> list[tuple[str, Expr | None]]:
        """The kernel layout's dims: (rank, squeezed index or None); "" for a trailing unit."""
        ranks, squeeze = self.operand(name)
        perm, trailing = self.perm(name, tpu)
        return [(ranks[k], squeeze[k]) for k in perm] + [("", None)] * trailing

    def query_dim_kept(self, name: str, tpu: bool) -> int | None:
        kept = [r for r, sq in self.full_dims(name, tpu) if sq is None]
        return kept.index(self.query) if self.query in kept else None

    def key_dim_full(self, name: str, tpu: bool) -> int:
        dims = self.full_dims(name, tpu)
        return next(
            d for d, (r, sq) in enumerate(dims) if r == self.plan.group.inner and sq is None
        )

    def kept_shape(self, name: str, x: jax.Array, tpu: bool) -> tuple[int, ...]:
        """The shape of ``name``'s kernel layout without its squeezed dims (whole ranges)."""
        shape = self.to_kernel(name, x, tpu).shape
        return tuple(n for n, (_, sq) in zip(shape, self.full_dims(name, tpu)) if sq is None)

    def key_grad(self, name: str, partial: jax.Array, tpu: bool) -> jax.Array:
        """A key input's gradient from the per-grid-row partials ``[*grid rows, *kept]``:
        summed over the grid rows it is shared by (the query heads of its group)."""
        rows = list(self.grid_rows)
        dims = self.full_dims(name, tpu)
        own = [sq.rank for _, sq in dims if isinstance(sq, Var) and sq.rank in rows]
        partial = partial.sum(axis=tuple(k for k, r in enumerate(rows) if r not in own))
        left = [r for r in rows if r in own]
        kept_at, out_axes = len(left), []
        for _, sq in dims:
            if isinstance(sq, Var) and sq.rank in left:
                out_axes.append(left.index(sq.rank))
            elif sq is not None:
                out_axes.append(None)
            else:
                out_axes.append(kept_at)
                kept_at += 1
        y = jnp.transpose(partial, [a for a in out_axes if a is not None])
        for d, a in enumerate(out_axes):
            if a is None:
                y = jnp.expand_dims(y, d)
        return self.from_kernel(name, y, tpu)

    def key_dim(self, name: str, tpu: bool) -> int:
        """The key tile's dim of a key input inside the kernel (squeezed dims gone)."""
        ranks, squeeze = self.operand(name)
        perm, _ = self.perm(name, tpu)
        kept = [ranks[k] for k in perm if squeeze[k] is None]
        return kept.index(self.plan.group.inner)


def row_value(rank: str) -> str:
    """The scalar input holding a grid row's value inside the kernel."""
    return f"{rank}__ROW"


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
