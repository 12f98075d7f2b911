"""The Pallas backend's attention kernel: numerics in interpret mode, lowering for GPU and TPU.

Every kernel runs here interpreted (the same kernel Triton and Mosaic compile) and is checked
against the float64 reference interpreter on random shapes, tiles, masks and dtypes, and
against ``jax.jit`` of the JAX functions users write (GQA, key padding, gradients). The
lowering tests produce the StableHLO a GPU or TPU would compile, with the kernel's custom call.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.backends.pallas import PallasBlockwise, emit_pallas
from einfuse.ir import parse
from einfuse.ir.schedule import Schedule
from einfuse.passes.manager import run_passes

MASKS = {
    "none": "{s}",
    "causal": "where(m <= p, {s}, -inf)",
    "window": "where(and(m <= p, m > p - 9), {s}, -inf)",
    "bias": "{s} + where(p >= m, 0.0, -1000000000.0)",  # finite: skipping is checked
}
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def _cascade(p: int, m: int, e: int, mask: str, dtype: str) -> str:
    s = "float32(QK[p, m]) * 0.25"
    return (
        f"ranks p={p}, m={m}, e={e}, f={e}\n"
        f"inputs Q[p, e]: {dtype}, K[m, e]: {dtype}, V[m, f]: {dtype}\n"
        "QK[p, m] = Q[p, e] * K[m, e]\n"
        f"MQK[p, m] = {MASKS[mask].format(s=s)}\n"
        "GM[p] = max(m) MQK[p, m]\nSN[p, m] = exp(MQK[p, m] - GM[p])\nSD[p] = SN[p, m]\n"
        f"A[p, m] = {dtype}(SN[p, m] / SD[p])\nAV[p, f] = A[p, m] * V[m, f]\noutputs AV\n"
    )


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    kind = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(dtype, np.float32)
    return np.asarray(x).astype(kind).astype(np.float64)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    p=st.integers(1, 40),
    m=st.integers(17, 48),
    e=st.sampled_from([4, 8, 16]),
    tile=st.sampled_from([4, 8, 16]),
    q_tile=st.sampled_from([4, 8, 16, 64]),
    mask=st.sampled_from(sorted(MASKS)),
    dtype=st.sampled_from(sorted(TOL)),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_matches_the_float64_reference(p, m, e, tile, q_tile, mask, dtype, seed):
    c = parse(_cascade(p, m, e, mask, dtype))
    fused = run_passes(c, f"fuse{{tile={tile}}}").cascade
    rng = np.random.default_rng(seed)
    ins = {
        "Q": _rounded(rng.standard_normal((p, e)), dtype),
        "K": _rounded(rng.standard_normal((m, e)), dtype),
        "V": _rounded(rng.standard_normal((m, e)), dtype),
    }
    f = emit_pallas(fused, schedule=Schedule.of(tiles={"p": q_tile}))
    assert isinstance(f.lowered(), PallasBlockwise)
    (got,) = f(**{k: jnp.asarray(v, dtype) for k, v in ins.items()})
    assert got.dtype == jnp.dtype(dtype)
    want = einfuse.interpret(c, ins)["AV"]
    if mask in ("causal", "window") and p > m:  # rows with no visible key: NaN in both
        rows = np.arange(p) < m
        got, want = np.asarray(got)[rows], want[rows]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=TOL[dtype], rtol=TOL[dtype])


# ------------------------------------------------------------------ JAX functions as users write
def _qkv(shape_q, shape_kv, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], shape_q, dtype)
    return (q, *(jax.random.normal(k, shape_kv, dtype) for k in keys[1:]))


def dpa(q, k, v, mask=None, *, causal=False):  # [b, t, n, h], GQA when k has fewer heads
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_in_bfloat16_matches_jax(causal):
    q, k, v = _qkv((2, 70, 4, 16), (2, 70, 2, 16), jnp.bfloat16)
    got = einfuse.jit(dpa, passes="fuse{tile=16}", backend="pallas", static_argnames="causal")
    want = jax.jit(dpa, static_argnames="causal")(q, k, v, causal=causal)
    out = got(q, k, v, causal=causal)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(want), atol=3e-2, rtol=3e-2)


def test_key_padding_read_from_an_input_matches_jax():
    q, k, v = _qkv((2, 40, 2, 8), (2, 40, 2, 8))
    lengths = jnp.array([40, 13])
    mask = (jnp.arange(40)[None, :] < lengths[:, None])[:, None, None, :]
    got = einfuse.jit(dpa, passes="fuse{tile=8}", backend="pallas")(q, k, v, mask)
    np.testing.assert_allclose(got, jax.jit(dpa)(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_a_finite_fill_the_scores_reach_is_rechecked_and_matches_jax():
    def attention(q, k, v):  # scores near the fill: skipping the masked tiles would be wrong
        s = q @ k.T
        n = q.shape[0]
        s = jnp.where(jnp.arange(n)[:, None] >= jnp.arange(n)[None, :], s, -30.0)
        return jax.nn.softmax(s, axis=-1) @ v

    q, k, v = _qkv((48, 8), (48, 8))
    q = q * 6.0  # scores of tens: exp(-30 - max) is not an exact zero
    got = einfuse.jit(attention, passes="fuse{tile=8}", backend="pallas")(q, k, v)
    np.testing.assert_allclose(got, jax.jit(attention)(q, k, v), atol=2e-5, rtol=2e-5)


def test_gradients_equal_those_of_jax():
    q, k, v = _qkv((1, 40, 2, 8), (1, 40, 2, 8))
    f = einfuse.jit(dpa, passes="fuse{tile=8}", backend="pallas", static_argnames="causal")

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, causal=True)))

    got = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dpa), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    # dot_product_attention's softmax shift does not hide the kernels' own backward
    runner = f.trace(q, k, v, causal=True).runner
    (loop,) = [x for e in runner.emitted.values() for x in e.loops()]
    assert isinstance(loop, PallasBlockwise) and loop.backward is not None


def _pallas_grids(fn, *args) -> list[tuple[int, ...]]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    found: list[tuple[int, ...]] = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(tuple(eqn.params["grid_mapping"].grid))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_the_grid_runs_rows_and_query_blocks_and_kernel_false_keeps_the_jax_loop():
    q, k, v = _qkv((2, 64, 3, 8), (2, 64, 3, 8))
    f = einfuse.jit(dpa, passes="fuse{tile=16}", backend="pallas")
    grids = _pallas_grids(f, q, k, v)
    assert grids and set(grids) == {(2, 3, 1)}  # batch x heads x one query block of 128
    cascade = run_passes(parse(_cascade(64, 64, 8, "none", "float32")), "fuse{tile=16}").cascade
    q2 = jnp.ones((64, 8))
    assert _pallas_grids(emit_pallas(cascade, schedule=Schedule.of(tiles={"p": 16})), q2, q2, q2)
    jax_loop = emit_pallas(cascade, schedule=Schedule.of(options={"pallas.kernel": False}))
    assert _pallas_grids(jax_loop, q2, q2, q2) == []


# ------------------------------------------------------------------ lowering for GPU and TPU
@pytest.mark.parametrize(
    ("platform", "call"), [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_einfuse_hlo_lowers_the_kernel_for_a_platform_this_machine_lacks(capsys, platform, call):
    from einfuse.cli import main

    code = main(
        [
            *("hlo", "tests/fixtures/small_model.py:attention"),
            *("--args", "bf16[256,64] bf16[256,64] bf16[256,64]", "--passes", "fuse{tile=64}"),
            *("--backend", "pallas", "--platform", platform, "--stage", "stablehlo"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and f"custom_call @{call}" in out


def test_schedule_options_reach_the_triton_kernel():
    cascade = run_passes(parse(_cascade(256, 256, 64, "causal", "bfloat16")), "fuse{tile=64}")
    options = {"pallas.num_warps": 8, "pallas.num_stages": 3}
    schedule = Schedule.of(tiles={"p": 128}, options=options)
    f = emit_pallas(cascade.cascade, schedule=schedule, jit=False)
    x = jax.ShapeDtypeStruct((256, 64), jnp.bfloat16)
    text = jax.jit(f).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "num_warps = 8" in text and "num_stages = 3" in text
    assert "grid_x = 2" in text  # two query blocks of 128
    with pytest.raises(einfuse.EinfuseError, match=r"pallas\.num_warps=0: a positive int"):
        emit_pallas(cascade.cascade, schedule=Schedule.of(options={"pallas.num_warps": 0}))


# ------------------------------------------------------------------ the TPU form, interpreted
GQA = """\
ranks b=2, k=2, g=2, n=4, p={p}, m={m}, e=8, f=8
inputs Q[b, n, p, e]: {dt}, K[b, k, m, e]: {dt}, V[b, k, m, f]: {dt}
QK[b, k, g, p, m] = Q[b, k*G+g, p, e] * K[b, k, m, e]
MQK[b, k, g, p, m] = {mask}
GM[b, k, g, p] = max(m) MQK[b, k, g, p, m]
SN[b, k, g, p, m] = exp(MQK[b, k, g, p, m] - GM[b, k, g, p])
SD[b, k, g, p] = SN[b, k, g, p, m]
A[b, k, g, p, m] = {dt}(SN[b, k, g, p, m] / SD[b, k, g, p])
AV[b, k, g, p, f] = A[b, k, g, p, m] * V[b, k, m, f]
outputs AV
"""


@pytest.mark.parametrize("mask", ["none", "causal", "bias"])
@pytest.mark.parametrize("place", ["vmem", "hbm"])
def test_the_tpu_kernel_with_vmem_or_streamed_key_tiles_matches_the_reference(mask, place):
    p, m, dt = 24, 40, "float32"
    text = MASKS[mask].format(s="float32(QK[b, k, g, p, m]) * 0.25")
    c = parse(GQA.format(p=p, m=m, dt=dt, mask=text))
    fused = run_passes(c, "fuse{tile=8}").cascade
    rng = np.random.default_rng(7)
    ins = {
        "Q": rng.standard_normal((2, 4, p, 8)),
        "K": rng.standard_normal((2, 2, m, 8)),
        "V": rng.standard_normal((2, 2, m, 8)),
    }
    schedule = Schedule.of(tiles={"p": 8}, placement={"K": place, "V": place})
    f = emit_pallas(fused, schedule=schedule, interpret_tpu=True)
    (got,) = f(**{k: jnp.asarray(v, jnp.float32) for k, v in ins.items()})
    np.testing.assert_allclose(got, einfuse.interpret(c, ins)["AV"], atol=2e-5, rtol=2e-5)


def test_streamed_key_tiles_lower_for_tpu_as_dmas_and_a_bad_placement_is_refused():
    cascade = run_passes(parse(_cascade(256, 256, 128, "causal", "bfloat16")), "fuse{tile=64}")
    schedule = Schedule.of(tiles={"p": 128}, placement={"K": "hbm", "V": "hbm"})
    f = emit_pallas(cascade.cascade, schedule=schedule, jit=False)
    x = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
    text = jax.jit(f).trace(x, x, x).lower(lowering_platforms=("tpu",)).as_text()
    assert "custom_call @tpu_custom_call" in text
    with pytest.raises(einfuse.EinfuseError, match="place K=smem: the pallas backend places"):
        emit_pallas(cascade.cascade, schedule=Schedule.of(placement={"K": "smem"}))


def alibi(q, k, v):  # [h, s, d]: each head's slope is read from the head's index
    s = jnp.einsum("hqd,hkd->hqk", q, k)
    h = jnp.arange(q.shape[0])[:, None, None].astype(jnp.float32)
    i, j = jnp.arange(q.shape[1])[None, :, None], jnp.arange(k.shape[1])[None, None, :]
    s = s - 0.1 * (h + 1) * jnp.abs(i - j)
    return jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize("backend", ["jax", "pallas"])
def test_a_head_index_read_as_a_value_matches_jax(backend):
    # The JAX loop once mapped the head rank one at a time and read its value as 0 in every
    # head; the kernel reads it from its program id.
    q, k, v = _qkv((3, 64, 16), (3, 64, 16))
    f = einfuse.jit(alibi, passes="fuse{tile=16}", backend=backend)
    np.testing.assert_allclose(f(q, k, v), jax.jit(alibi)(q, k, v), atol=2e-5, rtol=2e-5)
    assert "emitted: " in f.explain(q, k, v) and "Einsum by Einsum" not in f.explain(q, k, v)


def _grid_inputs(fn, *args) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each input of the first pallas_call in ``fn``'s jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args)

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                return [(tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars]
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                if (found := walk(sub)) is not None:
                    return found
        return None

    return walk(jaxpr.jaxpr)


@pytest.mark.parametrize(("fill", "scale"), [(-1e9, 1.0), (-30.0, 6.0)])
def test_key_padding_skips_padded_tiles_per_row_and_rechecks_a_near_fill(fill, scale):
    def attention(q, k, v, mask):  # BERT's additive form; [b, s, h, d], mask [b, s]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) + (1.0 - mask[:, None, None, :]) * fill
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)

    q, k, v = _qkv((2, 40, 2, 8), (2, 40, 2, 8))
    q = q * scale  # at -30 the scores reach the fill: skipping is not exact and is redone
    mask = (jnp.arange(40)[None, :] < jnp.array([[40], [13]])).astype(jnp.float32)
    f = einfuse.jit(attention, passes="fuse{tile=8}", backend="pallas")
    want = jax.jit(attention)(q, k, v, mask)
    np.testing.assert_allclose(f(q, k, v, mask), want, atol=2e-5, rtol=2e-5)
    # the kernel reads one row of skip flags per (batch, head) program: 5 key tiles each
    assert ((2, 2, 5), "int32") in _grid_inputs(f, q, k, v, mask)


def test_the_result_is_written_by_the_kernel_not_the_final_states():
    # acc / l and the output layout run inside the kernel: it writes the result once, in
    # its dtype, and no float32 state leaves it
    q, k, v = _qkv((1, 64, 2, 16), (1, 64, 2, 16), jnp.bfloat16)
    f = einfuse.jit(dpa, passes="fuse{tile=16}", backend="pallas", static_argnames="causal")
    runner = f.trace(q, k, v, causal=False).runner
    (loop,) = [x for e in runner.emitted.values() for x in e.loops()]
    assert loop.epilogue is not None and loop.epilogue_outputs
    jaxpr = jax.make_jaxpr(lambda q, k, v: f(q, k, v, causal=False))(q, k, v)
    kernels = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                kernels.append([str(v.aval.dtype) for v in eqn.outvars])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert kernels and all(outs == ["bfloat16"] for outs in kernels)
