"""unify-ranks: one axis, one name, so analyses can follow it through the cascade."""

import numpy as np
from hypothesis import given, settings

from einfuse.backends.reference import interpret
from einfuse.ir import parse, verify
from einfuse.passes.fuse import fuse_with_report
from einfuse.passes.pass_count import pass_counts
from einfuse.passes.unify_ranks import unify_ranks
from tests.strategies import cascade_with_inputs

LIFTED = """ranks a=1, b=6, c=2, d=3, e=6, f=1, g=6, h=2, i=3
inputs X0[a, b, c, d], X1[a, e, c, d], X2[f, g, h, i]
DOT0[a, c, b, e] = X0[a, b, c, d] * X1[a, e, c, d]
MAX0[a, c, b] = max(e) DOT0[a, c, b, e]
EXP0[a, c, b, e] = exp(DOT0[a, c, b, e] - MAX0[0, c, b])
SUM0[a, c, b] = EXP0[a, c, b, e]
DIV1[a, c, b, e] = EXP0[a, c, b, e] / SUM0[0, c, b]
DOT1[f, h, i, b] = X2[f, g, h, i] * DIV1[f, h, b, g]
outputs DOT1
"""


def test_axes_connected_through_reads_share_one_name():
    out = unify_ranks(parse(LIFTED))
    assert "inputs X0[a, b, c, d], X1[a, e, c, d], X2[a, e, c, i]" in str(out)
    assert "DOT1[a, c, i, b] = X2[a, e, c, i] * DIV1[a, c, b, e]" in str(out)


def test_size_one_constant_reads_become_rank_reads():
    out = str(unify_ranks(parse(LIFTED)))
    assert "MAX0[a, c, b]" in out and "[0, c, b]" not in out


def test_unified_lifted_softmax_fuses_to_one_pass():
    c = unify_ranks(parse(LIFTED))
    assert pass_counts(c)["e"] == 3
    fused, report = fuse_with_report(c, tile=4)
    assert report.fused and pass_counts(fused)["e"] == 1


def test_transposed_reads_keep_distinct_axes_apart():
    c = parse("ranks i=3, j=3\ninputs X[i, j]\nY[i, j] = X[i, j] * X[j, i]\noutputs Y")
    assert unify_ranks(c) == c


def test_axes_of_different_sizes_are_never_merged():
    c = parse("ranks i=3, j=4, k=3\ninputs X[i], Z[j]\nY[k] = X[k]\nW[j] = Z[j]\noutputs Y, W")
    assert "Y[i] = X[i]" in str(unify_ranks(c))
    assert "W[j] = Z[j]" in str(unify_ranks(c))


@settings(max_examples=30, deadline=None)
@given(cascade_with_inputs())
def test_renaming_never_changes_results(drawn):
    c, inputs = drawn
    out = verify(unify_ranks(c))
    want, got = interpret(c, inputs), interpret(out, inputs)
    for name in c.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_size_references_follow_the_renamed_rank():
    c = parse("ranks i=3, j=3\ninputs X[i]\nY[j] = X[j] * J\noutputs Y")
    out = verify(unify_ranks(c))
    assert "Y[i] = X[i] * I" in str(out)
