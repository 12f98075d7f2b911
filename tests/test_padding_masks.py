"""Key padding masks skip the key tiles wholly padded, and stay exact.

Static padding (``k < L``, ``L`` a constant, alone or with a causal band) and padding read
from an input mask (BERT's additive ``(1 - mask[b, k]) * fill`` or ``where(mask, s, fill)``),
each checked against ``jax.jit`` of the same attention on sizes the tiles do not divide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einfuse.backends.jax_blockwise import BlockwiseCascade
from einfuse.backends.jax_mask import band_tiles, with_slack
from einfuse.backends.jax_padding import row_skips, tile_max_by_row
from einfuse.frontend import jit
from einfuse.passes.fuse import fused_groups

FMIN = float(np.finfo(np.float32).min)
B, H, S, D, TILE = 2, 2, 37, 8, 8  # 5 key tiles of 8, the last one partly past the keys
L = 19  # static padding: keys 19.. are masked, so tiles 3 and 4 are skipped


def _static(kind: str, fill: float):
    def attention(q, k, v):
        s = q @ k.T * 0.25
        i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
        if kind == "where":
            s = jnp.where(j < L, s, fill)
        elif kind == "flipped":
            s = jnp.where(j >= L, fill, s)
        elif kind == "bias":
            s = s + jnp.where(j >= L, fill, 0.0)
        elif kind == "causal":
            s = jnp.where((j <= i) & (j < L), s, fill)
        else:  # "strict": row 0 sees no key
            s = jnp.where((j < i) & (j < L), s, fill)
        return jax.nn.softmax(s, axis=-1) @ v

    return attention


def _padded(kind: str, fill: float, f32_softmax: bool = False):
    """BERT-style attention over [batch, heads, seq, dim] with a key mask input [batch, seq]."""

    def attention(q, k, v, mask):
        s = jnp.einsum("bhpd,bhkd->bhpk", q, k) / 8.0
        if f32_softmax:
            s = s.astype(jnp.float32)
        if kind == "bias":
            s = s + ((1.0 - mask.astype(s.dtype)) * fill)[:, None, None, :]
        else:
            s = jnp.where(mask[:, None, None, :] > 0, s, fill)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhpk,bhkd->bhpd", p, v)

    return attention


def _qkv(seed: int, shape: tuple[int, ...], dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3)]


def _mask(*lengths: int) -> jax.Array:
    return jnp.asarray(np.arange(S)[None, :] < np.array(lengths)[:, None], jnp.int32)


def _loop(fused, *args) -> BlockwiseCascade:
    (emitted,) = fused.trace(*args).runner.emitted.values()
    loop = emitted.lowered()
    assert isinstance(loop, BlockwiseCascade)
    return loop


def _close(got, want, tol: float = 2e-5) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize(
    ("kind", "fill"),
    [("where", -np.inf), ("flipped", FMIN), ("bias", -1e4), ("causal", -1e9)],
)
def test_static_padding_skips_the_tiles_past_it_and_matches_jax(kind, fill):
    fn = _static(kind, fill)
    q, k, v = _qkv(1, (S, D))
    fused = jit(fn, passes=f"fuse{{tile={TILE}}}")
    _close(fused(q, k, v), jax.jit(fn)(q, k, v))
    band = _loop(fused, q, k, v).plan.mask
    assert band.limit == L - 1 and band.skips
    assert int(band_tiles(band, 0, S, TILE, 5, S).upper) == 3  # tiles 3, 4 never run


@pytest.mark.parametrize("fill", [-np.inf, -1e9])
def test_a_fully_masked_row_under_static_padding_matches_jax(fill):
    fn = _static("strict", fill)
    q, k, v = _qkv(2, (S, D))
    want = jax.jit(fn)(q, k, v)
    _close(jit(fn, passes=f"fuse{{tile={TILE}}}")(q, k, v), want)
    assert np.isnan(np.asarray(want[0])).all() == (fill == -np.inf)


@pytest.mark.parametrize(("kind", "fill"), [("bias", FMIN), ("bias", -1e4), ("where", -1e9)])
def test_input_padding_skips_all_masked_tiles_and_matches_jax(kind, fill):
    fn = _padded(kind, fill)
    q, k, v = _qkv(3, (B, H, S, D))
    mask = _mask(L, S)
    fused = jit(fn, passes=f"fuse{{tile={TILE}}}")
    _close(fused(q, k, v, mask), jax.jit(fn)(q, k, v, mask))
    loop = _loop(fused, q, k, v, mask)
    assert "all-masked key tiles skipped where exact" in loop.source()
    assert loop.rows == ("a",)  # the batch is mapped; the mask is per batch row
    # Batch row 0 skips key tiles 3 and 4 (keys 24..36, all >= 19); row 1 skips none.
    env = {name: mask for name, _ in loop.keymax.inputs}  # it reads only the mask
    tmax = tile_max_by_row(loop.plan.padding, loop.keymax, env, loop.rows, loop.sizes)
    skips = [np.asarray(row_skips(loop.plan.padding, t, jnp.float32(1.0))[0]) for t in tmax]
    assert [list(s) for s in skips] == [[False] * 3 + [True] * 2, [False] * 5]


@pytest.mark.parametrize(("kind", "fill"), [("bias", FMIN), ("where", -np.inf)])
def test_a_fully_masked_batch_row_matches_jax(kind, fill):
    """Batch row 1 has no key: the uniform average for finfo.min, NaN for -inf (jax.jit's
    answers); its skipping check fails and it visits every tile."""
    fn = _padded(kind, fill)
    q, k, v = _qkv(4, (B, H, S, D))
    mask = _mask(L, 0)
    want = jax.jit(fn)(q, k, v, mask)
    _close(jit(fn, passes=f"fuse{{tile={TILE}}}")(q, k, v, mask), want)
    assert np.isnan(np.asarray(want[1])).all() == (fill == -np.inf)


def test_scores_near_a_finite_fill_still_match_jax():
    """Masked keys score +9998 against a -1e4 bias, visible ones 0: each masked key weighs
    exp(-2) in jax.jit's softmax, so skipping them would be wrong; the check fails."""
    q, k, v = _qkv(5, (B, H, S, D))
    a = np.sqrt(9998 * 8.0)
    qn, kn = np.zeros((B, H, S, D)), np.asarray(k).copy()
    qn[..., 0] = a
    kn[..., 0] = 0.0
    kn[:, :, L:, :] = 0.0
    kn[:, :, L:, 0] = a
    q, k = jnp.asarray(qn, jnp.float32), jnp.asarray(kn, jnp.float32)
    fn, mask = _padded("bias", -1e4), _mask(L, L)
    want = jax.jit(fn)(q, k, v, mask)
    visible = jax.nn.softmax(jnp.zeros(L)) @ v[:, :, :L]  # what skipping would give
    assert np.abs(np.asarray(want[:, :, 0]) - np.asarray(visible)).max() > 0.1
    _close(jit(fn, passes=f"fuse{{tile={TILE}}}")(q, k, v, mask), want, tol=1e-4)


