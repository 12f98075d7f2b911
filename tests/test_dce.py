"""``dce``: Einsums no output depends on are removed; everything else stays as it was."""

from __future__ import annotations

from einfuse.ir import parse
from einfuse.passes.dce import dce, remove_unread, unread
from einfuse.passes.manager import run_passes

CHAIN = """
inputs X[i], Y[i]
A[i] = X[i] * 2
B[i] = A[i] + 1
C[i] = exp(Y[i])
D[i] = C[i] * B[i]
E[] = D[i]
outputs B
"""


def test_removes_einsums_no_output_needs() -> None:
    c = parse(CHAIN)
    assert unread(c) == {"C", "D", "E"}
    assert [e.output for e in dce(c).einsums] == ["A", "B"]


def test_keeps_declared_inputs_even_when_unread() -> None:
    assert [t.name for t in dce(parse(CHAIN)).inputs] == ["X", "Y"]


def test_a_tensor_read_only_by_an_initial_value_stays() -> None:
    c = parse("inputs X[i]\nS[] = X[i]\nR[0] = S[]\nR[i+1] = R[i] + X[i]\nT[] = 5\noutputs R")
    assert [e.output for e in dce(c).einsums] == ["S", "R"]


def test_a_live_cascade_is_returned_as_is() -> None:
    c = parse("inputs X[i]\nA[i] = X[i] * 2\noutputs A")
    assert dce(c) is c


def test_only_limits_removal_to_the_named_tensors() -> None:
    kept = remove_unread(parse(CHAIN), only={"E", "D"})
    assert [e.output for e in kept.einsums] == ["A", "B", "C"]


def test_registered_as_a_pass() -> None:
    result = run_passes(parse(CHAIN), "dce")
    assert "E[]" not in str(result.cascade) and "B[i] = A[i] + 1" in str(result.cascade)
