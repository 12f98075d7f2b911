"""chunk-collective (T3): a reduce-scatter as a ppermute ring over its chunked producer; the
same values on the reference, chunk i's communication independent of chunk i+1's compute."""

from __future__ import annotations

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.einsum_cascade import tp_block
from einfuse.ir import parse, verify
from einfuse.ir.devices import collectives
from einfuse.passes.chunk_collective import chunk_collective_with_report
from einfuse.passes.manager import run_passes
from einfuse.passes.overlap_common import OverlapError
from einfuse.passes.reorder_norm import reorder_norm_with_report
from tests.overlap_cases import assert_same


def row_parallel_rs(x: int = 4, t0: int = 4, h: int = 8, d: int = 6, body: str = "") -> str:
    """A row-parallel matmul's partial sums reduce-scattered over the token rank."""
    return (
        f"ranks x={x}, y={x}, t={x * t0}, t0={t0}, h={h}, d={d}\n"
        "device x on tp, y on tp\n"
        "inputs A[x, t, h], W[x, h, d]\n"
        "P[x, t, d] = A[x, t, h] * W[x, h, d]\n"
        f"RS[x, t0, d] = {body or 'P[y, x*T0+t0, d]'}\n"
        "outputs RS\n"
    )


RINGED = """\
ranks x=3, y=3, t=6, t0=2, h=2, d=2
device x on tp, y on tp
inputs A[x, t, h], W[x, h, d]
RS_P0[x, t0, d] = A[x, mod(x+1, X)*T0+t0, h] * W[x, h, d]
RS_P1[x, t0, d] = A[x, mod(x+2, X)*T0+t0, h] * W[x, h, d]
RS_R1[x, t0, d] = RS_P0[mod(x+1, X), t0, d]
RS_S1[x, t0, d] = RS_P1[x, t0, d] + RS_R1[x, t0, d]
RS_P2[x, t0, d] = A[x, x*T0+t0, h] * W[x, h, d]
RS_R2[x, t0, d] = RS_S1[mod(x+1, X), t0, d]
RS_S2[x, t0, d] = RS_P2[x, t0, d] + RS_R2[x, t0, d]
RS[x, t0, d] = RS_S2[x, t0, d]
outputs RS
"""


def test_worked_example_text_in_text_out() -> None:
    c = verify(parse(row_parallel_rs(3, 2, 2, 2)))
    out = run_passes(c, "chunk-collective").cascade
    assert str(out) == RINGED
    assert [m.kind for m in collectives(c)] == ["reduce_scatter"]
    assert [m.kind for m in collectives(out)] == ["ppermute", "ppermute"]
    assert_same(c, out, seed=0)


