"""The JAX side of a band mask: which key tiles a query block visits, and the exactness check.

The argument for when skipping is exact is in ``einfuse.backends.blockwise_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from einfuse.backends.blockwise_mask import BOUND_SLACK, UNDERFLOW, MaskBand, ScoreBound


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

    lo, hi, limit = band.lo, band.hi, band.limit

    def div(a: Any) -> Any:  # floor(a / tile) without ``sign``, which Mosaic cannot lower
        if isinstance(a, int):
            return a // tile
        return jnp.where(a >= 0, lax.div(a, tile), -lax.div(tile - 1 - a, tile))

    upper = steps if hi is None else clip(div(p1 + hi) + 1)
    full_hi = steps if hi is None else clip(div(p0 + hi + 1))
    if limit is not None:  # static padding: no tile past the one holding key ``limit``
        upper = jnp.minimum(upper, clip(limit // tile + 1))
        full_hi = jnp.minimum(full_hi, clip((limit + 1) // tile))
    return BandTiles(
        first=0 if lo is None else clip(div(p0 + lo)),
        upper=upper,
        full_lo=0 if lo is None else clip(-div(-(p1 + lo))),
        full_hi=full_hi,
    )


def masked_top(band: MaskBand, env: Mapping[str, Any], dtype: np.dtype) -> jax.Array:
    """An upper bound on every masked score, in ``dtype``: the fill, or for an additive mask
    ``fl(B + fill)`` with ``B`` the Cauchy-Schwarz bound of the scores (rounding is
    monotone, so ``s <= B`` gives ``fl(s + fill) <= fl(B + fill)``), raised by ``with_slack``
    for a narrower member dtype."""
    fill = jnp.asarray(band.fill, dtype)
    if not band.additive:
        return with_slack(fill)  # a bfloat16 fill may round above the float32 one
    if band.bound is None:  # no bound: the check fails and every tile is visited
        return jnp.asarray(jnp.inf, dtype)
    return with_slack(score_bound_value(band.bound, env, dtype) + fill)


def score_bound_value(bound: ScoreBound, env: Mapping[str, Any], dtype: Any) -> jax.Array:
    """``B >= |s|``: ``|c| * max_p ||q_p|| * max_k ||k_k||`` with ``BOUND_SLACK``."""
    b = jnp.asarray(bound.scale * BOUND_SLACK, dtype)
    for name, dim in bound.operands:
        x = jnp.asarray(env[name]).astype(dtype)
        b = b * jnp.max(jnp.sqrt(jnp.sum(x * x, axis=dim)))
    return b


def with_slack(top: jax.Array) -> jax.Array:
    """``top`` raised by ``2**-7`` of its size: a masked score added in bfloat16 rounds by at
    most ``2**-8`` relative, which may lift it above the float32 ``fl(B + fill)``."""
    return jnp.where(jnp.isfinite(top), top + jnp.abs(top) * 2.0**-7, top)


def skip_is_exact(top: jax.Array, running_max: jax.Array, valid: jax.Array) -> jax.Array:
    """Whether every real row's masked scores (at most ``top``) give ``exp(top - m)``
    exactly 0 against its running max ``m``; NaN or infinite bounds say no."""
    return jnp.all(jnp.where(valid, (top - running_max) < UNDERFLOW, True))
