"""reorder-norm: all-reduce + residual + RMSNorm -> reduce-scatter + norm on the shard +
all-gather, exact on the reference, refused with the failing condition named."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.einsum_cascade import tp_block
from einfuse.ir import parse, verify
from einfuse.ir.devices import collectives
from einfuse.passes.manager import run_passes
from einfuse.passes.reorder_norm import reorder_norm_with_report
from tests.overlap_cases import assert_same


def norm_after_all_reduce(x: int = 4, t: int = 16, h: int = 8, d: int = 6, mid: str = "") -> str:
    """A row-parallel matmul, its all-reduce, a residual and an RMSNorm (the worked example)."""
    return (
        f"ranks x={x}, y={x}, t={t}, h={h}, d={d}\n"
        "device x on tp, y on tp\n"
        "inputs A[x, t, h], W[x, h, d], R[t, d], NW[d]\n"
        "P[x, t, d] = A[x, t, h] * W[x, h, d]\n"
        "AR[t, d] = P[y, t, d]\n"
        f"H[t, d] = R[t, d] + AR[t{mid}, d]\n"
        "MS[t] = H[t, d] * H[t, d] / D\n"
        "RS[t] = rsqrt(MS[t] + 1e-06)\n"
        "N[t, d] = H[t, d] * RS[t] * NW[d]\n"
        "outputs N\n"
    )


REORDERED = """\
ranks x=4, y=4, t=16, h=8, d=6, t0=4, t1=4
device x on tp, y on tp
inputs A[x, t, h], W[x, h, d], R[t, d], NW[d]
P[x, t, d] = A[x, t, h] * W[x, h, d]
AR_SH[x, t0, d] = P[y, x*T0+t0, d]
H_SH[x, t0, d] = R[x*T0+t0, d] + AR_SH[x, t0, d]
MS_SH[x, t0] = H_SH[x, t0, d] * H_SH[x, t0, d] / D
RS_SH[x, t0] = rsqrt(MS_SH[x, t0] + 1e-06)
N_SH[x, t0, d] = H_SH[x, t0, d] * RS_SH[x, t0] * NW[d]
G_N[t1, t0, d] = N_SH[t1, t0, d]
N[t, d] = G_N[t/T0, mod(t, T0), d]
outputs N
"""


def kinds(c) -> list[str]:
    return [m.kind for m in collectives(c)]


def test_worked_example_text_in_text_out() -> None:
    c = verify(parse(norm_after_all_reduce()))
    out = run_passes(c, "reorder-norm").cascade
    assert str(out) == REORDERED
    assert kinds(c) == ["all_reduce"] and kinds(out) == ["reduce_scatter", "all_gather"]
    assert_same(c, out, seed=0)


@settings(max_examples=20, deadline=None)
@given(
    x=st.integers(1, 4),
    per=st.integers(1, 3),
    h=st.integers(1, 3),
    d=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_reordered_equals_original(x: int, per: int, h: int, d: int, seed: int) -> None:
    c = verify(parse(norm_after_all_reduce(x, x * per, h, d)))
    out, report = reorder_norm_with_report(c)
    assert report.applied, report.explain()
    assert_same(c, out, seed)


def test_tp_block_first_all_reduce_is_reordered() -> None:
    c = tp_block(2, kv_groups=2, p=8, d=4, h=2, e=2, f=2, i=6)
    out, report = reorder_norm_with_report(c)
    assert [d.applied for d in report.decisions] == [True, True]
    # The norm's output feeds the MLP: gathered. The residual stays sharded, so the second
    # all-reduce is read only at each device's rows: a reduce-scatter; Y, an output, gathered.
    assert kinds(out) == ["reduce_scatter", "all_gather", "reduce_scatter", "all_gather"]
    assert "MO: applied: read only at its own shards (by Y_SH)" in report.explain()
    assert_same(c, out, seed=3)


def test_an_all_reduce_read_beyond_its_shard_stays() -> None:
    c = tp_block(2, kv_groups=2, p=8, d=4, h=2, e=2, f=2, i=6)
    text = str(c).replace("outputs Y", "Z[p, d] = MO[p, d] * 2.0\noutputs Y, Z")
    out, report = reorder_norm_with_report(verify(parse(text)))
    assert "MO: not applied" in report.explain()
    assert "nor a reduce-scatter: Z reads MO[p, d] beyond its own shard" in report.explain()
    assert kinds(out)[2] == "all_reduce"


def test_refused_without_a_norm() -> None:
    text = norm_after_all_reduce().split("MS[t]")[0] + "outputs H\n"
    c = verify(parse(text))
    out, report = reorder_norm_with_report(c)
    assert out == c and "no per-token reduction (norm)" in report.explain()


def test_refused_when_a_consumer_reads_across_tokens() -> None:
    c = verify(parse(norm_after_all_reduce(mid="+1")))
    out, report = reorder_norm_with_report(c)
    assert out == c
    assert "H reads AR at t + 1 on its token dim" in report.explain()


def test_refused_when_tokens_do_not_split_over_devices() -> None:
    c = verify(parse(norm_after_all_reduce(x=3, t=16)))
    out, report = reorder_norm_with_report(c)
    assert out == c and "t: size 16 does not split over 3 devices" in report.explain()


def test_the_cost_model_may_veto() -> None:
    c = verify(parse(norm_after_all_reduce()))
    out, report = reorder_norm_with_report(c, pays=lambda c, name: name != "AR")
    assert out == c and "AR: not applied: the cost model says it does not pay" in report.explain()