def test_bfloat16_attention_with_a_float32_softmax_skips_and_matches_jax():
    fn = _padded("bias", FMIN, f32_softmax=True)
    q, k, v = _qkv(6, (B, H, S, D), jnp.bfloat16)
    mask = _mask(L, 30)
    fused = jit(fn, passes=f"fuse{{tile={TILE}}}")
    _close(fused(q, k, v, mask), jax.jit(fn)(q, k, v, mask), tol=2e-2)
    assert "all-masked key tiles skipped where exact" in _loop(fused, q, k, v, mask).source()


def test_gradient_through_an_input_padding_loop_matches_jax():
    fn = _padded("bias", FMIN)
    q, k, v = _qkv(7, (B, H, S, D))
    mask = _mask(L, 30)
    loss = lambda q: (fn(q, k, v, mask) ** 2).sum()  # noqa: E731
    got = jax.grad(jit(loss, passes=f"fuse{{tile={TILE}}}"))(q)
    _close(got, jax.jit(jax.grad(loss))(q), tol=1e-4)


def test_unmapped_batch_rows_skip_only_tiles_masked_in_every_row():
    """With the batch inside each block, a tile is all masked only if it is in every row."""
    fn = _padded("bias", FMIN)
    q, k, v = _qkv(8, (B, H, S, D))
    mask = _mask(5, 12)
    (emitted,) = jit(fn, passes=f"fuse{{tile={TILE}}}").trace(q, k, v, mask).runner.emitted.values()
    c, sizes = emitted.cascade, dict(emitted.lowered().sizes)
    loop = BlockwiseCascade(c, fused_groups(c)[0], sizes, rows=False, query_tile=TILE)
    env = {d.name: x for d, x in zip(c.inputs, (q, k, mask, v))}
    tmax = tile_max_by_row(loop.plan.padding, loop.keymax, env, loop.rows, loop.sizes)
    assert list(np.asarray(row_skips(loop.plan.padding, tmax, jnp.float32(1.0))[0])) == [
        False, False, True, True, True
    ]  # fmt: skip
    (got,) = jax.jit(loop)(env).values()
    _close(got, jax.jit(fn)(q, k, v, mask))


def test_the_masked_score_bound_covers_a_bfloat16_rounded_fill():
    """bfloat16 rounds -1e4 to -9984, above the float32 fill: the checked bound covers it."""
    assert float(with_slack(jnp.float32(-1e4))) >= float(jnp.bfloat16(-1e4))
    assert float(with_slack(jnp.float32(-np.inf))) == -np.inf  # no inf - inf = NaN


def test_dot_product_attention_with_a_key_mask_skips_and_matches_jax():
    """jax.nn.dot_product_attention's own ``mask=`` (a where with fill 0.7 * finfo.min)."""
    q, k, v = _qkv(9, (B, S, H, D))
    mask = _mask(L, S) > 0

    def attention(q, k, v, mask):
        m = mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")

    fused = jit(attention, passes=f"fuse{{tile={TILE}}}")
    _close(fused(q, k, v, mask), jax.jit(attention)(q, k, v, mask))
    source = _loop(fused, q, k, v, mask).source()
    assert "(where): all-masked key tiles skipped where exact" in source
