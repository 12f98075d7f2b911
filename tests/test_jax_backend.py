"""The JAX backend against the float64 reference interpreter and hand-written NumPy/JAX."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from einfuse.backends.jax_backend import BackendUnsupported, emit_jax, emit_jax_source
from einfuse.backends.reference import interpret
from einfuse.einsum_cascade.attention import attention
from einfuse.ir import Access, Cascade, EinfuseError, Einsum, Op, TensorDecl, Var, parse
from einfuse.ir.expr import BINARY_OPS, OPS, UNARY_OPS
from tests.cascades import ATTENTION_3PASS
from tests.strategies import cascade_with_inputs

# FuseMax's 1-pass form with the padded tail of a partial last tile masked before the max.
ATTENTION_1PASS = """
ranks m0=4, m1=ceiling(M/4)
partition m -> m1, m0 by 4
inputs Q[e, p], K[e, m], V[f, m]
BK[e, m1, m0] = K[e, m1*M0+m0]
BV[f, m1, m0] = V[f, m1*M0+m0]
BQK[m1, m0, p] = Q[e, p] * BK[e, m1, m0]
MQK[m1, m0, p] = where(m1*M0+m0 < M, BQK[m1, m0, p], -inf)
LM[m1, p] = max(m0) MQK[m1, m0, p]
RM[0, p] = -inf
RM[m1+1, p] = max(RM[m1, p], LM[m1, p])
SLN[m1, m0, p] = exp(MQK[m1, m0, p] - RM[m1+1, p])
SLD[m1, p] = SLN[m1, m0, p]
SLNV[f, m1, p] = SLN[m1, m0, p] * BV[f, m1, m0]
PRM[m1, p] = exp(RM[m1, p] - RM[m1+1, p])
RD[0, p] = 0
RD[m1+1, p] = SLD[m1, p] + RD[m1, p] * PRM[m1, p]
RNV[f, 0, p] = 0
RNV[f, m1+1, p] = SLNV[f, m1, p] + RNV[f, m1, p] * PRM[m1, p]
AV[f, p] = RNV[f, M1, p] / RD[M1, p]
outputs AV
"""

SIZES = {"e": 4, "f": 3, "m": 10, "p": 6}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def rand(rng: np.random.Generator, shape: tuple[int, ...], positive: bool = False) -> np.ndarray:
    """Values of magnitude 0.5..2, never zero; float32 so the backend computes in float32."""
    x = rng.uniform(0.5, 2.0, shape)
    if not positive:
        x = x * rng.choice([-1.0, 1.0], shape)
    return x.astype(np.float32)


def inputs_for(
    c: Cascade, sizes: dict[str, int], rng: np.random.Generator, positive: bool = False
) -> dict[str, np.ndarray]:
    return {t.name: rand(rng, tuple(sizes[r] for r in t.ranks), positive) for t in c.inputs}


def source(c: Cascade, sizes: dict[str, int], **kw: object) -> str:
    """The emitted listing, binding those of ``sizes`` that are ranks of ``c``."""
    return emit_jax_source(c, {r: n for r, n in sizes.items() if r in c.all_ranks()}, **kw)


def assert_matches_reference(
    c: Cascade,
    ins: dict[str, np.ndarray],
    rtol: float = 1e-5,
    sizes: dict[str, int] | None = None,
    **kw: object,
) -> dict[str, jax.Array]:
    """Run the emitted function and compare every output with the float64 interpreter."""
    out = emit_jax(c, sizes, **kw).as_dict(**ins)
    ref = interpret(c, ins, sizes)
    for name, want in ref.items():
        got = np.asarray(out[name], dtype=np.float64)
        scale = np.abs(want[np.isfinite(want)]).max(initial=1.0)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
    return out


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Hand JAX attention in the cascades' layout: Q[e, p], K[e, m], V[f, m] -> AV[f, p]."""
    return v @ jax.nn.softmax(k.T @ q, axis=0)


