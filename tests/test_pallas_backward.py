"""The Pallas backward: FlashAttention's two kernels (dQ; dK and dV) built from the loop's
IR, checked against ``jax.grad`` of the original function, in interpret mode and in the TPU
form, with the lowering for CUDA and TPU; where it does not apply, the JAX loop's VJP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einfuse
from einfuse.backends.pallas import PallasBlockwise, emit_pallas
from einfuse.ir import parse
from einfuse.ir.schedule import Schedule
from einfuse.passes.manager import run_passes


def manual(q, k, v, causal=False):  # [b, s, h, d]; k, v may have fewer heads (GQA)
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0
    if causal:
        n = q.shape[1]
        s = jnp.where(jnp.arange(n)[:, None] >= jnp.arange(n)[None, :], s, -jnp.inf)
    e = jnp.exp(s - s.max(-1, keepdims=True))  # no stop_gradient: einfuse's derivative runs
    return jnp.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), v)


def _loops(f, *args, **kwargs) -> list[PallasBlockwise]:
    runner = f.trace(*args, **kwargs).runner
    return [x for e in runner.emitted.values() for x in e.loops() if isinstance(x, PallasBlockwise)]


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "causal"),
    [((1, 40, 2, 8), (1, 40, 2, 8), True), ((2, 37, 4, 8), (2, 37, 2, 8), False)],
)
def test_gradients_of_the_pallas_backward_equal_jax(q_shape, kv_shape, causal):
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(keys[0], q_shape)
    k, v = (jax.random.normal(x, kv_shape) for x in keys[1:3])
    ct = jax.random.normal(keys[3], q_shape)
    f = einfuse.jit(manual, passes="fuse{tile=8}", backend="pallas", static_argnames="causal")

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, causal=causal) * ct)

    got = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(manual), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
    (loop,) = _loops(f, q, k, v, causal=causal)
    assert loop.backward is not None and loop.backward_note == ""


CASCADE = """\
ranks p={n}, m={n}, e=16, f=16
inputs Q[p, e]: {dt}, K[m, e]: {dt}, V[m, f]: {dt}
QK[p, m] = Q[p, e] * K[m, e]
MQK[p, m] = where({band}, float32(QK[p, m]) * 0.25, -inf)
GM[p] = max(m) MQK[p, m]
SN[p, m] = exp(MQK[p, m] - GM[p])
SD[p] = SN[p, m]
A[p, m] = {dt}(SN[p, m] / SD[p])
AV[p, f] = A[p, m] * V[m, f]
outputs {outputs}
"""


CAUSAL, WINDOW = "m <= p", "and(m <= p, m > p - 9)"


def _grads(dt: str, tpu: bool = False, band: str = CAUSAL):
    c = parse(CASCADE.format(n=48, dt=dt, outputs="AV", band=band))
    fused = run_passes(c, "fuse{tile=16}").cascade
    schedule = Schedule.of(tiles={"p": 16})
    pallas = emit_pallas(fused, schedule=schedule, interpret_tpu=tpu)
    jax_loop = emit_pallas(fused, schedule=schedule.with_options({"pallas.kernel": False}))
    xs = [jax.random.normal(jax.random.PRNGKey(i), (48, 16), dt) for i in range(3)]

    def loss(fn):
        return lambda *xs: sum(jnp.sum(jnp.sin(y.astype(jnp.float32))) for y in fn(*xs))

    got = jax.grad(loss(pallas), argnums=(0, 1, 2))(*xs)
    want = jax.grad(loss(jax_loop), argnums=(0, 1, 2))(*xs)
    return pallas.lowered(), got, want


@pytest.mark.parametrize(
    ("dt", "tol", "band"),
    [("float32", 2e-5, CAUSAL), ("bfloat16", 5e-2, CAUSAL), ("float32", 2e-5, WINDOW)],
)
def test_bfloat16_and_float32_gradients_equal_the_jax_loops(dt, tol, band):
    loop, got, want = _grads(dt, band=band)
    assert loop.backward is not None
    for a, b in zip(got, want):
        assert a.dtype == jnp.dtype(dt)
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol, rtol=tol)


def test_the_tpu_form_of_the_backward_matches_in_mosaics_interpreter():
    loop, got, want = _grads("float32", tpu=True)
    assert loop.backward is not None
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_a_result_reading_the_running_max_keeps_the_jax_loops_backward():
    c = parse(CASCADE.format(n=48, dt="float32", outputs="AV", band=CAUSAL).replace(
        "outputs AV", "LSE[p] = GM[p] + log(SD[p])\noutputs AV, LSE"
    ))  # fmt: skip
    fused = run_passes(c, "fuse{tile=16}").cascade
    loop = emit_pallas(fused, schedule=Schedule.of(tiles={"p": 16})).lowered()
    assert loop.backward is None and "reads the running max" in loop.backward_note


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
def test_the_backward_kernels_lower_for_cuda_and_tpu(dt):
    f = einfuse.jit(manual, passes="fuse{tile=64}", backend="pallas", static_argnames="causal")
    grad = jax.jit(
        jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, causal=True).astype(jnp.float32)), (0, 1, 2))
    )
    x = jax.ShapeDtypeStruct((1, 256, 2, 64), dt)
    cuda = grad.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    tpu = grad.trace(x, x, x).lower(lowering_platforms=("tpu",)).as_text()
    assert cuda.count("custom_call @__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV
    assert tpu.count("custom_call @tpu_custom_call") == 3


def test_scores_the_lifter_computed_before_the_loop_get_their_gradient_per_tile():
    # bf16 dot_product_attention lifts with the scores computed before the loop: a tiled
    # input with the query rank, whose gradient the dQ kernel writes tile by tile.
    def causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    q, k, v = (jax.random.normal(x, (1, 70, 2, 16), jnp.bfloat16) for x in keys[:3])
    ct = jax.random.normal(keys[3], (1, 70, 2, 16))

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)  # noqa: E731
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    f = einfuse.jit(causal, passes="fuse{tile=16}", backend="pallas")
    (loop,) = _loops(f, q, k, v)
    assert loop.backward is not None and loop.backward.scores  # the scores case
    want = grads(einfuse.jit(causal, passes="fuse{tile=16}"))  # the JAX loop's VJP
    for a, b in zip(grads(f), want):
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=2e-2, rtol=2e-2)
