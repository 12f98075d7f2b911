"""The FuseMax ``fuse`` pass: multi-pass softmax chains become one pass, results do not change."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.backends.jax_backend import emit_jax
from einfuse.backends.reference import interpret
from einfuse.einsum_cascade import attention
from einfuse.ir import Cascade, parse, verify
from einfuse.passes.fuse import FuseError, fuse_with_report, fused_groups
from einfuse.passes.manager import run_passes
from einfuse.passes.pass_count import pass_counts
from tests.cascades import ATTENTION_3PASS
from tests.strategies import drawn_cascades, random_inputs

FUSED_3PASS = """\
ranks m0=4, m1=ceiling(M/4)
partition m -> m1, m0 by 4
inputs Q[e, p], K[e, m], V[f, m]
QK[m1, m0, p] = Q[e, p] * K[e, m1*M0+m0]
LM[m1, p] = max(m0) where(m1 * M0 + m0 < M, QK[m1, m0, p], -inf)
RM[0, p] = -inf
RM[m1+1, p] = max(RM[m1, p], LM[m1, p])
SM[m1, p] = where(RM[m1+1, p] > -inf, RM[m1+1, p], 0.0)
PRM[m1, p] = where(and(m1 > 0, RM[m1, p] > -inf), exp(RM[m1, p] - SM[m1, p]), 1.0)
SN[m1, m0, p] = exp(QK[m1, m0, p] - SM[m1, p])
LD[m1, p] = where(m1 * M0 + m0 < M, SN[m1, m0, p], 0.0)
RD[0, p] = 0.0
RD[m1+1, p] = LD[m1, p] + RD[m1, p] * PRM[m1, p]
SD[p] = RD[M1, p]
LNV[m1, f, p] = where(m1 * M0 + m0 < M, SN[m1, m0, p], 0.0) * V[f, m1*M0+m0]
RNV[0, f, p] = 0.0
RNV[m1+1, f, p] = LNV[m1, f, p] + RNV[m1, f, p] * PRM[m1, p]
SNV[f, p] = RNV[M1, f, p]
AV[f, p] = SNV[f, p] / SD[p]
outputs AV
"""

# Softmax as the lifter writes it from jax.nn.softmax: other rank names, the max clamped
# with max(-inf, x), and the sum broadcast back before the division.
LIFTED_SOFTMAX = """
inputs X0[a, b], X1[c, b], X2[c, f]
DOT0[a, c] = X0[a, b] * X1[c, b]
WHERE0[a, c] = where(a >= c, DOT0[a, c], -inf)
MAX0[a] = max(c) WHERE0[a, c]
MAX1[a] = max(-inf, MAX0[a])
EXP0[a, c] = exp(WHERE0[a, c] - MAX1[a])
SUM0[a] = EXP0[a, c]
BSUM0[a, c] = SUM0[a]
DIV0[a, c] = EXP0[a, c] / BSUM0[a, c]
DOT1[a, f] = DIV0[a, c] * X2[c, f]
outputs DOT1
"""


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Non-zero values of both signs, away from 0."""
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


def assert_same_results(
    before: Cascade, after: Cascade, inputs: dict, sizes: dict | None = None
) -> None:
    want = interpret(before, inputs, sizes)
    got = interpret(after, inputs, sizes)
    for name in before.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- text in, text out
def test_fused_3pass_attention_prints_the_fusemax_1pass_form() -> None:
    fused, _ = fuse_with_report(parse(ATTENTION_3PASS), tile=4)
    assert str(fused) == FUSED_3PASS
    assert parse(str(fused)) == fused


def test_fused_3pass_attention_carries_max_correction_and_divides_after_the_contraction() -> None:
    text = str(fuse_with_report(parse(ATTENTION_3PASS), tile=4)[0])
    assert "RM[m1+1, p] = max(RM[m1, p], LM[m1, p])" in text
    assert "RNV[m1+1, f, p] = LNV[m1, f, p] + RNV[m1, f, p] * PRM[m1, p]" in text
    assert text.index("SNV[f, p] = RNV[M1, f, p]") < text.index("AV[f, p] = SNV[f, p] / SD[p]")
    assert "GM" not in text and "A[" not in text


def test_fused_3pass_attention_takes_one_pass() -> None:
    c = parse(ATTENTION_3PASS)
    fused, report = fuse_with_report(c, tile=4)
    assert pass_counts(c)["m"] == 3
    assert pass_counts(fused)["m1"] == pass_counts(fused)["m"] == 1
    assert [(r.rank, r.fused, r.passes_before, r.passes_after) for r in report.ranks] == [
        ("m", True, 3, 1)
    ]
    assert "running max RM" in report.explain()


@pytest.mark.parametrize(("m", "tile"), [(8, 4), (9, 4), (3, 4), (5, 1), (7, 512)])
def test_fused_3pass_attention_matches_on_any_tile(m: int, tile: int) -> None:
    rng = np.random.default_rng(m * 100 + tile)
    c = parse(ATTENTION_3PASS)
    fused = verify(fuse_with_report(c, tile=tile)[0])
    assert_same_results(
        c, fused, {"Q": rand(rng, 3, 5), "K": rand(rng, 3, m), "V": rand(rng, 2, m)}
    )


