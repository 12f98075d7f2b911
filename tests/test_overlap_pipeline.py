"""The three overlap passes together: split-tokens, reorder-norm, chunk-collective."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from einfuse.einsum_cascade import tp_block
from einfuse.ir import parse, verify
from einfuse.ir.devices import collectives
from einfuse.passes.manager import run_passes
from einfuse.passes.split_tokens import half_waits
from tests.overlap_cases import TWO_LAYERS, assert_same

PIPELINE = (
    "split-tokens{{wave={wave},force=true{rank}}},reorder-norm,chunk-collective{{chunks=2{both}}}"
)


def half_of(c) -> dict[str, int]:
    """Which half an Einsum of the split cascade belongs to, from its name (X_a_SH, X_b_R1_0)."""
    out = {}
    for e in c.einsums:
        parts = e.output.split("_")
        for k, side in enumerate("ab"):
            if side in parts[1:]:
                out[e.output] = k
    return out


@pytest.mark.parametrize("both", [False, True])
def test_two_layers_through_all_three(both: bool) -> None:
    c = verify(parse(TWO_LAYERS))
    pipe = PIPELINE.format(wave=2, rank=",rank=t", both=",bidirectional=true" if both else "")
    out = run_passes(c, pipe).cascade
    kinds = Counter(m.kind for m in collectives(out))
    # 2 halves x 2 layers; each ringed scatter is 2 chunks x (2-1) steps of ppermute; per
    # half, the norm's output and the output Y are gathered (the residual stays sharded).
    assert kinds == {"ppermute": 8, "all_gather": 4}
    assert half_waits(out, half_of(out)) == []
    assert_same(c, out, seed=11)


def test_tp_block_through_all_three() -> None:
    c = tp_block(2, kv_groups=2, p=16, d=4, h=2, e=2, f=2, i=6)
    out = run_passes(c, PIPELINE.format(wave=8, rank="", both="")).cascade
    kinds = Counter(m.kind for m in collectives(out))
    assert kinds == {"ppermute": 8, "all_gather": 4}
    assert half_waits(out, half_of(out)) == []
    assert_same(c, out, seed=12)


README_EXAMPLE = """\
ranks x=2, y=2, t=8, h=4, d=4, t0=4, t1=2
device x on tp, y on tp
inputs A[x, t, h], W[x, h, d], R[t, d], NW[d]
AR_P0[x, t0, d] = A[x, mod(x+1, X)*T0+t0, h] * W[x, h, d]
AR_P1[x, t0, d] = A[x, x*T0+t0, h] * W[x, h, d]
AR_R1[x, t0, d] = AR_P0[mod(x+1, X), t0, d]
AR_S1[x, t0, d] = AR_P1[x, t0, d] + AR_R1[x, t0, d]
AR_SH[x, t0, d] = AR_S1[x, t0, d]
H_SH[x, t0, d] = R[x*T0+t0, d] + AR_SH[x, t0, d]
MS_SH[x, t0] = H_SH[x, t0, d] * H_SH[x, t0, d] / D
RS_SH[x, t0] = rsqrt(MS_SH[x, t0] + 1e-06)
N_SH[x, t0, d] = H_SH[x, t0, d] * RS_SH[x, t0] * NW[d]
G_N[t1, t0, d] = N_SH[t1, t0, d]
N[t, d] = G_N[t/T0, mod(t, T0), d]
outputs N
"""


def test_readme_worked_example() -> None:
    """README's "Device ranks and overlap passes" example, text in and text out."""
    spec = Path(__file__).parents[1] / "examples" / "specs" / "tp_allreduce_norm.ein"
    c = verify(parse(spec.read_text()))
    out = run_passes(c, "reorder-norm,chunk-collective").cascade
    assert str(out) == README_EXAMPLE
    assert_same(c, out, seed=13)
