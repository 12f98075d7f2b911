"""The reference interpreter against hand-written NumPy, one construct per test."""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.backends.reference import infer_sizes, interpret
from einfuse.ir import (
    Access,
    Cascade,
    EinfuseError,
    Einsum,
    Op,
    TensorDecl,
    Var,
    VerifyError,
    parse,
)
from einfuse.ir.expr import OPS
from tests.cascades import ATTENTION_3PASS

# FuseMax's 1-pass form: running max RM, denominator RD and numerator RNV along m1, with
# the padded tail of a partial last tile masked to -inf before the max.
ATTENTION_1PASS = """
ranks m0=4, m1=ceiling(M/4)
partition m -> m1, m0 by 4
inputs Q[e, p], K[e, m], V[f, m]
BQK[m1, m0, p] = where(m1*M0+m0 < M, Q[e, p] * K[e, m1*M0+m0], -inf)
LM[m1, p] = max(m0) BQK[m1, m0, p]
RM[0, p] = -inf
RM[m1+1, p] = max(RM[m1, p], LM[m1, p])
SLN[m1, m0, p] = exp(BQK[m1, m0, p] - RM[m1+1, p])
SLD[m1, p] = SLN[m1, m0, p]
SLNV[f, m1, p] = SLN[m1, m0, p] * V[f, m1*M0+m0]
PRM[m1, p] = exp(RM[m1, p] - RM[m1+1, p])
RD[0, p] = 0
RD[m1+1, p] = SLD[m1, p] + RD[m1, p] * PRM[m1, p]
RNV[f, 0, p] = 0
RNV[f, m1+1, p] = SLNV[f, m1, p] + RNV[f, m1, p] * PRM[m1, p]
AV[f, p] = RNV[f, M1, p] / RD[M1, p]
outputs AV
"""


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Non-zero values of both signs, away from 0."""
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


def softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = k.T @ q
    p = np.exp(s - s.max(axis=0))
    return v @ (p / p.sum(axis=0))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- contractions
@pytest.mark.parametrize("contract", [True, False])
def test_contraction_matches_matmul(rng: np.random.Generator, contract: bool) -> None:
    c = parse("inputs Q[e, p], K[e, m]\nQK[m, p] = Q[e, p] * K[e, m]\noutputs QK")
    q, k = rand(rng, 6, 5), rand(rng, 6, 7)
    out = interpret(c, {"Q": q, "K": k}, contract=contract)
    np.testing.assert_allclose(out["QK"], k.T @ q, rtol=1e-12)


@pytest.mark.parametrize(
    "text",
    [
        "inputs A[i, k], B[k, j]\nC[i, j] = A[i, k] * B[k, j]\noutputs C",
        "inputs A[i, k], B[k, j]\nC[i, j] = 2 * A[i, k] * exp(B[k, j]) * A[i, k]\noutputs C",
        "inputs A[i, k], B[k, j]\nC[i, j, n] = A[i, k] * B[k, j]\noutputs C",
        "inputs A[i, k], B[k, j]\nC[] = A[i, k] * B[k, j] * (i <= j)\noutputs C",
        "inputs A[i, k], B[k, j]\nC[i] = A[i, k] * B[k, j] + A[i, k]\noutputs C",
        "ranks i=5, k=5\ninputs A[i, k], B[k, j]\nC[j] = A[i, i] * B[i, j]\noutputs C",
        "ranks k0=2, k1=ceiling(K/2)\ninputs A[i, k], B[k, j]\n"
        "C[i, j] = A[i, k1*K0+k0] * B[k1*K0+k0, j]\noutputs C",
    ],
)
def test_einsum_path_agrees_with_literal_iteration_space(
    rng: np.random.Generator, text: str
) -> None:
    c = parse(text)
    inputs = {"A": rand(rng, 5, 5), "B": rand(rng, 5, 3)}
    sizes = {"n": 2} if "n]" in text else None
    fast = interpret(c, inputs, sizes, contract=True)
    literal = interpret(c, inputs, sizes, contract=False)
    np.testing.assert_allclose(fast["C"], literal["C"], rtol=1e-12)


# --------------------------------------------------------------------------- elementwise ops
# Operands: X mixed sign, P positive (log, sqrt, ...), Y equal to X in half the places
# (so comparisons see ties), Z with zeros (so logic ops see false).
OP_CASES: dict[str, tuple[str, ...]] = {
    **{op: ("X",) for op in ("neg", "exp", "tanh", "erf", "abs", "sin", "cos", "logistic")},
    **{op: ("X",) for op in ("sign",)},
    **{op: ("P",) for op in ("log", "sqrt", "rsqrt")},
    "not": ("Z",),
    **{op: ("X", "Y") for op in ("add", "sub", "mul", "div", "max", "min")},
    **{op: ("X", "Y") for op in ("lt", "le", "gt", "ge", "eq", "ne")},
    "pow": ("P", "X"),
    "mod": ("X", "P"),
    "and": ("Z", "Y"),
    "or": ("Z", "W"),
    "where": ("Z", "X", "Y"),
    **{op: ("X",) for op in ("bfloat16", "float16", "float32", "float64")},
}
NUMPY_OPS = {
    "neg": lambda x: -x,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x),
    "tanh": np.tanh,
    "erf": np.vectorize(math.erf),
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "logistic": lambda x: 1 / (1 + np.exp(-x)),
    "sign": np.sign,
    "not": lambda z: (z == 0) * 1.0,
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "max": np.maximum,
    "min": np.minimum,
    "pow": np.power,
    "mod": lambda a, b: a - np.floor(a / b) * b,
    "lt": lambda a, b: (a < b) * 1.0,
    "le": lambda a, b: (a <= b) * 1.0,
    "gt": lambda a, b: (a > b) * 1.0,
    "ge": lambda a, b: (a >= b) * 1.0,
    "eq": lambda a, b: (a == b) * 1.0,
    "ne": lambda a, b: (a != b) * 1.0,
    "and": lambda a, b: ((a != 0) & (b != 0)) * 1.0,
    "or": lambda a, b: ((a != 0) | (b != 0)) * 1.0,
    "where": lambda c, a, b: np.where(c != 0, a, b),
    # 16-bit casts round to nearest even; float32 and float64 stand for exact values.
    "bfloat16": lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64),
    "float16": lambda x: x.astype(np.float16).astype(np.float64),
    "float32": lambda x: x,
    "float64": lambda x: x,
}


def test_every_operator_has_a_case() -> None:
    assert set(OP_CASES) == set(OPS) == set(NUMPY_OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_elementwise_operator_matches_numpy(rng: np.random.Generator, op: str) -> None:
    n = 16
    x = rand(rng, n, 3)
    operands = {
        "X": x,
        "P": np.abs(rand(rng, n, 3)),
        "Y": np.where(rng.random((n, 3)) < 0.5, x, rand(rng, n, 3)),
        "Z": rng.choice([0.0, 0.0, 1.0, -2.5], (n, 3)),
        "W": rng.choice([0.0, 3.0], (n, 3)),
    }
    names = OP_CASES[op]
    args = tuple(Access(t, (Var("i"), Var("j"))) for t in names)
    c = Cascade(
        tuple(TensorDecl(t, ("i", "j")) for t in dict.fromkeys(names)),
        (Einsum("R", (Var("i"), Var("j")), Op(op, args)),),
        ("R",),
    )
    out = interpret(c, {t: operands[t] for t in dict.fromkeys(names)})
    expect = NUMPY_OPS[op](*(operands[t] for t in names))
    np.testing.assert_allclose(out["R"], expect, rtol=1e-12, atol=1e-15)


def test_ieee_special_values_propagate_without_warnings(rng: np.random.Generator) -> None:
    c = parse(
        "inputs A[i]\nR[i] = abs(A[i]) * inf - inf\nL[i] = log(-abs(A[i]))\n"
        "S[i] = 1 / (A[i] - A[i])\noutputs R, L, S"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = interpret(c, {"A": rand(rng, 4)})
    assert np.isnan(out["R"]).all()
    assert np.isnan(out["L"]).all()
    assert np.isposinf(out["S"]).all()


# --------------------------------------------------------------------------- reductions
@pytest.mark.parametrize(
    ("reduce", "numpy_fn"),
    [("sum", np.sum), ("max", np.max), ("min", np.min), ("prod", np.prod)],
)
@pytest.mark.parametrize("contract", [True, False])
def test_reduction_matches_numpy(
    rng: np.random.Generator, reduce: str, numpy_fn, contract: bool
) -> None:
    c = parse(f"inputs A[m, p], B[p]\nR[p] = {reduce}(m) A[m, p] * B[p]\noutputs R")
    a, b = rand(rng, 7, 4), rand(rng, 4)
    out = interpret(c, {"A": a, "B": b}, contract=contract)
    np.testing.assert_allclose(out["R"], numpy_fn(a * b, axis=0), rtol=1e-12)


def test_reduction_over_two_ranks_to_a_scalar(rng: np.random.Generator) -> None:
    c = parse("inputs A[m, p]\nR[] = max(m, p) A[m, p]\noutputs R")
    a = rand(rng, 5, 3)
    out = interpret(c, {"A": a})
    assert out["R"].shape == ()
    assert out["R"] == a.max()


# --------------------------------------------------------------------------- broadcasts, masks
def test_rank_only_on_the_left_broadcasts(rng: np.random.Generator) -> None:
    c = parse("inputs A[i]\nB[i, j] = A[i] + j\noutputs B")
    a = rand(rng, 4)
    out = interpret(c, {"A": a}, sizes={"j": 3})
    np.testing.assert_allclose(out["B"], a[:, None] + np.arange(3)[None, :])


def test_causal_mask_uses_rank_values(rng: np.random.Generator) -> None:
    c = parse("inputs QK[m, p]\nMQK[m, p] = where(m <= p, QK[m, p], -inf)\noutputs MQK")
    qk = rand(rng, 5, 6)
    out = interpret(c, {"QK": qk})
    causal = np.arange(5)[:, None] <= np.arange(6)[None, :]
    np.testing.assert_array_equal(out["MQK"], np.where(causal, qk, -np.inf))


def test_size_refs_evaluate_to_the_bound_size(rng: np.random.Generator) -> None:
    c = parse("inputs A[m]\nB[m] = A[m] / M + (m == M - 1)\noutputs B")
    a = rand(rng, 5)
    out = interpret(c, {"A": a})
    np.testing.assert_allclose(out["B"], a / 5 + (np.arange(5) == 4))


# --------------------------------------------------------------------------- affine indices
def test_shifted_reads_outside_the_tensor_read_zero(rng: np.random.Generator) -> None:
    c = parse("inputs A[i]\nB[i] = A[i+1] + 10 * A[i-1]\noutputs B")
    a = rand(rng, 5)
    expect = np.append(a[1:], 0.0) + 10 * np.insert(a[:-1], 0, 0.0)
    np.testing.assert_allclose(interpret(c, {"A": a})["B"], expect)


@pytest.mark.parametrize("m", [12, 10])  # M0 = 4 divides 12, not 10 (padded reads are 0)
def test_partitioned_read_tiles_and_pads_with_zero(rng: np.random.Generator, m: int) -> None:
    c = parse(
        "ranks m0=4, m1=ceiling(M/4)\npartition m -> m1, m0 by 4\ninputs K[e, m]\n"
        "BK[e, m1, m0] = K[e, m1*M0+m0]\noutputs BK"
    )
    k = rand(rng, 3, m)
    out = interpret(c, {"K": k})
    tiles = -(-m // 4)
    expect = np.pad(k, ((0, 0), (0, 4 * tiles - m))).reshape(3, tiles, 4)
    np.testing.assert_array_equal(out["BK"], expect)


# --------------------------------------------------------------------------- recurrences
def test_running_max_recurrence_matches_maximum_accumulate(rng: np.random.Generator) -> None:
    c = parse(
        "inputs A[m, p]\nRM[0, p] = -inf\nRM[m+1, p] = max(RM[m, p], A[m, p])\n"
        "G[p] = RM[M, p]\noutputs RM, G"
    )
    a = rand(rng, 6, 3)
    out = interpret(c, {"A": a})
    assert out["RM"].shape == (7, 3)
    assert np.isneginf(out["RM"][0]).all()
    np.testing.assert_array_equal(out["RM"][1:], np.maximum.accumulate(a, axis=0))
    np.testing.assert_array_equal(out["G"], a.max(axis=0))


def test_running_sum_recurrence_along_an_inner_dim_matches_cumsum(
    rng: np.random.Generator,
) -> None:
    c = parse("inputs A[p, m], B[p]\nRS[p, 0] = B[p]\nRS[p, m+1] = RS[p, m] + A[p, m]\noutputs RS")
    a, b = rand(rng, 3, 6), rand(rng, 3)
    out = interpret(c, {"A": a, "B": b})
    np.testing.assert_allclose(out["RS"], np.cumsum(np.c_[b, a], axis=1), rtol=1e-12)


# --------------------------------------------------------------------------- attention
def test_fusemax_3pass_attention_matches_softmax_attention(rng: np.random.Generator) -> None:
    q, k, v = rand(rng, 8, 5), rand(rng, 8, 9), rand(rng, 3, 9)
    out = interpret(parse(ATTENTION_3PASS), {"Q": q, "K": k, "V": v})
    np.testing.assert_allclose(out["AV"], softmax_attention(q, k, v), rtol=1e-12)


@pytest.mark.parametrize("m", [12, 9])  # a whole number of tiles, and a padded last tile
def test_fusemax_1pass_attention_matches_softmax_attention(
    rng: np.random.Generator, m: int
) -> None:
    q, k, v = rand(rng, 8, 5), rand(rng, 8, m), rand(rng, 3, m)
    out = interpret(parse(ATTENTION_1PASS), {"Q": q, "K": k, "V": v})
    np.testing.assert_allclose(out["AV"], softmax_attention(q, k, v), rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    e=st.integers(1, 5),
    m=st.integers(1, 11),
    p=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_forms_agree_on_any_shape(e: int, m: int, p: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    inputs = {"Q": rand(rng, e, p), "K": rand(rng, e, m), "V": rand(rng, 2, m)}
    three = interpret(parse(ATTENTION_3PASS), inputs, contract=False)["AV"]
    one = interpret(parse(ATTENTION_1PASS), inputs)["AV"]
    np.testing.assert_allclose(one, three, rtol=1e-11)


# --------------------------------------------------------------------------- sizes
def test_sizes_from_inputs_and_explicit_sizes_agree(rng: np.random.Generator) -> None:
    c = parse("ranks m0=4, m1=ceiling(M/4)\ninputs K[e, m]\nS[e, m1] = K[e, m1*M0+m0]\noutputs S")
    k = rand(rng, 3, 10)
    inferred = infer_sizes(c, {"K": (3, 10)})
    assert inferred == {"e": 3, "m": 10, "m0": 4, "m1": 3}
    assert infer_sizes(c, {"K": (3, 10)}, {"M": 10, "e": 3}) == inferred
    assert infer_sizes(c, {"K": (3, 10)}, {"m": 10}) == inferred
    np.testing.assert_array_equal(
        interpret(c, {"K": k})["S"], interpret(c, {"K": k}, {"M": 10})["S"]
    )


def test_integer_and_bool_inputs_become_float64() -> None:
    c = parse("inputs A[i], B[i]\nC[i] = A[i] / 2 + B[i]\noutputs C")
    out = interpret(c, {"A": np.array([1, 3], dtype=np.int32), "B": np.array([True, False])})
    assert out["C"].dtype == np.float64
    np.testing.assert_array_equal(out["C"], [1.5, 1.5])


# --------------------------------------------------------------------------- errors
ERROR_CASES = {
    "missing": ({"Q": (2, 3)}, None, "missing input.*K"),
    "extra": ({"Q": (2, 3), "K": (2, 4), "Z": (1,)}, None, "unexpected input.*Z"),
    "ndim": ({"Q": (2, 3, 1), "K": (2, 4)}, None, "input Q has 3 dim"),
    "inputs disagree": ({"Q": (2, 3), "K": (5, 4)}, None, r"input K .* rank e = 5.*input Q .* = 2"),
    "declared size": ({"Q": (2, 3), "K": (2, 4)}, None, "rank m size 4.*= 6"),
    "explicit size": ({"Q": (2, 3), "K": (2, 6)}, {"P": 4}, r"input Q .* size P = 3.*P = 4"),
    "unknown key": ({"Q": (2, 3), "K": (2, 6)}, {"zz": 4}, "zz.*neither a rank"),
    "unbound": ({"Q": (2, 3), "K": (2, 6)}, None, "size of rank f .* unknown"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_inputs_raise_an_error_naming_tensor_rank_and_sizes(case: str) -> None:
    c = parse("ranks m=6\ninputs Q[e, p], K[e, m]\nQK[m, p, f] = Q[e, p] * K[e, m]\noutputs QK")
    shapes, sizes, message = ERROR_CASES[case]
    if case != "unbound":
        sizes = {"f": 1, **(sizes or {})}
    inputs = {name: np.ones(shape) for name, shape in shapes.items()}
    with pytest.raises(EinfuseError, match=message):
        interpret(c, inputs, sizes)


def test_invalid_cascade_is_rejected_by_the_verifier() -> None:
    c = Cascade(
        (TensorDecl("A", ("i",)),),
        (Einsum("B", (Var("i"),), Access("Z", (Var("i"),))),),
        ("B",),
    )
    with pytest.raises(VerifyError, match="undefined tensor Z"):
        interpret(c, {"A": np.ones(3)})


def test_oversized_iteration_space_is_refused() -> None:
    c = parse("inputs A[i], B[j]\nC[i, j] = max(A[i], B[j])\noutputs C")
    with pytest.raises(EinfuseError, match="iteration space i=100 x j=100"):
        interpret(c, {"A": np.ones(100), "B": np.ones(100)}, max_elements=1000)
