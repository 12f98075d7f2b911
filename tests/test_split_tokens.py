"""split-tokens (TokenWeave): two halves of the token rank, each with its own collectives,
exact on the reference; refusals name the condition; the halves do not wait for each other."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.einsum_cascade import tp_block
from einfuse.ir import parse, verify
from einfuse.ir.devices import collectives
from einfuse.passes.manager import run_passes
from einfuse.passes.overlap_common import OverlapError
from einfuse.passes.split_tokens import half_waits, split_tokens_with_report
from tests.overlap_cases import TWO_LAYERS, assert_same

SPLIT = """\
ranks x=2, y=2, t=8, h=3, d=2, ta=5, tb=3
device x on tp, y on tp
inputs A[x, t, h], W[x, h, d], R[t, d]
P_a[x, ta, d] = A[x, ta+0, h] * W[x, h, d]
P_b[x, tb, d] = A[x, TA+tb, h] * W[x, h, d]
AR_a[ta, d] = P_a[y, ta, d]
AR_b[tb, d] = P_b[y, tb, d]
H_a[ta, d] = R[ta+0, d] + AR_a[ta, d]
H_b[tb, d] = R[TA+tb, d] + AR_b[tb, d]
H[t, d] = H_a[t-0, d] + H_b[t-TA, d]
outputs H
"""


def matmul_all_reduce(x: int = 2, t: int = 8, h: int = 3, d: int = 2) -> str:
    return (
        f"ranks x={x}, y={x}, t={t}, h={h}, d={d}\ndevice x on tp, y on tp\n"
        "inputs A[x, t, h], W[x, h, d], R[t, d]\n"
        "P[x, t, d] = A[x, t, h] * W[x, h, d]\nAR[t, d] = P[y, t, d]\n"
        "H[t, d] = R[t, d] + AR[t, d]\noutputs H\n"
    )


def sides(c) -> dict[str, int]:
    return {e.output: "ab".index(e.output[-1]) for e in c.einsums if e.output[-2:-1] == "_"}


def test_worked_example_text_in_text_out() -> None:
    c = verify(parse(matmul_all_reduce()))
    out = run_passes(c, "split-tokens{offset=1,wave=4,force=true,rank=t}").cascade
    assert str(out) == SPLIT
    assert [m.einsum for m in collectives(out)] == ["AR_a", "AR_b"]
    assert_same(c, out, seed=0)


@settings(max_examples=20, deadline=None)
@given(
    x=st.integers(1, 3),
    t=st.integers(2, 12),
    wave=st.integers(1, 4),
    offset=st.integers(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_split_equals_original(x: int, t: int, wave: int, offset: int, seed: int) -> None:
    c = verify(parse(matmul_all_reduce(x, t)))
    out, report = split_tokens_with_report(c, offset, wave, force=True, rank="t")
    first = -(-t // wave) * wave // 2 + offset
    assert report.applied == (0 < first < t), report.explain()
    if report.applied:
        assert len(collectives(out)) == 2 * len(collectives(c))
        assert_same(c, out, seed)


def test_tp_block_halves_carry_through_attention_and_mlp() -> None:
    c = tp_block(2, kv_groups=2, p=8, d=4, h=2, e=2, f=2, i=6)
    out, report = split_tokens_with_report(c, 0, 4, force=True)
    assert [m.einsum for m in collectives(out)] == ["O_a", "O_b", "MO_a", "MO_b"]
    assert "independent of the other half's compute" in report.explain()
    assert half_waits(out, sides(out)) == []
    assert_same(c, out, seed=4)


def test_two_layers_stay_split_and_independent() -> None:
    c = verify(parse(TWO_LAYERS))
    out, _ = split_tokens_with_report(c, 0, 2, force=True, rank="t")
    assert [m.kind for m in collectives(out)] == ["all_reduce"] * 4
    assert half_waits(out, sides(out)) == []
    assert not any(e.output in ("H", "N", "U2") for e in out.einsums)  # no rejoin mid-way
    assert_same(c, out, seed=6)


def test_a_half_reading_the_others_collective_is_reported() -> None:
    """Keys over every token after the all-reduce: half b's scores wait for half a's AR."""
    text = (
        matmul_all_reduce()
        .replace("outputs H", "S[t, m] = H[t, d] * H[m, d]\noutputs S")
        .replace("d=2", "d=2, m=8")
    )
    c = verify(parse(text))
    out, report = split_tokens_with_report(c, 0, 4, force=True, rank="t")
    assert "S_b waits for the other half's AR_a" in report.explain()
    assert_same(c, out, seed=8)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (dict(), "8 tokens < 1024"),
        (dict(force=True, rank="t"), "first half round_up(8, 256)/2 + 0 = 128 is not in (0, 8)"),
        (dict(force=True, rank="d", wave=2), "Q reduces over d"),
    ],
)
def test_refusals_name_the_condition(options: dict, reason: str) -> None:
    text = matmul_all_reduce().replace("outputs H", "Q[t] = H[t, d]\noutputs Q")
    c = verify(parse(text))
    out, report = split_tokens_with_report(c, **options)
    assert out == c and reason in report.explain(), report.explain()


def test_an_ambiguous_token_rank_must_be_named() -> None:
    c = verify(parse(matmul_all_reduce()))
    out, report = split_tokens_with_report(c)
    assert out == c
    assert "no single token rank on every collective's output (candidates: d, t)" in (
        report.explain()
    )


def test_auto_offset_needs_the_cost_model_or_a_chooser() -> None:
    c = verify(parse(matmul_all_reduce()))
    with pytest.raises(OverlapError, match="offset=auto needs the cost model"):
        run_passes(c, "split-tokens{offset=auto}")
    out, report = split_tokens_with_report(c, "auto", 4, True, "t", chooser=lambda c, r: -1)
    assert "t = 3 + 5 tokens" in report.explain()
    assert_same(c, out, seed=9)
