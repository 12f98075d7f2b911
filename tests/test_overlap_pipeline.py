"""The three overlap passes together: split-tokens, reorder-norm, chunk-collective."""

from __future__ import annotations

from collections import Counter

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