@settings(max_examples=20, deadline=None)
@given(
    x=st.integers(1, 4),
    chunks=st.sampled_from([1, 2]),
    per=st.integers(1, 2),
    bidirectional=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ring_equals_reduce_scatter(
    x: int, chunks: int, per: int, bidirectional: bool, seed: int
) -> None:
    c = verify(parse(row_parallel_rs(x, chunks * per, 3, 2)))
    both = bidirectional and chunks % 2 == 0
    out, report = chunk_collective_with_report(c, chunks, both)
    assert report.applied, report.explain()
    assert_same(c, out, seed)
    rings = collectives(out)
    assert len(rings) == chunks * (x - 1) and all(m.kind == "ppermute" for m in rings)


def test_bidirectional_sends_odd_chunks_the_other_way() -> None:
    out, _ = chunk_collective_with_report(verify(parse(row_parallel_rs())), 2, True)
    shifts = {m.einsum: m.reads[0].shift for m in collectives(out)}
    assert {shifts["RS_R1_0"], shifts["RS_R1_1"]} == {1, -1}


def test_each_step_communicates_while_the_next_chunk_computes() -> None:
    """No path from step s's ppermute to step s+1's producer chunk, nor between chunks."""
    out, _ = chunk_collective_with_report(verify(parse(row_parallel_rs())), 2)
    g = out.graph()
    for k in range(2):
        for s in range(1, 4):
            sent = f"RS_R{s}_{k}"
            later = [f"RS_P{s2}_{k2}" for s2 in range(4) for k2 in range(2)]
            assert not any(sent in nx.ancestors(g, p) for p in later)
        assert "RS_R1_0" not in nx.ancestors(g, "RS_S3_1")  # the chunks' rings are independent


def test_all_reduce_rings_its_scatter_then_gathers_and_tp_block_stays_exact() -> None:
    c = tp_block(2, kv_groups=2, p=8, d=4, h=2, e=2, f=2, i=6)
    out, report = chunk_collective_with_report(c, 2)
    assert [d.target for d in report.decisions if d.applied] == ["O", "MO"]
    assert [m.kind for m in collectives(out)] == ["ppermute"] * 2 + ["all_gather"] + [
        "ppermute"
    ] * 2 + ["all_gather"]
    assert_same(c, out, seed=5)


@pytest.mark.parametrize(
    ("text", "chunks", "bidirectional", "reason"),
    [
        (row_parallel_rs(t0=3), 2, False, "shard rank t0 (3) does not split into 2 chunks"),
        (row_parallel_rs(), 1, True, "bidirectional needs an even chunk count"),
        (row_parallel_rs(body="max(y) P[y, x*T0+t0, d]"), 1, False, "ring adds partial sums"),
    ],
)
def test_refusals_name_the_condition(text: str, chunks: int, bidirectional: bool, reason: str):
    c = verify(parse(text))
    out, report = chunk_collective_with_report(c, chunks, bidirectional)
    assert out == c and reason in report.explain()


def test_a_producer_read_elsewhere_is_kept_whole() -> None:
    text = row_parallel_rs().replace("outputs RS", "outputs RS, P")
    c = verify(parse(text))
    out, report = chunk_collective_with_report(c, 2)
    assert "producer kept" in report.explain() and out.writer("P") is not None
    assert_same(c, out, seed=2)


def test_auto_chunks_needs_the_cost_model_or_a_chooser() -> None:
    c = verify(parse(row_parallel_rs()))
    with pytest.raises(OverlapError, match="chunks=auto needs the cost model"):
        run_passes(c, "chunk-collective{chunks=auto}")
    out, report = chunk_collective_with_report(c, "auto", chooser=lambda c, name: 2)
    assert "x 2 chunks" in report.explain()
    assert_same(c, out, seed=1)
    skipped, report = chunk_collective_with_report(c, "auto", chooser=lambda c, name: None)
    assert skipped == c and "does not pay" in report.explain()


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("chunk-collective{chunks=0}", "chunks must be an int >= 1, got 0"),
        ("split-tokens{wave=0}", "wave must be an int >= 1, got 0"),
        ("split-tokens{offset=half}", "offset must be an int or auto, got 'half'"),
    ],
)
def test_bad_options_are_one_line_errors(pipeline: str, message: str) -> None:
    with pytest.raises(OverlapError, match=message):
        run_passes(verify(parse(row_parallel_rs())), pipeline)


def test_symbolic_sizes_are_refused_with_the_reason() -> None:
    c = tp_block(2, kv_groups=2, d=4, h=2, e=2, f=2, i=6)  # p left symbolic
    out, report = reorder_norm_with_report(c)
    assert out == c and "sizes must be bound integers" in report.explain()
    out, report = chunk_collective_with_report(c, 3)
    assert out == c and "no dim of O splits into 2 devices x 3 chunks" in report.explain()


def test_a_producer_summing_a_rank_the_ring_uses_is_kept_whole() -> None:
    """P sums over t0, the scatter's own shard rank: inlining it would capture t0."""
    text = row_parallel_rs().replace("A[x, t, h]", "A[x, t, t0]")
    text = text.replace("W[x, h, d]", "W[x, t0, d]")
    c = verify(parse(text))
    out, report = chunk_collective_with_report(c, 2)
    assert "producer kept" in report.explain()
    assert_same(c, out, seed=3)
