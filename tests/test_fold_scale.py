"""``fold-scale``: a constant scale of a contraction moves onto its smaller operand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.backends.reference import interpret
from einfuse.einsum_cascade import attention
from einfuse.ir import parse
from einfuse.passes.fold_scale import fold_scale
from einfuse.passes.manager import run_passes
from tests.strategies import cascade_with_inputs, random_inputs

SCALED_SCORES = """\
ranks e=8, m=12, p=5
inputs Q[e, p], K[e, m]
QK[m, p] = Q[e, p] * K[e, m]
S[p, m] = QK[m, p] / sqrt(8.0)
outputs S
"""


def assert_same(before, after, seed: int = 0, tol: float = 1e-12) -> None:
    inputs = random_inputs(before, seed)
    want, got = interpret(before, inputs), interpret(after, inputs)
    for name in before.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)


def test_the_scale_moves_onto_the_smaller_operand_and_the_product_takes_its_place():
    folded = fold_scale(parse(SCALED_SCORES))
    assert str(folded).endswith(
        "Qs[e, p] = Q[e, p] / sqrt(8.0)\nS[p, m] = Qs[e, p] * K[e, m]\noutputs S\n"
    )
    assert_same(parse(SCALED_SCORES), folded)


@pytest.mark.parametrize(
    "text",
    [
        SCALED_SCORES.replace("outputs S", "outputs S, QK"),  # the product is an output
        SCALED_SCORES.replace("/ sqrt(8.0)", "/ Q[e, p]").replace("S[p, m]", "S[p, m, e]"),
        SCALED_SCORES.replace("QK[m, p] / sqrt(8.0)", "sqrt(8.0) / QK[m, p]"),  # not a scale
        SCALED_SCORES.replace("QK[m, p] = Q[e, p] * K[e, m]", "QK[m, p] = exp(Q[e, p] * K[e, m])"),
        SCALED_SCORES.replace("outputs S", "T[m] = max(p) QK[m, p]\noutputs S, T"),  # read twice
        # an elementwise product, not a contraction: folding would save nothing
        "ranks m=3, p=2\ninputs X[m, p], Y[m, p]\nZ[m, p] = X[m, p] * Y[m, p] * 0.5\noutputs Z",
    ],
)
def test_leaves_everything_else_alone(text: str) -> None:
    c = parse(text)
    assert fold_scale(c) == c


@settings(max_examples=40, deadline=None)
@given(
    st.permutations(["a", "b"]),
    st.permutations(["a", "b"]),
    st.sampled_from(["{x} / 3.0", "{x} * 0.125", "sqrt(2.0) * {x}", "{x} / A"]),
    st.booleans(),
    st.integers(2, 5),
    st.integers(0, 2**16),
)
def test_folding_keeps_the_values_for_any_rank_order_and_scale(
    product_order, read_order, scale, inside, n, seed
):
    p, r = ", ".join(product_order), ", ".join(read_order)
    factors = "X[a, k] * Y[k, b]"
    if inside:  # the scale inside the contraction: P = X * Y * s
        body = f"P[{p}] = {scale.format(x=factors)}\nS[{r}] = P[{p}] + 1.0"
    else:  # a map scales the contraction's result: S = P * s
        body = f"P[{p}] = {factors}\nS[{r}] = {scale.format(x=f'P[{p}]')}"
    c = parse(f"ranks a={n}, b={n + 1}, k=3\ninputs X[a, k], Y[k, b]\n{body}\noutputs S")
    folded = fold_scale(c)
    assert "Xs[a, k] = X[a, k]" in str(folded) and "Xs[a, k] * Y[k, b]" in str(folded)
    assert_same(c, folded, seed)


@settings(max_examples=40, deadline=None)
@given(cascade_with_inputs(max_einsums=6))
def test_folding_never_changes_a_random_cascade(case):
    c, inputs = case
    folded = fold_scale(c)
    want, got = interpret(c, inputs), interpret(folded, inputs)
    for name in c.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-9)


def test_fuse_folds_the_score_scale_of_a_lifted_attention():
    c = attention("3pass", scale=0.125, b=2, h=2, e=8, f=8, p=5, m=9)
    fused = run_passes(c, "fuse{tile=4}").cascade
    assert "Qs[b, h, e, p] = " in str(fused)
    assert_same(c, fused, tol=1e-9)


def test_registered_as_a_pass_with_a_rank_filter():
    c = parse(SCALED_SCORES)
    assert run_passes(c, "fold-scale{rank=m}").cascade == fold_scale(c)
    assert run_passes(c, "fold-scale{rank=x}").cascade == c
