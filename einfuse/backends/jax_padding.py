"""The JAX side of key padding read from an input: per-tile maxima, which tiles a row skips,
and the bound its exactness check compares (the argument: ``blockwise_padding``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from einfuse.backends.blockwise_mask import SKIP_FILL
from einfuse.backends.blockwise_padding import KEYMAX, KeyPadding
from einfuse.backends.jax_mask import score_bound_value, with_slack


def tile_max_by_row(
    pad: KeyPadding,
    keymax: Any,
    env: Mapping[str, Any],
    rows: tuple[str, ...],
    sizes: Mapping[str, int],
) -> jax.Array:
    """``T[row, t]``: the max of ``key`` over key tile ``t`` for each mapped row (rows
    flattened as the loop maps them), ``T[t]`` with no rows. Ranks of ``key`` that are not
    rows are maxed over: a tile is skipped only where it is all masked for each of them."""
    x = jnp.asarray(keymax(env)[KEYMAX], jnp.float32)  # [*pad.ranks, steps]
    inner = tuple(d for d, r in enumerate(pad.ranks) if r not in rows)
    x = jnp.max(x, axis=inner) if inner else x
    kept = [r for r in pad.ranks if r in rows]
    for r in rows:
        if r not in kept:
            x = x[None]
            kept.insert(0, r)
    x = jnp.transpose(x, [kept.index(r) for r in rows] + [len(rows)])
    x = jnp.broadcast_to(x, (*(sizes[r] for r in rows), x.shape[-1]))
    return x.reshape((-1, x.shape[-1])) if rows else x


def row_skips(pad: KeyPadding, tmax: jax.Array, bound: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tiles to skip, an upper bound on their masked scores) for one row's ``T``."""
    skip = tmax <= SKIP_FILL  # NaN: visited
    top = jnp.max(jnp.where(skip, tmax, -jnp.inf))
    return skip, with_slack(bound + top if pad.additive else top)


def padding_bound(pad: KeyPadding, env: Mapping[str, Any]) -> jax.Array:
    """``B``: the Cauchy-Schwarz bound of the scores for the additive form (else 0)."""
    if not pad.additive or pad.bound is None:
        return jnp.float32(0.0)
    return score_bound_value(pad.bound, env, jnp.float32)
