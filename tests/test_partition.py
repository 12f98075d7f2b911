"""Rank partitioning never changes results, whether or not the tile divides the rank."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.backends.reference import interpret
from einfuse.ir import parse, verify
from einfuse.passes.partition import PartitionError, partition
from tests.cascades import ATTENTION_3PASS as ATTENTION


def _inputs(rng, e, m, p, f):
    return {
        "Q": rng.normal(size=(e, p)),
        "K": rng.normal(size=(e, m)),
        "V": rng.normal(size=(f, m)),
    }


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 11), tile=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_partitioned_attention_matches_unpartitioned(m, tile, seed):
    c = parse(ATTENTION)
    inputs = _inputs(np.random.default_rng(seed), 3, m, 4, 2)
    want = interpret(c, inputs)["AV"]
    got = interpret(verify(partition(c, "m", tile)), inputs)["AV"]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduce", ["max", "min", "sum", "prod"])
def test_padding_takes_each_reductions_identity(reduce):
    c = parse(f"inputs X[k, i]\nY[i] = {reduce}(k) exp(X[k, i])\noutputs Y")
    x = np.random.default_rng(0).normal(size=(7, 3))
    split = partition(c, "k", 3)
    assert "where(k1 * K0 + k0 < K" in str(split)
    np.testing.assert_allclose(interpret(split, {"X": x})["Y"], interpret(c, {"X": x})["Y"])


def test_dividing_tile_needs_no_mask():
    c = parse("ranks k=8\ninputs X[k, i]\nY[i] = max(k) X[k, i]\noutputs Y")
    assert "where" not in str(partition(c, "k", 4))


def test_contraction_masks_the_factor_not_the_product():
    split = partition(parse(ATTENTION), "m", 3)
    assert "AV[f, p] = where(m1 * M0 + m0 < M, A[m1, m0, p], 0.0) * V[f, m1*M0+m0]" in str(split)


def test_text_of_a_partitioned_matmul():
    c = parse("inputs A[i, k], B[k, j]\nC[i, j] = A[i, k] * B[k, j]\noutputs C")
    assert str(partition(c, "k", 4)) == (
        "ranks k0=4, k1=ceiling(K/4)\n"
        "partition k -> k1, k0 by 4\n"
        "inputs A[i, k], B[k, j]\n"
        "C[i, j] = A[i, k1*K0+k0] * B[k1*K0+k0, j]\n"
        "outputs C\n"
    )


def test_output_rank_cannot_be_split():
    with pytest.raises(PartitionError, match="output AV has rank p"):
        partition(parse(ATTENTION), "p", 4)


def test_unknown_rank_and_taken_names_are_errors():
    c = parse(ATTENTION)
    with pytest.raises(PartitionError, match="no rank 'z'"):
        partition(c, "z", 4)
    with pytest.raises(PartitionError, match="'e' is already used"):
        partition(c, "m", 4, outer="e")
    with pytest.raises(PartitionError, match="positive integer"):
        partition(c, "m", 0)


def test_output_computed_from_inputs_alone_stays_whole():
    text = "inputs X[k, i], W[k]\nMW[k] = W[k] * 2.0\nY[i] = max(k) X[k, i] + MW[k]\noutputs Y, MW"
    c = parse(text)
    split = verify(partition(c, "k", 3))
    assert "MW[k] = W[k] * 2.0" in str(split)
    assert "MW[k1*K0+k0]" in str(split)
    rng = np.random.default_rng(3)
    ins = {"X": rng.normal(size=(7, 2)), "W": rng.normal(size=(7,))}
    want, got = interpret(c, ins), interpret(split, ins)
    for name in ("Y", "MW"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12)
