"""Band masks (causal, sliding window) skip key tiles whatever their fill, and stay exact.

Each fused loop is checked against ``jax.jit`` of the same attention written in JAX, on
sizes the tiles do not divide; the structure tests read the plan and the tile ranges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einfuse.backends.blockwise_mask import UNDERFLOW
from einfuse.backends.jax_blockwise import BlockwiseCascade
from einfuse.backends.jax_mask import band_tiles, skip_is_exact
from einfuse.backends.reference import infer_sizes
from einfuse.frontend import jit
from einfuse.ir import parse
from einfuse.passes.fuse import fused_groups
from einfuse.passes.manager import run_passes

FMIN = float(np.finfo(np.float32).min)
P, E, TILE, Q_TILE = 37, 8, 8, 8  # 5 key tiles, 5 query blocks, neither divides 37

# The visible condition and the fill, as the cascade and as JAX (i: query, j: key).
MASKS = {
    "causal": ("where(m <= p, {s}, {fill})", lambda i, j: j <= i),
    "flipped": ("where(p < m, {fill}, {s})", lambda i, j: j <= i),
    "window": ("where(and(m <= p, m > p - 9), {s}, {fill})", lambda i, j: (j <= i) & (j > i - 9)),
    "bias": ("{s} + where(p >= m, 0.0, {fill})", lambda i, j: j <= i),
    "strict": ("where(m < p, {s}, {fill})", lambda i, j: j < i),  # row 0 sees nothing
    "dpa": ("where(and(1, p >= m), {s}, {fill})", lambda i, j: j <= i),  # jax.nn's spelling
}


def _cascade(mask: str, fill: float) -> tuple:
    text = MASKS[mask][0].format(s="QK[p, m] * 0.25", fill=fill)
    c = parse(
        f"ranks p={P}, m={P}, e={E}, f={E}\ninputs Q[p, e], K[m, e], V[m, f]\n"
        "QK[p, m] = Q[p, e] * K[m, e]\n"
        f"MQK[p, m] = {text}\n"
        "GM[p] = max(m) MQK[p, m]\nSN[p, m] = exp(MQK[p, m] - GM[p])\nSD[p] = SN[p, m]\n"
        "A[p, m] = SN[p, m] / SD[p]\nAV[p, f] = A[p, m] * V[m, f]\noutputs AV\n"
    )
    fused = run_passes(c, f"fuse{{tile={TILE}}}").cascade
    sizes = infer_sizes(fused, {"Q": (P, E), "K": (P, E), "V": (P, E)})
    return BlockwiseCascade(fused, fused_groups(fused)[0], sizes, query_tile=Q_TILE)


def _jax(mask: str, fill: float):
    keep = MASKS[mask][1]

    def attention(q, k, v):
        s = q @ k.T * 0.25
        i, j = jnp.arange(P)[:, None], jnp.arange(P)[None, :]
        if mask == "bias":
            s = s + jnp.where(keep(i, j), 0.0, fill)
        else:
            s = jnp.where(keep(i, j), s, fill)
        return jax.nn.softmax(s, axis=-1) @ v

    return jax.jit(attention)


def _inputs(seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.normal(size=(P, E)) * scale, jnp.float32) for n in "QKV"}


def _check(mask: str, fill: float, ins: dict[str, jax.Array], tol: float = 2e-5) -> None:
    got = np.asarray(jax.jit(_cascade(mask, fill))(ins)["AV"])
    want = np.asarray(_jax(mask, fill)(ins["Q"], ins["K"], ins["V"]))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("mask", "fill"),
    [("causal", -np.inf), ("causal", FMIN), ("flipped", -1e9), ("window", -1e4), ("bias", -1e4)],
)
def test_every_fill_skips_and_matches_jax(mask, fill):
    bw = _cascade(mask, fill)
    assert bw.plan.causal, bw.plan.mask  # masked tiles are skipped
    assert bw.full_body is not None  # and the mask is dropped inside the band
    _check(mask, fill, _inputs(1))


@pytest.mark.parametrize("mask", ["causal", "bias"])
def test_scores_near_the_fill_still_match_jax(mask):
    """Query 0 sees only key 0, at score -9995 against a -1e4 fill: each masked key weighs
    exp(-5) in jax.jit's softmax, so skipping them would be wrong. The check fails and the
    block visits every tile."""
    ins = _inputs(2)
    a = np.sqrt(9995 / 0.25)
    k = np.asarray(ins["K"]).copy()
    k[:, 0], k[0] = 0.0, np.eye(E)[0] * a  # only key 0 meets query 0, others score 0
    q = np.asarray(ins["Q"]).copy()
    q[0] = -np.eye(E)[0] * a
    ins = {**ins, "Q": jnp.asarray(q), "K": jnp.asarray(k)}
    want = np.asarray(_jax(mask, -1e4)(ins["Q"], ins["K"], ins["V"]))
    assert np.abs(want[0] - np.asarray(ins["V"][0])).max() > 0.1  # the masked keys count
    _check(mask, -1e4, ins, tol=1e-4)


def test_a_window_whose_scores_are_all_very_negative_matches_jax():
    """Every score -225 and a -inf fill: at a window's first tile the running max was -inf,
    and rescaling the (zero) sums by exp(0 - SM) = inf once gave 0 * inf = NaN."""
    col = np.eye(E)[0] * 30.0
    q, k = np.tile(-col, (P, 1)), np.tile(col, (P, 1))
    ins = {**_inputs(7), "Q": jnp.asarray(q, jnp.float32), "K": jnp.asarray(k, jnp.float32)}
    _check("window", -np.inf, ins)


@pytest.mark.parametrize("fill", [-np.inf, -1e9])
def test_a_fully_masked_row_matches_jax(fill):
    """Row 0 of a strict ``m < p`` band sees no key: the uniform average for a finite fill,
    NaN for -inf, as jax.jit gives."""
    ins = _inputs(3)
    got = np.asarray(jax.jit(_cascade("strict", fill))(ins)["AV"])
    want = np.asarray(_jax("strict", fill)(ins["Q"], ins["K"], ins["V"]))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert np.isnan(want[0]).all() == (fill == -np.inf)


def test_the_band_is_read_in_every_orientation():
    found = {m: _cascade(m, -1e9).plan.mask for m in MASKS}
    bands = {m: (band.lo, band.hi) for m, band in found.items()}
    assert bands == {
        "causal": (None, 0),
        "flipped": (None, 0),
        "window": (-8, 0),
        "bias": (None, 0),
        "strict": (None, -1),
        "dpa": (None, 0),
    }


def test_a_finite_fill_is_checked_against_the_running_max_and_bias_against_a_bound():
    assert _cascade("causal", -1e9).plan.mask.running_max == "RM"
    bound = _cascade("bias", -1e9).plan.mask.bound
    assert bound is not None and bound.scale == 0.25 and len(bound.operands) == 2


def test_a_fill_ordinary_scores_reach_is_not_skipped():
    """``where(mask, s, 0)`` is no softmax mask: the check would fail on every block."""
    bw = _cascade("causal", 0.0)
    assert not bw.plan.causal and bw.full_body is not None
    _check("causal", 0.0, _inputs(4))


def test_causal_visits_the_tiles_up_to_the_diagonal_only():
    band = _cascade("causal", -1e9).plan.mask
    visited = full = 0
    for j in range(4):  # 2048 queries, blocks and tiles of 512
        t = band_tiles(band, j, 512, 512, 4, 2048)
        assert (int(t.first), int(t.upper)) == (0, j + 1)
        visited += int(t.upper) - int(t.first)
        full += int(t.full_hi) - int(t.full_lo)
    assert (visited, full) == (10, 6)  # of 16 tiles; the 4 on the diagonal keep the mask


def test_a_sliding_window_skips_tiles_on_both_sides():
    band = _cascade("window", -1e9).plan.mask  # keys p-8 .. p
    t = band_tiles(band, 3, 8, 8, 5, P)  # queries 24..31 see keys 16..31
    assert (int(t.first), int(t.upper), int(t.full_lo), int(t.full_hi)) == (2, 4, 3, 3)


def test_the_loop_source_says_what_it_skips():
    assert "masked key tiles skipped where exact" in _cascade("causal", FMIN).source()
    assert "masked key tiles skipped" in _cascade("causal", -np.inf).source()


def test_skipping_needs_every_real_row_to_clear_the_underflow_margin():
    fill, both = jnp.float32(-1e4), jnp.asarray([True, True])
    assert bool(skip_is_exact(fill, jnp.asarray([0.0, -9889.0]), both))  # -111 < -110
    assert not bool(skip_is_exact(fill, jnp.asarray([0.0, -9890.0]), both))  # -110
    assert bool(skip_is_exact(fill, jnp.asarray([0.0, -9890.0]), jnp.asarray([True, False])))
    assert not bool(skip_is_exact(jnp.float32(jnp.nan), jnp.zeros(2), both))
    assert UNDERFLOW < -103.98  # exp underflows to exactly 0 in float32 below about -103.97


def test_gradient_through_a_finite_fill_loop_matches_jax():
    """A softmax without stop_gradient: the loop itself (switch, cond) is differentiated."""

    def attention(q, k, v):
        s = q @ k.T * 0.25
        s = jnp.where(jnp.arange(P)[:, None] >= jnp.arange(P)[None, :], s, -1e9)
        e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)) @ v

    ins = _inputs(5)
    loss = lambda q: (attention(q, ins["K"], ins["V"]) ** 2).sum()  # noqa: E731
    got = jax.grad(jit(loss, passes="fuse{tile=8}"))(ins["Q"])
    want = jax.jit(jax.grad(loss))(ins["Q"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_dot_product_attention_is_causal_skips_and_matches_jax():
    """jax.nn.dot_product_attention's own causal mask (fill 0.7 * finfo.min), with batch and
    heads mapped one row at a time."""
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.normal(size=(2, P, 2, E)), jnp.float32) for _ in range(3))

    def attention(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    fused = jit(attention, passes=f"fuse{{tile={TILE}}}")
    (emitted,) = fused.trace(q, k, v).runner.emitted.values()
    assert "masked key tiles skipped where exact" in emitted.source()
    np.testing.assert_allclose(
        np.asarray(fused(q, k, v)), np.asarray(jax.jit(attention)(q, k, v)), rtol=2e-5, atol=2e-5
    )
