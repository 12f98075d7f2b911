"""The JAX side of a band mask: which key tiles a query block visits, and the exactness check.

The argument for when skipping is exact is in ``einfuse.backends.blockwise_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from einfuse.backends.blockwise_mask import BOUND_SLACK, UNDERFLOW, MaskBand


class BandTiles(NamedTuple):
    """Key tiles ``[first, upper)`` hold a visible key for some query of the block;
    ``[full_lo, full_hi)`` hold only keys every query of the block sees."""

    first: Any
    upper: Any
    full_lo: Any
    full_hi: Any


def band_tiles(
    band: MaskBand, block: Any, q_tile: int, tile: int, steps: int, queries: int
) -> BandTiles:
    """The tile ranges of query block ``block`` (an int or a traced index).

    Only the block's real queries count (the last block's padding rows are dropped later).
    """
    p0 = block * q_tile
    p1 = jnp.minimum(p0 + q_tile - 1, queries - 1)

    def clip(t: Any) -> Any:
        return jnp.clip(t, 0, steps)

    lo, hi = band.lo, band.hi
    return BandTiles(
        first=0 if lo is None else clip((p0 + lo) // tile),
        upper=steps if hi is None else clip((p1 + hi) // tile + 1),
        full_lo=0 if lo is None else clip(-((-(p1 + lo)) // tile)),
        full_hi=steps if hi is None else clip((p0 + hi + 1) // tile),
    )


def masked_top(band: MaskBand, env: Mapping[str, Any], dtype: np.dtype) -> jax.Array:
    """An upper bound on every masked score, in ``dtype``: the fill, or for an additive mask
    ``fl(B + fill)`` with ``B`` the Cauchy-Schwarz bound of the scores (rounding is
    monotone, so ``s <= B`` gives ``fl(s + fill) <= fl(B + fill)``)."""
    fill = jnp.asarray(band.fill, dtype)
    if not band.additive:
        return fill
    if band.bound is None:  # no bound: the check fails and every tile is visited
        return jnp.asarray(jnp.inf, dtype)
    bound = jnp.asarray(band.bound.scale * BOUND_SLACK, dtype)
    for name, dim in band.bound.operands:
        x = jnp.asarray(env[name]).astype(dtype)
        bound = bound * jnp.max(jnp.sqrt(jnp.sum(x * x, axis=dim)))
    return bound + fill


def skip_is_exact(top: jax.Array, running_max: jax.Array, valid: jax.Array) -> jax.Array:
    """Whether every real row's masked scores (at most ``top``) give ``exp(top - m)``
    exactly 0 against its running max ``m``; NaN or infinite bounds say no."""
    return jnp.all(jnp.where(valid, (top - running_max) < UNDERFLOW, True))