def test_print_after_all_shows_every_rewrite_fuse_makes_and_each_keeps_results() -> None:
    """fuse is four rewrites (fold-scale changes rounding): each is named and each is exact."""
    rng = np.random.default_rng(7)
    c = parse(ATTENTION_3PASS).with_sizes(e=3, f=2, m=9, p=5)
    result = run_passes(c, "fuse{tile=4}")
    names = [name for name, _ in result.steps[1]]
    assert names == [
        "sink-casts, fold-scale{rank=m}",
        "partition m -> m1, m0 by 4",
        "defer-division over m1",
        "running maxima over m1",
    ]
    text = result.print_after_all()
    assert text.index("after fuse{tile=4}: defer-division") < text.index("after fuse{tile=4}\n")
    ins = {"Q": rand(rng, 3, 5), "K": rand(rng, 3, 9), "V": rand(rng, 2, 9)}
    for _, step in result.steps[1]:
        assert_same_results(c, verify(step), ins)
    assert run_passes(attention("1pass", tile=3), "fuse").steps[1] == ()  # nothing to fuse


def test_pipeline_fuses_an_already_partitioned_rank() -> None:
    c = parse(ATTENTION_3PASS)
    result = run_passes(c, "partition{rank=m,tile=4},fuse")
    assert str(result.cascade) == FUSED_3PASS


