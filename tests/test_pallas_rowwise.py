"""Row-wise groups (RMSNorm, LayerNorm, the matmul and epilogue after them) as Pallas kernels:
which Einsums form a group, the kernel's numerics in interpret mode against the float64
reference, its gradient, and its lowering for CUDA (Triton) and TPU (Mosaic)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.backends.jax_backend import lower_cascade
from einfuse.backends.pallas.kernel_compat import compatible
from einfuse.backends.pallas.rowwise import RowKernel, lower_rowwise
from einfuse.backends.rowwise_plan import RowGroup, plan_rowwise
from einfuse.ir.cascade import bind_sizes
from tests.cascades import ATTENTION_3PASS
from tests.strategies import cascade_with_inputs

RMS = """
inputs X[b, s, c]: {dt}, G[c]: {dt}{w}
F[b, s, c] = float32(X[b, s, c])
SQ[b, s, c] = F[b, s, c] * F[b, s, c]
SS[b, s] = SQ[b, s, c]
N[b, s, c] = {dt}(F[b, s, c] * rsqrt(SS[b, s] / {C}.0 + 1e-6)) * G[c]
{mm}outputs {out}
"""
LAYER = """
inputs X[b, s, c]: {dt}, G[c]: {dt}, H[c]: {dt}{w}
S1[b, s] = X[b, s, c]
MU[b, s, e] = S1[b, s] / {C}.0
D[b, s, c] = X[b, s, c] - MU[b, s, 0]
S2[b, s] = D[b, s, c] * D[b, s, c]
N[b, s, c] = D[b, s, c] * rsqrt(S2[b, s] / {C}.0 + 1e-5) * G[c] + H[c]
{mm}outputs {out}
"""
MATMUL = {
    "RMS": "P[b, s, d] = N[b, s, c] * W[c, d]\nY[b, s, d] = P[b, s, d] + R[b, s, d]\n",
    "LAYER": "P[b, s, d] = N[b, s, c] * W[c, d]\n"
    "Y[b, s, d] = (P[b, s, d] + B[d]) * logistic(P[b, s, d] + B[d])\n",
}
WEIGHTS = {"RMS": ", W[c, d]: {dt}, R[b, s, d]: {dt}", "LAYER": ", W[c, d]: {dt}, B[d]: {dt}"}


def norm(kind: str, dtype: str, c: int, matmul: bool) -> einfuse.Cascade:
    text = RMS if kind == "RMS" else LAYER
    return einfuse.parse(
        text.format(
            dt=dtype,
            C=c,
            w=WEIGHTS[kind].format(dt=dtype) if matmul else "",
            mm=MATMUL[kind] if matmul else "",
            out="N, Y" if matmul else "N",
        )
    )


def random_inputs(c: einfuse.Cascade, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in c.inputs:
        shape = tuple(sizes[r] for r in t.ranks)
        scale = 1 / np.sqrt(shape[0]) if t.name == "W" else 1.0
        out[t.name] = (1.0 if t.name == "G" else 0.0) + scale * rng.standard_normal(shape)
    return out


def check(c: einfuse.Cascade, sizes: dict[str, int], dtype: str, seed: int = 0, **blocks) -> None:
    """The kernel (interpreted) against the float64 reference, with the dtype's tolerance."""
    sizes = {r: n for r, n in sizes.items() if r in c.all_ranks()}
    x = random_inputs(c, sizes, seed)
    program = lower_rowwise(c, sizes, **blocks)
    assert program is not None and any(isinstance(s, RowKernel) for s in program.steps)
    got = jax.jit(program)({k: jnp.asarray(v, dtype) for k, v in x.items()})
    rounded = {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in x.items()}
    want = einfuse.interpret(c, rounded, sizes)
    tol = 1e-5 if dtype == "float32" else 2**-6  # a few bfloat16 ulps of values near 1
    for name, ref in want.items():
        assert got[name].dtype == jnp.dtype(dtype) and got[name].shape == ref.shape
        err = np.max(np.abs(np.asarray(got[name], np.float64) - ref))
        assert err <= tol * max(1.0, np.max(np.abs(ref))), (name, err)


