"""``defer-division``: factors free of a sum's reduced ranks move out of the sum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.backends.reference import interpret
from einfuse.ir import parse, verify
from einfuse.passes.defer import defer_division
from einfuse.passes.manager import run_passes
from einfuse.passes.partition import partition
from einfuse.passes.pass_count import pass_counts
from tests.cascades import ATTENTION_3PASS
from tests.strategies import drawn_cascades, random_inputs

DEFERRED = """\
inputs Q[e, p], K[e, m], V[f, m]
QK[m, p] = Q[e, p] * K[e, m]
GM[p] = max(m) QK[m, p]
SN[m, p] = exp(QK[m, p] - GM[p])
SD[p] = SN[m, p]
SNV[f, p] = SN[m, p] * V[f, m]
AV[f, p] = SNV[f, p] / SD[p]
outputs AV
"""


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


def attention_inputs(seed: int, m: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"Q": rand(rng, 3, 4), "K": rand(rng, 3, m), "V": rand(rng, 2, m)}


def assert_same_results(before, after, inputs) -> None:
    want, got = interpret(before, inputs), interpret(after, inputs)
    for name in before.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)


def test_3pass_attention_becomes_fusemax_deferred_form() -> None:
    c = parse(ATTENTION_3PASS)
    deferred = defer_division(c)
    assert str(deferred) == DEFERRED
    assert pass_counts(c)["m"] == 3 and pass_counts(deferred)["m"] == 2
    assert_same_results(c, deferred, attention_inputs(0))


def test_defers_through_the_padding_mask_of_a_partition() -> None:
    c = partition(parse(ATTENTION_3PASS), "m", 3)
    deferred = verify(defer_division(c, rank="m"))
    assert (
        "SNV[f, p] = where(m1 * M0 + m0 < M, SN[m1, m0, p], 0.0) * V[f, m1*M0+m0]\n"
        "AV[f, p] = SNV[f, p] / SD[p]\n" in str(deferred)
    )
    assert_same_results(c, deferred, attention_inputs(1, m=7))


def test_inlines_a_broadcast_denominator_and_drops_it() -> None:
    c = parse(
        ATTENTION_3PASS.replace(
            "A[m, p]  = SN[m, p] / SD[p]", "B[m, p] = SD[p]\nA[m, p] = SN[m, p] / B[m, p]"
        )
    )
    deferred = defer_division(c)
    assert "AV[f, p] = SNV[f, p] / SD[p]" in str(deferred)
    assert deferred.writer("B") is None and deferred.writer("A") is None
    assert_same_results(c, deferred, attention_inputs(2))


def test_keeps_a_producer_that_is_read_elsewhere() -> None:
    c = parse(ATTENTION_3PASS.replace("outputs AV", "outputs AV, A"))
    deferred = defer_division(c)
    assert deferred.writer("A") is not None and "AV[f, p] = SNV[f, p] / SD[p]" in str(deferred)


def test_hoists_a_free_product_factor_too() -> None:
    c = parse("inputs X[i, k], W[k], R[i]\nY[i] = X[i, k] * R[i] * W[k]\noutputs Y")
    deferred = defer_division(c)
    assert str(deferred).endswith("SXW[i] = X[i, k] * W[k]\nY[i] = SXW[i] * R[i]\noutputs Y\n")
    rng = np.random.default_rng(3)
    assert_same_results(c, deferred, {"X": rand(rng, 3, 4), "W": rand(rng, 4), "R": rand(rng, 3)})


@pytest.mark.parametrize(
    "text",
    [
        "inputs X[m, p], S[p]\nY[p] = max(m) X[m, p] / S[p]\noutputs Y",  # max: never
        "inputs X[m, p]\nY[p] = X[m, p] * 2 / M\noutputs Y",  # constants alone: no gain
        "inputs X[m, p], S[p]\nY[p] = exp(X[m, p] / S[p])\noutputs Y",  # not a factor
        "inputs X[m, p], S[m, p]\nY[p] = X[m, p] / S[m, p]\noutputs Y",  # varies with m
    ],
)
def test_leaves_sums_without_a_hoistable_factor_alone(text: str) -> None:
    c = parse(text)
    assert defer_division(c) == c


def test_rank_option_limits_the_sums_it_touches() -> None:
    c = parse(
        "inputs X[i, k], R[i], Z[j, n], T[j]\n"
        "Y[i] = X[i, k] * R[i]\nU[j] = Z[j, n] / T[j]\noutputs Y, U"
    )
    text = str(defer_division(c, rank="n"))
    assert "Y[i] = X[i, k] * R[i]" in text and "U[j] = SZ[j] / T[j]" in text


def test_new_sum_names_do_not_clash() -> None:
    c = parse(ATTENTION_3PASS.replace("inputs Q[e, p]", "inputs SNV[e], Q[e, p]"))
    assert "AV[f, p] = SNV_1[f, p] / SD[p]" in str(defer_division(c))


def test_registered_as_a_pass() -> None:
    result = run_passes(parse(ATTENTION_3PASS), "defer-division{rank=m}")
    assert str(result.cascade) == DEFERRED


@settings(max_examples=30, deadline=None)
@given(
    drawn=drawn_cascades(7, kinds=("softmax", "contraction", "map", "reduction")),
    seed=st.integers(0, 2**32 - 1),
)
def test_deferral_never_changes_results(drawn, seed: int) -> None:
    c = drawn.cascade
    deferred = verify(defer_division(c))
    inputs = random_inputs(c, seed, positive=drawn.positive_inputs)
    want, got = interpret(c, inputs), interpret(deferred, inputs)
    for name in c.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12)
