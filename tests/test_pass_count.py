"""Pass-count analysis reproduces FuseMax's classification of attention cascades."""

from einfuse.ir import parse
from einfuse.passes.pass_count import analyze_rank, explain_passes, pass_counts
from tests.cascades import ATTENTION_3PASS as THREE_PASS

DEFERRED = """
inputs Q[e, p], K[e, m], V[f, m]
QK[m, p] = Q[e, p] * K[e, m]
GM[p]    = max(m) QK[m, p]
SN[m, p] = exp(QK[m, p] - GM[p])
SD[p]    = SN[m, p]
SNV[f, p] = SN[m, p] * V[f, m]
AV[f, p] = SNV[f, p] / SD[p]
outputs AV
"""

TWO_PASS = """
ranks m0=4, m1=ceiling(M/4)
partition m -> m1, m0 by 4
inputs Q[e, p], K[e, m], V[f, m]
BQK[m1, m0, p] = Q[e, p] * K[e, m1*M0+m0]
LM[m1, p] = max(m0) BQK[m1, m0, p]
SLN[m1, m0, p] = exp(BQK[m1, m0, p] - LM[m1, p])
SLD[m1, p] = SLN[m1, m0, p]
GM[p] = max(m1) LM[m1, p]
SD[p] = SLD[m1, p] * exp(LM[m1, p] - GM[p])
A[m1, m0, p] = exp(BQK[m1, m0, p] - GM[p]) / SD[p]
AV[f, p] = A[m1, m0, p] * V[f, m1*M0+m0]
outputs AV
"""

ONE_PASS = """
ranks m0=4, m1=ceiling(M/4)
partition m -> m1, m0 by 4
inputs Q[e, p], K[e, m], V[f, m]
BQK[m1, m0, p] = Q[e, p] * K[e, m1*M0+m0]
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


def test_three_pass_attention_needs_three_passes_over_m():
    assert pass_counts(parse(THREE_PASS))["m"] == 3


def test_deferred_division_saves_the_third_pass():
    assert pass_counts(parse(DEFERRED))["m"] == 2


def test_two_pass_attention_needs_two_passes_over_m():
    assert pass_counts(parse(TWO_PASS))["m"] == 2


def test_one_pass_attention_needs_one_pass_over_m():
    counts = pass_counts(parse(ONE_PASS))
    assert counts["m1"] == 1
    assert counts["m"] == 1


def test_one_pass_attention_revisits_the_tile_on_chip():
    # Inside one M0 tile the max must finish before the exponentials: two passes over m0,
    # which costs a buffer of size M0, independent of M.
    assert pass_counts(parse(ONE_PASS))["m0"] == 2


def test_other_ranks_need_one_pass():
    counts = pass_counts(parse(THREE_PASS))
    assert counts["p"] == counts["e"] == counts["f"] == 1


def test_paper_cascade_one_needs_two_passes_over_k():
    c = parse("inputs A[k], B[k]\nY[] = A[k] * B[k]\nZ[k] = Y[] * A[k]\noutputs Z")
    assert pass_counts(c) == {"k": 2}


def test_reduction_read_after_reduce_needs_two_passes():
    c = parse("inputs A[k], B[k]\nY[] = A[k] * B[k]\nZ[] = Y[] * A[k]\noutputs Z")
    assert pass_counts(c) == {"k": 2}


def test_reassociated_cascade_one_needs_one_pass():
    c = parse("inputs A[k], B[k]\nY[] = A[k] * B[k]\nS[] = A[k]\nZ[] = Y[] * S[]\noutputs Z")
    assert pass_counts(c) == {"k": 1}


def test_fixed_index_read_of_a_running_value_waits_for_the_pass():
    c = parse("inputs A[k]\nR[0] = 0\nR[k+1] = R[k] + A[k]\nZ[k] = A[k] / R[K]\noutputs Z")
    assert pass_counts(c)["k"] == 2


def test_explanation_names_the_reduction_that_forces_each_pass():
    text = analyze_rank(parse(THREE_PASS), "m").explain()
    assert "pass 2: SN (waits for GM)" in text
    assert "pass 3: A (waits for SD)" in text
    assert "rank m: 3 pass(es)" in explain_passes(parse(THREE_PASS))