@settings(max_examples=4)
@given(
    kind=st.sampled_from(["RMS", "LAYER"]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    matmul=st.booleans(),
    rows=st.tuples(st.integers(1, 3), st.integers(1, 21)),
    c=st.sampled_from([8, 32, 48]),
    d=st.integers(1, 40),
    block_rows=st.sampled_from([None, 8, 16]),
    block_cols=st.sampled_from([None, 8, 16]),
)
def test_norm_kernels_match_the_float64_reference(
    kind, dtype, matmul, rows, c, d, block_rows, block_cols
) -> None:
    sizes = {"b": rows[0], "s": rows[1], "c": c, "d": d, "e": 1}
    blocks = {"block_rows": block_rows, "block_cols": block_cols}
    check(norm(kind, dtype, c, matmul), sizes, dtype, **blocks)


@settings(max_examples=30)
@given(
    case=cascade_with_inputs(max_einsums=6, kinds=("contraction", "map", "reduction", "softmax")),
    blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_random_cascades_are_refused_or_computed_exactly(case, blocks) -> None:
    """Soundness of the analysis: whatever groups it finds run as the reference says."""
    c, ins = case
    options = dict(dtype=jnp.float64, max_blowup=math.inf, block_rows=blocks[0])
    with jax.enable_x64(True):
        program = lower_rowwise(c, bind_sizes(c), block_cols=blocks[1], **options)
        if program is None:
            return
        got = jax.jit(program)(ins)
    for name, want in einfuse.interpret(c, ins).items():
        np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-9, atol=1e-9)


def test_rows_and_features_that_do_not_divide_the_blocks_are_exact() -> None:
    c = norm("LAYER", "float32", 16, True)
    check(c, {"b": 3, "s": 7, "c": 16, "d": 19, "e": 1}, "float32", block_rows=8, block_cols=8)


def test_the_gradient_is_the_jax_lowering_s() -> None:
    c, sizes = norm("RMS", "float32", 16, True), {"b": 2, "s": 5, "c": 16, "d": 8}
    x = {k: jnp.asarray(v, jnp.float32) for k, v in random_inputs(c, sizes, 1).items()}
    program, plain = lower_rowwise(c, sizes, block_rows=8), lower_cascade(c, sizes)

    def loss(f):
        return lambda x: jnp.sum(f(x)["Y"] * jnp.arange(8.0)) + jnp.sum(f(x)["N"] ** 2)

    got, want = jax.jit(jax.grad(loss(program)))(x), jax.jit(jax.grad(loss(plain)))(x)
    for k in x:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


# -- which Einsums form a group ------------------------------------------------------------
BLOCK_INPUTS = "X0[a, b, c], X1[c, j], X2[a, b, j], X3[j], X4[j, i], X5[j, i], X6[i, j], "
BLOCK_INPUTS += "X7[j], X8[j, k]"
BLOCK = f"""
inputs {BLOCK_INPUTS.replace("]", "]: bfloat16")}
DOT0[a, b, j] = X0[a, b, c] * X1[c, j]
ADD0[a, b, j] = X2[a, b, j] + DOT0[a, b, j]
CVT0[a, b, j] = float32(ADD0[a, b, j])
MUL0[a, b, j] = CVT0[a, b, j] * CVT0[a, b, j]
SUM0[a, b] = MUL0[a, b, j]
MUL1[a, b, j] = bfloat16(CVT0[a, b, j] * rsqrt(SUM0[a, b] / 32.0 + 1e-06)) * X3[j]
DOT1[a, b, i] = MUL1[a, b, j] * X4[j, i]
DOT2[a, b, i] = MUL1[a, b, j] * X5[j, i]
MUL2[a, b, i] = DOT1[a, b, i] * logistic(DOT1[a, b, i]) * DOT2[a, b, i]
DOT3[a, b, j] = MUL2[a, b, i] * X6[i, j]
CVT1[a, b, j] = float32(ADD0[a, b, j] + DOT3[a, b, j])
MUL3[a, b, j] = CVT1[a, b, j] * CVT1[a, b, j]
SUM1[a, b] = MUL3[a, b, j]
MUL4[a, b, j] = bfloat16(CVT1[a, b, j] * rsqrt(SUM1[a, b] / 32.0 + 1e-06)) * X7[j]
DOT4[a, b, k] = MUL4[a, b, j] * X8[j, k]
outputs DOT4
"""  # the Llama MLP half-block as einfuse.jit lifts it (examples/llama.py, region 11)
BLOCK_SIZES = {"a": 2, "b": 16, "c": 32, "i": 64, "j": 32, "k": 16}


def test_a_llama_block_splits_into_two_norm_matmul_kernels_and_the_rest() -> None:
    plan = plan_rowwise(einfuse.parse(BLOCK))
    assert plan is not None
    kinds = [
        (s.rows, s.cols, [e.output for e in s.cascade.einsums])
        if isinstance(s, RowGroup)
        else [e.output for e in s.einsums]
        for s in plan.steps
    ]
    assert kinds == [
        ["DOT0"],  # a weight contraction before the norm: XLA's GEMM
        (("a", "b"), "i", ["ADD0", "CVT0", "MUL0", "SUM0", "MUL1", "DOT1", "DOT2", "MUL2"]),
        ["DOT3"],  # contracts the tiled features: not in a group
        (("a", "b"), "k", ["CVT1", "MUL3", "SUM1", "MUL4", "DOT4"]),
    ]
    assert plan.steps[1].cascade.outputs == ("ADD0", "MUL2")  # the residual is read later


def test_a_llama_block_runs_right_in_bfloat16() -> None:
    check(einfuse.parse(BLOCK), BLOCK_SIZES, "bfloat16", seed=3, block_rows=16, block_cols=16)


@pytest.mark.parametrize(
    "text",
    [
        "inputs X[r, c], W[c, d]\nY[r, d] = X[r, c] * W[c, d]\noutputs Y",  # a matmul alone
        "inputs X[r, c]\nS[r] = X[r, c]\noutputs S",  # a reduction alone
        "inputs X[a, r, c]\nS[a, r] = X[a, r, c]\nN[a, r, c] = X[a, r, c] / S[a, 0]\noutputs N",
        "inputs X[r, c], M[c]\nS[r] = max(c) X[r, c]\nN[r, c] = X[r, c] - S[r] + r\noutputs N",
        "inputs X[r, c], W[c, d]\nS[r] = X[r, c] * W[c, 0]\nN[r, c] = X[r, c] / S[r]\noutputs N",
    ],
    ids=["matmul", "reduction", "another-row", "row-index-as-value", "weight-in-prologue"],
)
def test_cascades_that_are_not_row_wise_are_refused(text: str) -> None:
    c = einfuse.parse(text)
    assert lower_rowwise(c, {"a": 2, "r": 4, "c": 8, "d": 8}) is None


def test_rows_may_sit_anywhere_in_a_tensor() -> None:
    c = einfuse.parse("inputs X[c, r]\nS[r] = X[c, r]\nN[c, r] = X[c, r] / S[r]\noutputs N")
    (group,) = [s for s in plan_rowwise(c).steps if isinstance(s, RowGroup)]
    assert group.rows == ("r",) and group.cols is None
    check(c, {"c": 8, "r": 11}, "float32", block_rows=8)


def test_fused_attention_is_not_row_wise_but_its_unfused_softmax_is() -> None:
    three_pass = einfuse.parse(ATTENTION_3PASS)
    sizes = {"e": 16, "f": 16, "m": 32, "p": 24}
    fused = einfuse.run_passes(three_pass, "fuse{tile=16}").cascade
    assert lower_rowwise(fused, {**sizes, "m0": 16, "m1": 2}) is None  # the loop's, not ours
    (group,) = [s for s in plan_rowwise(three_pass).steps if isinstance(s, RowGroup)]
    assert group.rows == ("p",) and group.cols == "f"  # a query's scores are one row
    check(three_pass, sizes, "float32", block_rows=8)


# -- lowering for the accelerators -----------------------------------------------------------
def lowered_text(c: einfuse.Cascade, sizes: dict[str, int], dtype: str, platform: str) -> str:
    program = lower_rowwise(c, sizes)
    x = {
        t.name: jax.ShapeDtypeStruct(tuple(sizes[r] for r in t.ranks), jnp.dtype(dtype))
        for t in c.inputs
    }
    return jax.jit(program).trace(x).lower(lowering_platforms=(platform,)).as_text()


CASES = [
    ("RMS", "bfloat16", True),
    ("LAYER", "float32", True),
    ("RMS", "float32", False),
]


@pytest.mark.parametrize("kind,dtype,matmul", CASES)
def test_the_kernel_lowers_for_cuda_through_triton(kind, dtype, matmul) -> None:
    sizes = {"b": 2, "s": 40, "c": 64, "d": 256, "e": 1}
    text = lowered_text(norm(kind, dtype, 64, matmul), sizes, dtype, "cuda")
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("kind,dtype,matmul", CASES)
def test_the_kernel_lowers_for_tpu_through_mosaic(kind, dtype, matmul) -> None:
    sizes = {"b": 2, "s": 40, "c": 64, "d": 256, "e": 1}
    text = lowered_text(norm(kind, dtype, 64, matmul), sizes, dtype, "tpu")
    assert text.count("tpu_custom_call") == 1


def test_the_llama_block_lowers_as_two_kernels_on_both() -> None:
    c = einfuse.parse(BLOCK)
    assert lowered_text(c, BLOCK_SIZES, "bfloat16", "cuda").count("xla.gpu.triton") == 2
    assert lowered_text(c, BLOCK_SIZES, "bfloat16", "tpu").count("tpu_custom_call") == 2


def test_shapes_triton_cannot_take_run_as_xla_on_cuda() -> None:
    c, sizes = norm("RMS", "float32", 48, True), {"b": 1, "s": 16, "c": 48, "d": 32}
    program = lower_rowwise(c, sizes)
    (kernel,) = [s for s in program.steps if isinstance(s, RowKernel)]
    assert "power-of-two" in kernel.refusal("cuda", kernel.blocks("cuda"))
    assert "xla.gpu.triton" not in lowered_text(c, sizes, "float32", "cuda")
    assert lowered_text(c, sizes, "float32", "tpu").count("tpu_custom_call") == 1


def test_rows_too_wide_for_a_gpu_program_run_as_xla_there() -> None:
    c, sizes = norm("RMS", "float32", 8192, True), {"b": 1, "s": 16, "c": 8192, "d": 128}
    (kernel,) = [s for s in lower_rowwise(c, sizes).steps if isinstance(s, RowKernel)]
    assert "over" in kernel.refusal("cuda", kernel.blocks("cuda"))
    assert kernel.refusal("tpu", kernel.blocks("tpu")) is None


def test_half_precision_division_is_widened_and_rounded_back() -> None:
    x = jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16)

    def f(x):
        return x / (1 + jnp.exp(-x)) + jax.nn.sigmoid(x) * x

    def rounded(v):  # an op in float32, rounded to bfloat16 where the program has it
        return v.astype(jnp.bfloat16).astype(jnp.float32)

    w = x.astype(jnp.float32)
    div = rounded(w / rounded(1 + rounded(jnp.exp(rounded(-w)))))
    want = rounded(div + rounded(rounded(jax.nn.sigmoid(w)) * w))
    got = compatible(f, widen=True, unbatch=False)(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    jaxpr = jax.make_jaxpr(compatible(f, widen=True, unbatch=False))(x)
    divs = [e for e in jaxpr.eqns if e.primitive.name == "div"]
    assert divs and all(e.invars[0].aval.dtype == jnp.float32 for e in divs)


def test_a_batched_dot_becomes_a_product_and_a_sum() -> None:
    a, b = jnp.arange(24.0).reshape(4, 6), jnp.arange(24.0).reshape(4, 6) / 7

    def f(a, b):
        return jnp.einsum("rc,rc->r", a, b)

    jaxpr = jax.make_jaxpr(compatible(f, widen=False, unbatch=True))(a, b)
    assert "dot_general" not in str(jaxpr)
    np.testing.assert_allclose(compatible(f, widen=False, unbatch=True)(a, b), f(a, b), rtol=1e-6)


def test_on_the_cpu_the_kernel_can_be_left_to_xla() -> None:
    c, sizes = norm("RMS", "float32", 16, True), {"b": 2, "s": 5, "c": 16, "d": 8}
    x = {k: jnp.asarray(v) for k, v in random_inputs(c, sizes, 2).items()}
    program = lower_rowwise(c, sizes, interpret=False)
    hlo = jax.jit(program).lower(x).as_text()
    assert "while" not in hlo  # no interpreted grid loop
    want = lower_cascade(c, sizes)(x)
    np.testing.assert_allclose(program(x)["Y"], want["Y"], rtol=1e-6)


def test_a_constant_tensor_read_by_a_group_keeps_the_program_s_dtype() -> None:
    c = einfuse.parse(
        "inputs A[i, j]\nT[i] = pow(i + 1, 0.5)\nM[j] = max(i) A[i, j]\n"
        "N[i, j] = exp(A[i, j] - M[j]) * T[i]\noutputs N"
    )  # T reads no typed value: float64 with dtype=float64, though lowered apart from N
    a = np.random.default_rng(4).standard_normal((3, 5))
    with jax.enable_x64(True):
        program = lower_rowwise(c, {"i": 3, "j": 5}, dtype=jnp.float64)
        got = jax.jit(program)({"A": a})["N"]
    np.testing.assert_allclose(got, einfuse.interpret(c, {"A": a})["N"], rtol=1e-12)


@pytest.mark.parametrize("case", ["layer-norm", "llama-block"])
def test_the_body_made_for_triton_and_mosaic_computes_the_same(case) -> None:
    if case == "layer-norm":  # its variance is a batched dot: a product and a sum there
        c, sizes, dtype = (
            norm("LAYER", "float32", 32, True),
            {"b": 2, "s": 8, "c": 32, "d": 16, "e": 1},
            "float32",
        )
    else:  # bfloat16 divisions and logistic: widened to float32 there, rounded back
        c, sizes, dtype = einfuse.parse(BLOCK), BLOCK_SIZES, "bfloat16"
    sizes = {r: n for r, n in sizes.items() if r in c.all_ranks()}
    for kernel in [s for s in lower_rowwise(c, sizes).steps if isinstance(s, RowKernel)]:
        body = kernel.body(kernel.blocks("cuda"))
        rng = np.random.default_rng(5)
        x = {n: jnp.asarray(rng.standard_normal(i.shape), dtype) for n, i in body.inputs}
        want = body(x)
        got = jax.jit(compatible(body, widen=True, unbatch=True))(x)
        for name in want:
            w, g = (np.asarray(v[name], np.float64) for v in (want, got))
            tol = 1e-5 if dtype == "float32" else 2**-7
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.max(np.abs(w)))


def test_an_input_of_the_wrong_shape_is_refused_by_name() -> None:
    c, sizes = norm("RMS", "float32", 16, False), {"b": 2, "s": 5, "c": 16}
    x = {"X": jnp.ones((2, 5, 8)), "G": jnp.ones(16)}
    with pytest.raises(einfuse.EinfuseError, match=r"input X has shape \(2, 5, 8\), expected"):
        lower_rowwise(c, sizes)(x)