# --------------------------------------------------------------------------- the library
FORMS = ["3pass", "deferred", "2pass"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_groups", [None, 2])
def test_library_attention_fuses_to_one_pass_with_equal_results(
    form: str, causal: bool, kv_groups: int | None
) -> None:
    tile = 3 if form == "2pass" else None
    c = attention(form, causal=causal, kv_groups=kv_groups, tile=tile)
    fused, report = fuse_with_report(c, tile=3)
    verify(fused)
    assert report.fused and pass_counts(fused)["m"] == 1
    assert pass_counts(c)["m"] == {"3pass": 3, "deferred": 2, "2pass": 2}[form]
    for m in (6, 7):  # the tile of 3 divides 6, not 7
        sizes = {"b": 2, "h": 2, "e": 3, "f": 2, "p": 5, "m": m}
        if kv_groups:
            sizes["g"] = kv_groups
        inputs = random_inputs(c, seed=m, bind=sizes)
        assert_same_results(c, fused, inputs, sizes)


def test_library_1pass_attention_is_left_alone() -> None:
    c = attention("1pass", causal=True, tile=4)
    fused, report = fuse_with_report(c)
    assert fused == c
    assert report.ranks == () and "no rank takes more than one pass" in report.explain()


def test_explicit_rank_already_in_one_pass_is_reported_unchanged() -> None:
    c = attention("1pass", tile=4)
    fused, report = fuse_with_report(c, rank="m")
    assert fused == c and report.ranks[0].reason == "already one pass"


def test_fused_groups_name_the_loop_its_state_and_its_results() -> None:
    assert fused_groups(parse(ATTENTION_3PASS)) == []
    (group,) = fused_groups(fuse_with_report(parse(ATTENTION_3PASS), tile=4)[0])
    assert (group.rank, group.inner) == ("m1", "m0")
    assert group.einsums == ("QK", "LM", "RM", "SM", "PRM", "SN", "LD", "RD", "LNV", "RNV")
    assert group.carried == ("RM", "RD", "RNV")
    assert group.reads == ("Q", "K", "V")
    assert group.results == ("RD", "RNV")


# --------------------------------------------------------------------------- spellings and masks
def test_lifted_jax_softmax_fuses_through_clamp_and_broadcast() -> None:
    c = parse(LIFTED_SOFTMAX)
    fused, report = fuse_with_report(c, tile=3)
    assert report.fused and pass_counts(fused)["c"] == 1
    text = str(fused)
    assert "RM[c1+1, a] = max(RM[c1, a], LM[c1, a])" in text
    assert "EXP0[a, c1, c0] = exp(WHERE0[a, c1, c0] - max(-inf, SM[c1, a]))" in text
    assert "DOT1[a, f] = SEXP0X2[a, f] / SUM0[a]" in text
    rng = np.random.default_rng(5)
    inputs = {"X0": rand(rng, 7, 3), "X1": rand(rng, 7, 3), "X2": rand(rng, 7, 2)}
    assert_same_results(c, fused, inputs)


def test_additive_mask_hiding_the_first_tile_gives_no_nan() -> None:
    c = parse(
        ATTENTION_3PASS.replace(
            "inputs Q[e, p], K[e, m], V[f, m]", "inputs Q[e, p], K[e, m], V[f, m], B[m, p]"
        )
        .replace(
            "GM[p]    = max(m) QK[m, p]", "MQK[m, p] = QK[m, p] + B[m, p]\nGM[p] = max(m) MQK[m, p]"
        )
        .replace("exp(QK[m, p] - GM[p])", "exp(MQK[m, p] - GM[p])")
    )
    fused = fuse_with_report(c, tile=3)[0]
    rng = np.random.default_rng(7)
    bias = np.zeros((8, 4))
    bias[:3, 0] = bias[:5, 1] = bias[:, 2] = -1e9  # whole first tiles, or all keys, masked
    inputs = {"Q": rand(rng, 3, 4), "K": rand(rng, 3, 8), "V": rand(rng, 2, 8), "B": bias}
    assert np.isfinite(interpret(fused, inputs)["AV"]).all()
    assert_same_results(c, fused, inputs)


# --------------------------------------------------------------------------- what cannot fuse
NOT_FUSABLE = {
    "log-softmax output": (
        """inputs X[m, p]
GM[p] = max(m) X[m, p]
SN[m, p] = exp(X[m, p] - GM[p])
SD[p] = SN[m, p]
LSM[m, p] = X[m, p] - GM[p] - log(SD[p])
outputs LSM""",
        "output LSM has rank m",
    ),
    "max read as a value": (
        """inputs X[m, p], V[f, m]
GM[p] = max(m) X[m, p]
Y[f, p] = tanh(X[m, p] - GM[p]) * V[f, m]
outputs Y""",
        "GM flows through tanh",
    ),
    "log-softmax contracted": (
        """inputs X[m, p], V[f, m]
GM[p] = max(m) X[m, p]
SN[m, p] = exp(X[m, p] - GM[p])
SD[p] = SN[m, p]
Y[f, p] = (X[m, p] - GM[p] - log(SD[p])) * V[f, m]
outputs Y""",
        "Y reads SD inside the loop over m1",
    ),
    "no max to carry": (
        """inputs X[m, p]
MU[p] = X[m, p] / M
VAR[p] = (X[m, p] - MU[p]) * (X[m, p] - MU[p])
outputs VAR""",
        "VAR needs MU complete",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_FUSABLE))
def test_unfusable_chain_is_left_unchanged_with_a_reason(case: str) -> None:
    text, reason = NOT_FUSABLE[case]
    c = parse(text)
    fused, report = fuse_with_report(c, tile=2)
    assert fused == c
    (outcome,) = report.ranks
    assert not outcome.fused and outcome.passes_after == outcome.passes_before > 1
    assert reason in outcome.reason


def test_unknown_rank_and_bad_tile_are_errors() -> None:
    with pytest.raises(FuseError, match="no rank 'z'"):
        fuse_with_report(parse(ATTENTION_3PASS), rank="z")
    with pytest.raises(FuseError, match="tile must be a positive integer"):
        fuse_with_report(parse(ATTENTION_3PASS), tile=0)


# --------------------------------------------------------------------------- random cascades
@settings(max_examples=40, deadline=None)
@given(
    drawn=drawn_cascades(7, kinds=("softmax", "contraction", "map", "reduction", "tiling")),
    tile=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuse_keeps_results_and_either_fuses_or_explains(drawn, tile: int, seed: int) -> None:
    c = drawn.cascade
    fused, report = fuse_with_report(c, tile=tile)
    verify(fused)
    for outcome in report.ranks:
        assert outcome.reason
        assert outcome.passes_after == (1 if outcome.fused else outcome.passes_before)
    if not report.fused:
        assert fused == c
        return
    inputs = random_inputs(c, seed, positive=drawn.positive_inputs)
    want, got = interpret(c, inputs), interpret(fused, inputs)
    for name in c.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12)


def test_key_side_projection_runs_once_before_the_loop_not_per_query_block() -> None:
    c = parse(
        "inputs Q[e, p], X[d, m], W[d, e], V[f, m]\n"
        "KP[e, m] = X[d, m] * W[d, e]\n"
        "QK[m, p] = Q[e, p] * KP[e, m]\n"
        "GM[p] = max(m) QK[m, p]\n"
        "SN[m, p] = exp(QK[m, p] - GM[p])\n"
        "SD[p] = SN[m, p]\n"
        "AV[f, p] = SN[m, p] * V[f, m] / SD[p]\n"
        "outputs AV"
    )
    fused = run_passes(c, "fuse{tile=4}").cascade
    assert "KP[e, m] = X[d, m] * W[d, e]" in str(fused)  # whole, not split into tiles
    (group,) = fused_groups(fused)
    assert "KP" not in group.einsums and "KP" in group.reads
    rng = np.random.default_rng(0)
    sizes = {"d": 3, "e": 4, "f": 5, "m": 12, "p": 6}
    ins = {t.name: rng.standard_normal([sizes[r] for r in t.ranks]) for t in c.inputs}
    np.testing.assert_allclose(
        interpret(fused, ins)["AV"], interpret(c, ins)["AV"], rtol=1e-12, atol=1e-12
    )
    got = emit_jax(fused).as_dict(**ins)["AV"]
    np.testing.assert_allclose(np.asarray(got), interpret(c, ins)["AV"], rtol=1e-4, atol=1e-5)
