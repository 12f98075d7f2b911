"""Mixed precision: casts in the IR, the dtype rule, bfloat16 lifting and fusion as real
models write them, checked against the reference interpreter (which rounds at every cast)
and against ``jax.jit``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.backends.jax_backend import emit_jax
from einfuse.backends.jax_blockwise import BlockwiseCascade
from einfuse.einsum_cascade.lift import lift
from einfuse.ir import parse
from einfuse.ir.dtypes import expr_dtype, promote, tensor_dtypes
from einfuse.passes.fuse import fused_groups
from einfuse.passes.sink_casts import sink_casts

BF16 = jnp.bfloat16
MIXED = """\
inputs Q[e, p]: bfloat16, K[e, m]: bfloat16, V[f, m]: bfloat16
QK[m, p] = Q[e, p] * K[e, m]
GM[p] = max(m) float32(QK[m, p])
SN[m, p] = exp(float32(QK[m, p]) - GM[p])
SD[p] = SN[m, p]
A[m, p] = bfloat16(SN[m, p] / SD[p])
AV[f, p] = A[m, p] * V[f, m]
outputs AV
"""


def bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float64)


# --------------------------------------------------------------------------- the rule
def test_casts_print_and_parse_and_give_their_dtype() -> None:
    c = parse(MIXED)
    assert parse(str(c)) == c
    d = tensor_dtypes(c)
    assert (d["QK"], d["GM"], d["SN"], d["A"], d["AV"]) == (
        "bfloat16",
        "float32",
        "float32",
        "bfloat16",
        "bfloat16",
    )


def test_promotion_follows_jax_and_constants_are_weak() -> None:
    for a in ("bfloat16", "float16", "float32"):
        for b in ("bfloat16", "float16", "float32"):
            assert promote(a, b) == jnp.promote_types(a, b).name
    x = parse("inputs X[i]: bfloat16\nY[i] = X[i] * 2.5 + (i < 3)\noutputs Y").einsums[0]
    assert expr_dtype(x.expr, {"X": "bfloat16"}.get) == "bfloat16"


def test_reference_rounds_at_bfloat16_tensors_and_casts() -> None:
    c = parse("inputs X[i]\nY[i]: = bfloat16(X[i] * 3)\noutputs Y".replace("Y[i]: =", "Y[i] ="))
    x = np.array([1.00390625 / 3, 0.1, 1e-3])
    (y,) = einfuse.interpret(c, {"X": x}).values()
    np.testing.assert_array_equal(y, bf16(x * 3))
    assert not np.array_equal(y, x * 3)


# --------------------------------------------------------------------------- lifting
def attention(q, k, v, *, causal: bool, fill: float, f32_softmax: bool):  # [s, d] each
    s = (q @ k.T) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    if causal:
        n = q.shape[0]
        s = jnp.where(jnp.arange(n)[:, None] >= jnp.arange(n)[None, :], s, fill)
    if f32_softmax:
        p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype)
    else:
        p = jax.nn.softmax(s, axis=-1)
    return p @ v


FILLS = (-np.inf, float(jnp.finfo(BF16).min), -1e9, -1e4)


def qkv(seed: int, n: int, d: int = 16) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (n, d), jnp.float32).astype(BF16) for k in keys)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 40),
    causal=st.booleans(),
    fill=st.sampled_from(FILLS),
    f32_softmax=st.booleans(),
    tile=st.sampled_from([4, 8, 512]),
    seed=st.integers(0, 2**16),
)
def test_bfloat16_attention_lifts_as_one_region_and_fuses_like_the_reference(
    n: int, causal: bool, fill: float, f32_softmax: bool, tile: int, seed: int
) -> None:
    q, k, v = qkv(seed, n)

    def f(q, k, v):
        return attention(q, k, v, causal=causal, fill=fill, f32_softmax=f32_softmax)

    program = lift(jax.make_jaxpr(f)(q, k, v))
    assert len(program.regions) == 1 and not program.opaques
    region = program.regions[0]
    c = einfuse.run_passes(region.cascade, "unify-ranks").cascade
    fused = einfuse.run_passes(c, f"fuse{{tile={tile}}}").cascade
    assert einfuse.pass_counts(fused)[fused_groups(fused)[0].rank] == 1
    assert tensor_dtypes(fused)[fused.outputs[0]] == "bfloat16"
    args = dict(zip(program.inputs, (np.asarray(x, np.float64) for x in (q, k, v))))
    ins = {t: args[i] for i, t in zip(region.inputs, region.input_tensors)}
    want = einfuse.interpret(c, ins)[c.outputs[0]]
    # Fusion moves where bfloat16 rounds (P is rounded before its sum is complete): a few
    # bfloat16 ulps of the output's scale, never more.
    np.testing.assert_allclose(einfuse.interpret(fused, ins)[c.outputs[0]], want, atol=0.05)
    got = emit_jax(fused).as_dict(**ins)[c.outputs[0]]
    assert got.dtype == BF16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.05)
    ref = jax.jit(f)(q, k, v)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64), atol=0.05)


def test_widening_casts_sink_below_the_mask() -> None:
    c = parse(
        "inputs S[m, p]: bfloat16\nT[m, p] = float32(where(m <= p, S[m, p] / 8, -1e9))\noutputs T"
    )
    (e,) = sink_casts(c).einsums
    assert str(e.expr) == "where(m <= p, float32(S[m, p]) / 8, -1000000000.0)"
    x = np.random.default_rng(0).standard_normal((5, 5))
    np.testing.assert_array_equal(
        einfuse.interpret(sink_casts(c), {"S": x})["T"], einfuse.interpret(c, {"S": x})["T"]
    )


def test_bfloat16_score_dot_accumulates_as_jax_does() -> None:
    """float32(Q) * float32(K) on bfloat16 reads is one dot of the bfloat16 operands."""
    c = parse(
        "inputs Q[e, p]: bfloat16, K[e, m]: bfloat16\n"
        "S[m, p] = float32(Q[e, p]) * float32(K[e, m])\noutputs S"
    )
    src = emit_jax(c, {"e": 8, "p": 4, "m": 4}).source()
    assert "preferred_element_type=jnp.float32" in src and "astype" not in src


# --------------------------------------------------------------------------- through jit
@pytest.mark.parametrize("fill", FILLS)
def test_jit_fuses_bfloat16_attention_with_float32_softmax(fill: float) -> None:
    q, k, v = qkv(1, 96, 32)

    def f(q, k, v):
        return attention(q, k, v, causal=True, fill=fill, f32_softmax=True)

    jf = einfuse.jit(f, passes="fuse{tile=32}")
    out = jf(q, k, v)
    assert out.dtype == BF16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(jax.jit(f)(q, k, v), np.float32), atol=0.05
    )
    text = jf.explain(q, k, v)
    assert "fuse: fused" in text
    source = "\n".join(em.source() for em in jf.trace(q, k, v).runner.emitted.values())
    assert "skipped" in source  # the causal band is recognized through the float32 cast


def test_cost_model_prices_each_einsum_in_its_own_dtype() -> None:
    from einfuse.cost_model.model import CostModel

    c = parse(MIXED)
    model = CostModel(c, "h100", {"e": 64, "f": 64, "p": 1024, "m": 1024}, dtype="bfloat16")
    by_name = dict(zip((e.output for e in c.einsums), model.einsum_dtypes))
    assert by_name == {
        "QK": "bfloat16",
        "GM": "float32",
        "SN": "float32",
        "SD": "float32",
        "A": "bfloat16",
        "AV": "bfloat16",
    }


def test_the_readme_attention_fuses_in_bfloat16() -> None:
    def attention(q, k, v, causal):  # [batch, seq, heads, dim], as in README.md
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
        if causal:
            n = q.shape[1]
            s = jnp.where(jnp.arange(n)[:, None] >= jnp.arange(n)[None, :], s, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(x, (2, 64, 2, 16)).astype(BF16) for x in keys)
    for causal in (False, True):
        jf = einfuse.jit(attention, passes="fuse{tile=16}", static_argnums=3)
        out = jf(q, k, v, causal)
        want = jax.jit(attention, static_argnums=3)(q, k, v, causal)
        assert out.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(want, np.float32), atol=0.05
        )
        regions = jf.trace(q, k, v, causal).program.regions
        assert sum(len(fused_groups(r.cascade)) for r in regions) == 1


@pytest.mark.parametrize("fill", [-1e9, float(jnp.finfo(BF16).min)])
def test_bfloat16_additive_mask_is_recognized_and_bounded(fill: float) -> None:
    """``s + where(causal, 0, fill)`` on bfloat16 scores, softmax in float32: the bias is cast
    to bfloat16 and the scores up to float32, yet the band and its score bound are found."""
    q, k, v = qkv(5, 128, 32)

    def f(q, k, v):
        s = q @ k.T * 0.125
        n = q.shape[0]
        s = s + jnp.where(jnp.arange(n)[:, None] >= jnp.arange(n)[None, :], 0.0, fill)
        return jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype) @ v

    jf = einfuse.jit(f, passes="fuse{tile=32}")
    np.testing.assert_allclose(
        np.asarray(jf(q, k, v), np.float32), np.asarray(jax.jit(f)(q, k, v), np.float32), atol=0.05
    )
    lowered = [e.lowered() for e in jf.trace(q, k, v).runner.emitted.values()]
    (loop,) = [x for x in lowered if isinstance(x, BlockwiseCascade)]
    mask = loop.plan.mask
    assert mask is not None and mask.additive and mask.bound is not None


# Elementwise steps and reductions a model chains, each with JAX's own rounding, for the
# lifter's hypothesis test below (tame ranges, so bfloat16 rounding stays bfloat16-sized).
STEPS = {
    "tanh": jnp.tanh,
    "scale": lambda x: x * 1.5,
    "shift": lambda x: x - 0.25,
    "square": lambda x: x * x,
    "to_bf16": lambda x: x.astype(BF16),
    "to_f32": lambda x: x.astype(jnp.float32),
    "row_max": lambda x: x - jnp.max(x, axis=-1, keepdims=True),
    "row_mean": lambda x: x - jnp.mean(x, axis=-1, keepdims=True),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=6),
    start=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_mixed_precision_chains_lift_as_one_region_matching_jax_and_the_reference(
    steps: list[str], start: str, seed: int
) -> None:
    x = jax.random.normal(jax.random.key(seed), (4, 6), jnp.float32).astype(start)

    def f(x):
        for s in steps:
            x = STEPS[s](x)
        return x

    program = lift(jax.make_jaxpr(f)(x))
    want = np.asarray(jax.jit(f)(x), np.float64)
    if not program.regions:  # nothing to lift (say, a lone cast to the input's dtype)
        return
    assert len(program.regions) == 1 and not program.opaques
    (region,) = program.regions
    c = region.cascade
    assert tensor_dtypes(c)[region.output_tensors[0]] == str(jax.eval_shape(f, x).dtype)
    got = einfuse.interpret(c, {region.input_tensors[0]: np.asarray(x, np.float64)})
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got[region.output_tensors[0]], want, atol=0.05 * scale)
    out = einfuse.jit(f)(x)
    assert out.dtype == jax.jit(f)(x).dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=0.05 * scale)