def all_avals(jaxpr: jax.extend.core.Jaxpr):
    """Every variable's abstract value, inside nested jaxprs (jit, scan) too."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from all_avals(getattr(inner, "jaxpr", inner))


# --------------------------------------------------------------------------- contractions
def test_matmul_chain_matches_numpy(rng: np.random.Generator) -> None:
    c = parse(
        "inputs A[i, j], B[j, k], C[k, l]\nT[i, k] = A[i, j] * B[j, k]\n"
        "U[i, l] = T[i, k] * C[k, l]\noutputs U"
    )
    ins = {"A": rand(rng, (3, 4)), "B": rand(rng, (4, 5)), "C": rand(rng, (5, 2))}
    (u,) = emit_jax(c)(ins["A"], ins["B"], ins["C"])
    np.testing.assert_allclose(u, ins["A"] @ ins["B"] @ ins["C"], rtol=1e-5)


def test_source_shows_each_contraction_as_one_einsum_line() -> None:
    src = emit_jax_source(parse(ATTENTION_3PASS), SIZES)
    assert '    QK = jnp.einsum("ep,em->mp", Q, K)\n' in src
    assert '    AV = jnp.einsum("mp,fm->fp", A, V)\n' in src
    assert "    GM = jnp.max(QK, axis=0)\n" in src


def test_3pass_attention_matches_reference_and_softmax(rng: np.random.Generator) -> None:
    c = parse(ATTENTION_3PASS)
    ins = inputs_for(c, SIZES, rng)
    out = assert_matches_reference(c, ins)
    want = softmax_attention(ins["Q"], ins["K"], ins["V"])
    np.testing.assert_allclose(out["AV"], want, rtol=1e-5, atol=1e-6)


def test_scaled_contraction_with_divisor_keeps_outer_factors_out_of_the_einsum(
    rng: np.random.Generator,
) -> None:
    c = parse("inputs S[m, p], V[f, m], D[p]\nN[f, p] = S[m, p] * V[f, m] * 0.5 / D[p]\noutputs N")
    ins = inputs_for(c, SIZES, rng, positive=True)
    assert_matches_reference(c, ins)
    assert '(jnp.einsum("mp,fm->fp", S, V) * 0.5) / D' in source(c, SIZES)


def test_masked_contraction_selects_between_reduced_branches(rng: np.random.Generator) -> None:
    text = ATTENTION_1PASS.replace(
        "BQK[m1, m0, p] = Q[e, p] * BK[e, m1, m0]\n"
        "MQK[m1, m0, p] = where(m1*M0+m0 < M, BQK[m1, m0, p], -inf)",
        "MQK[m1, m0, p] = where(m1*M0+m0 < M, Q[e, p] * BK[e, m1, m0], -inf)",
    )
    c = parse(text)
    assert_matches_reference(c, inputs_for(c, SIZES, rng))
    assert 'jnp.einsum("ep,eab->abp", Q, BK)' in source(c, SIZES, blockwise=False)


@pytest.mark.parametrize("form", ["3pass", "deferred", "2pass", "1pass"])
def test_library_causal_attention_with_batch_and_heads_matches_reference(
    rng: np.random.Generator, form: str
) -> None:
    tile = {"tile": 4} if form in ("2pass", "1pass") else {}
    c = attention(form, causal=True, e=4, f=3, p=6, m=10, **tile)
    ins = {
        "Q": rand(rng, (2, 2, 4, 6)),
        "K": rand(rng, (2, 2, 4, 10)),
        "V": rand(rng, (2, 2, 3, 10)),
    }
    assert_matches_reference(c, ins)


@pytest.mark.parametrize("form", ["3pass", "2pass", "1pass"])
def test_attention_jaxpr_contracts_without_an_e_m_p_intermediate(form: str) -> None:
    e, f, m, p = 8, 5, 16, 12
    tile = {"tile": 4} if form != "3pass" else {}
    c = attention(form, causal=True, batch=False, heads=False, e=e, f=f, m=m, p=p, **tile)
    fn = emit_jax(c)
    args = (jnp.ones((e, p)), jnp.ones((e, m)), jnp.ones((f, m)))
    jaxpr = jax.make_jaxpr(fn)(*args)
    assert "dot_general" in str(jaxpr)
    largest = max(math.prod(a.shape) for a in all_avals(jaxpr.jaxpr))
    assert largest < e * m * p
    if form == "1pass":  # a fused group runs blockwise: not even the scores exist whole
        assert largest < m * p
    else:
        assert largest >= m * p  # the scores themselves are there


# --------------------------------------------------------------------------- partitioned reads
@pytest.mark.parametrize("m", [10, 12])
def test_1pass_attention_on_divisible_and_partial_tiles_matches_softmax(
    rng: np.random.Generator, m: int
) -> None:
    c = parse(ATTENTION_1PASS)
    sizes = {**SIZES, "m": m}
    ins = inputs_for(c, sizes, rng)
    (av,) = emit_jax(c)(**ins)
    want = softmax_attention(ins["Q"], ins["K"], ins["V"])
    np.testing.assert_allclose(av, want, rtol=1e-5, atol=1e-6)
    src = source(c, sizes, blockwise=False)
    assert "BK = jnp.reshape(" in src and "gather_or_zero" not in src
    assert ("jnp.pad(K" in src) == (m % 4 != 0)


def test_partitioned_read_past_the_end_reads_zero(rng: np.random.Generator) -> None:
    c = parse("ranks i0=4, i1=3\ninputs X[i]\nT[i1, i0] = X[i1*I0 + i0] + 1\noutputs T")
    x = rand(rng, (10,))
    (t,) = emit_jax(c)(x)
    np.testing.assert_allclose(t, np.concatenate([x, [0, 0]]).reshape(3, 4) + 1, rtol=1e-6)


def test_shifted_and_constant_indices_slice_statically(rng: np.random.Generator) -> None:
    c = parse("inputs X[m, p]\nY[m, p] = X[m+1, p] - X[m-1, p] + X[M-1, p] * X[0, P-1]\noutputs Y")
    ins = inputs_for(c, SIZES, rng)
    assert_matches_reference(c, ins)
    assert "gather_or_zero" not in source(c, SIZES)


@pytest.mark.parametrize(
    "line",
    [
        "Y[m] = X[M - 1 - m, 0]",  # reversed
        "Y[m] = X[2*m, 1]",  # strided, half of it past the end
        "Y[m] = X[m, m]",  # a diagonal
        "Y[m] = X[m*m - 3, 1]",  # not affine at all
    ],
)
def test_general_reads_gather_with_zero_outside(rng: np.random.Generator, line: str) -> None:
    c = parse(f"ranks m=5, n=5\ninputs X[m, n]\n{line}\noutputs Y")
    assert_matches_reference(c, {"X": rand(rng, (5, 5))})
    assert "gather_or_zero" in emit_jax_source(c)


# --------------------------------------------------------------------------- recurrences
RECURRENCES = [
    ("RM[0, p] = -inf\nRM[m+1, p] = max(RM[m, p], X[m, p])", "RM[M, p]", "lax.cummax"),
    ("RM[0, p] = inf\nRM[m+1, p] = min(X[m, p], RM[m, p])", "RM[M, p]", "lax.cummin"),
    ("RM[0, p] = Z[p]\nRM[m+1, p] = RM[m, p] + X[m, p]", "RM[1, p]", "lax.cumsum"),
    ("RM[0, p] = 1\nRM[m+1, p] = RM[m, p] * X[m, p]", "RM[M, p]", "lax.cumprod"),
    ("RM[p, 0] = 1.5\nRM[p, m+1] = RM[p, m] * 0.5 + X[m, p] * Z[p]", "RM[p, M]", "lax.scan"),
    ("RM[0, p] = 0\nRM[m+1, p] = exp(X[m, p]) * RM[m, p] + m", "RM[M-1, p]", "lax.scan"),
]


@pytest.mark.parametrize(("lines", "final", "how"), RECURRENCES)
def test_recurrence_matches_reference(
    rng: np.random.Generator, lines: str, final: str, how: str
) -> None:
    c = parse(f"inputs X[m, p], Z[p]\n{lines}\nOUT[p] = {final} * 2\noutputs RM, OUT")
    assert_matches_reference(c, inputs_for(c, SIZES, rng))
    assert how in source(c, SIZES)


def test_recurrence_output_holds_the_initial_step(rng: np.random.Generator) -> None:
    c = parse("inputs X[m]\nR[0] = 2\nR[m+1] = R[m] + X[m]\noutputs R")
    x = rand(rng, (5,))
    (r,) = emit_jax(c)(x)
    np.testing.assert_allclose(r, 2 + np.concatenate([[0], np.cumsum(x)]), rtol=1e-5)


# --------------------------------------------------------------------------- operators
def op_cascade(op: str) -> Cascade:
    n = 1 if op in UNARY_OPS else 2 if op in BINARY_OPS else 3
    names = "XYZ"[:n]
    args = tuple(Access(t, (Var("i"),)) for t in names)
    return Cascade(
        tuple(TensorDecl(t, ("i",)) for t in names),
        (Einsum("OUT", (Var("i"),), Op(op, args)),),
        ("OUT",),
    )


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_operator_matches_reference(rng: np.random.Generator, op: str) -> None:
    c = op_cascade(op)
    n = 64
    if op in ("log", "sqrt", "rsqrt", "pow"):
        ins = {t.name: rand(rng, (n,), positive=True) for t in c.inputs}
    else:  # small integers, so equality and zero tests both ways occur
        ins = {t.name: rng.integers(-2, 3, n).astype(np.float32) for t in c.inputs}
    if op == "div":
        ins["Y"] = rand(rng, (n,))
    assert_matches_reference(c, ins)


def test_comparisons_used_as_numbers_are_zero_or_one(rng: np.random.Generator) -> None:
    c = parse("inputs X[i]\nY[i] = (X[i] > 0) * 3 + (i < 2) - not(X[i] > 0)\noutputs Y")
    x = rand(rng, (5,))
    (y,) = emit_jax(c)(x)
    np.testing.assert_array_equal(y, (x > 0) * 3 + (np.arange(5) < 2) - (x <= 0))


def test_rank_values_mask_and_scale(rng: np.random.Generator) -> None:
    c = parse("inputs X[m, p]\nY[m, p] = where(m <= p, X[m, p], -1) + m * 0.5 - P\noutputs Y")
    x = rand(rng, (4, 6))
    (y,) = emit_jax(c)(x)
    m, p = np.arange(4)[:, None], np.arange(6)[None, :]
    np.testing.assert_allclose(y, np.where(m <= p, x, -1) + m * 0.5 - 6, rtol=1e-6)
    assert "lax.broadcasted_iota" in emit_jax_source(c, {"m": 4, "p": 6})


@pytest.mark.parametrize("how", ["max", "min", "prod", "sum"])
def test_reductions_over_two_ranks_with_a_broadcast_rank(
    rng: np.random.Generator, how: str
) -> None:
    c = parse(f"inputs X[m, p, e]\nY[e, f] = {how}(m, p) X[m, p, e] * 0.75\noutputs Y")
    assert_matches_reference(c, inputs_for(c, SIZES, rng, positive=True), sizes={"f": 3})


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "line", ["S[m, p] = max(e) Q[e, p] * K[e, m]", "S[m, p] = Q[e, p] + K[e, m]"]
)
def test_iteration_space_far_beyond_the_operands_is_refused(line: str) -> None:
    c = parse(f"inputs Q[e, p], K[e, m]\n{line}\noutputs S")
    with pytest.raises(BackendUnsupported, match=r"einsum S: evaluating .* e=64"):
        emit_jax(c, {"e": 64, "m": 64, "p": 64})


def test_max_blowup_lets_a_large_iteration_space_through(rng: np.random.Generator) -> None:
    c = parse("inputs Q[e, p], K[e, m]\nS[m, p] = max(e) Q[e, p] * K[e, m]\noutputs S")
    assert_matches_reference(c, inputs_for(c, SIZES, rng), max_blowup=math.inf)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    ("text", "accumulate"), [(ATTENTION_3PASS, None), (ATTENTION_1PASS, jnp.float32)]
)
def test_bfloat16_attention_within_bfloat16_tolerance(
    rng: np.random.Generator, text: str, accumulate: object
) -> None:
    c = parse(text)
    ins = inputs_for(c, SIZES, rng)
    out = emit_jax(c, dtype=jnp.bfloat16, accumulate_dtype=accumulate).as_dict(**ins)
    assert out["AV"].dtype == jnp.bfloat16
    ref = interpret(c, ins)["AV"]
    np.testing.assert_allclose(np.asarray(out["AV"], np.float64), ref, rtol=2e-2, atol=2e-2)


def test_accumulate_dtype_keeps_statistics_in_float32() -> None:
    src = emit_jax_source(
        parse(ATTENTION_3PASS), SIZES, dtype=jnp.bfloat16, accumulate_dtype=jnp.float32
    )
    assert "SD = jnp.sum(SN, axis=0, dtype=jnp.float32)" in src
    assert "preferred_element_type=jnp.float32" in src
    assert "GM = jnp.max(QK, axis=0).astype(jnp.float32)" in src


# --------------------------------------------------------------------------- transformations
def test_jit_gives_the_same_result_as_op_by_op(rng: np.random.Generator) -> None:
    c = parse(ATTENTION_3PASS)
    args = tuple(inputs_for(c, SIZES, rng).values())
    eager = emit_jax(c, jit=False)(*args)[0]
    np.testing.assert_allclose(jax.jit(emit_jax(c, jit=False))(*args)[0], eager, rtol=1e-6)


def test_vmap_over_a_batch_of_queries(rng: np.random.Generator) -> None:
    fn = emit_jax(parse(ATTENTION_1PASS))
    q, k, v = rand(rng, (3, 4, 6)), rand(rng, (4, 10)), rand(rng, (3, 10))
    got = jax.vmap(lambda qi: fn(qi, k, v)[0])(q)
    want = jnp.stack([softmax_attention(qi, k, v) for qi in q])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text", [ATTENTION_3PASS, ATTENTION_1PASS])
def test_grad_matches_grad_of_hand_attention(rng: np.random.Generator, text: str) -> None:
    fn = emit_jax(parse(text))
    args = (rand(rng, (4, 6)), rand(rng, (4, 10)), rand(rng, (3, 10)))
    got = jax.grad(lambda *a: fn(*a)[0].sum(), argnums=(0, 1, 2))(*args)
    want = jax.grad(lambda *a: softmax_attention(*a).sum(), argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- calling
def test_sizes_come_from_the_inputs_when_not_given(rng: np.random.Generator) -> None:
    fn = emit_jax(parse(ATTENTION_1PASS))
    for m in (7, 13):
        q, k, v = rand(rng, (4, 6)), rand(rng, (4, m)), rand(rng, (3, m))
        np.testing.assert_allclose(fn(q, k, v)[0], softmax_attention(q, k, v), atol=1e-5)


def test_positional_and_named_calls_agree(rng: np.random.Generator) -> None:
    c = parse(ATTENTION_3PASS)
    ins = inputs_for(c, SIZES, rng)
    fn = emit_jax(c)
    np.testing.assert_array_equal(fn(ins["Q"], ins["K"], ins["V"])[0], fn.as_dict(**ins)["AV"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"Q": np.ones((4, 6)), "K": np.ones((4, 10))}, "missing \\['V'\\]"),
        ({"Q": np.ones((4, 6)), "K": np.ones((4, 10)), "V": np.ones((3, 9))}, "V"),
        ({"Q": np.ones((4,)), "K": np.ones((4, 10)), "V": np.ones((3, 10))}, "input Q has 1"),
    ],
)
def test_bad_inputs_raise_a_named_error(kwargs: dict, message: str) -> None:
    with pytest.raises(EinfuseError, match=message):
        emit_jax(parse(ATTENTION_3PASS)).as_dict(**kwargs)


def test_source_needs_sizes() -> None:
    with pytest.raises(EinfuseError, match="sizes"):
        emit_jax_source(parse(ATTENTION_3PASS))


# --------------------------------------------------------------------------- random cascades
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cascade_with_inputs(max_einsums=5))
def test_random_cascades_match_reference_in_float64(case) -> None:
    c, ins = case
    ref = interpret(c, ins)
    with jax.enable_x64(True):
        out = emit_jax(c, dtype=jnp.float64, max_blowup=math.inf).as_dict(**ins)
        for name, want in ref.items():
            np.testing.assert_allclose(np.asarray(out[name]), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_blockwise_loop_lowers_for_accelerators_without_one(platform):
    """jax.export lowers for a platform this machine does not have: the fused, causal,
    bfloat16 loop (switch over tile kinds, float32 state) is plain JAX on TPU and GPU too."""
    from einfuse.ir.schedule import Schedule
    from einfuse.passes.fuse import fuse

    c = attention("3pass", causal=True, b=1, h=2, e=64, f=64, p=256, m=256)
    fn = emit_jax(fuse(c, tile=64), schedule=Schedule.of(tiles={"p": 128}))
    args = [jax.ShapeDtypeStruct((1, 2, 64, 256), jnp.bfloat16)] * 3
    exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
    text = exported.mlir_module()
    assert exported.platforms == (platform,)
    assert "stablehlo.while" in text and "stablehlo.case" in text  # the loop and the switch
    assert "bf16" in text and "f32" in text
