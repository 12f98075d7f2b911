"""Device ranks: the text form, what each Einsum communicates, and the reference's reading."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.backends.reference import interpret
from einfuse.ir import VerifyError, parse
from einfuse.ir.devices import collectives, communications
from einfuse.ir.verify import verify
from einfuse.passes.unify_ranks import unify_ranks

TP = """\
ranks x=4, y=4, z=4, t=16, t0=4, h=8, d=6
device x on tp, y on tp
inputs A[x, t, h], W[x, h, d]
P[x, t, d] = A[x, t, h] * W[x, h, d]
RS[x, t0, d] = P[y, x*T0+t0, d]
AR[t, d] = P[y, t, d]
SS[x, t0] = RS[x, t0, d] * RS[x, t0, d]
N[x, t0, d] = RS[x, t0, d] * rsqrt(SS[x, t0] / D + 1e-05)
G[z, t0, d] = N[z, t0, d]
GT[t, d] = G[t/T0, mod(t, T0), d]
R[x, t, d] = P[mod(x+1, X), t, d]
outputs AR, GT, R
"""


def test_text_round_trip_and_kinds() -> None:
    c = verify(parse(TP))
    assert str(c) == TP
    assert c.device_axis("x") == "tp" and c.device_axis("t") is None
    assert c.device_dim("P", "tp") == 0 and c.device_dim("AR", "tp") is None
    kinds = {m.einsum: m.kind for m in communications(c)}
    assert kinds == {
        "P": "local",
        "RS": "reduce_scatter",
        "AR": "all_reduce",
        "SS": "local",
        "N": "local",
        "G": "all_gather",
        "GT": "local",
        "R": "ppermute",
    }
    ring = next(m for m in collectives(c) if m.kind == "ppermute")
    assert (ring.reads[0].shift, ring.reads[0].wraps) == (1, True)
    rs = next(m for m in collectives(c) if m.kind == "reduce_scatter")
    assert (rs.self_rank, rs.reduced_rank) == ("x", "y")


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_reference_reads_device_ranks_as_ranks(seed: int) -> None:
    """On one device the collectives are plain sums, gathers and rolls of the global arrays."""
    rng = np.random.default_rng(seed)
    a, w = rng.standard_normal((4, 16, 8)), rng.standard_normal((4, 8, 6))
    out = interpret(verify(parse(TP)), {"A": a, "W": w})
    p = np.einsum("xth,xhd->xtd", a, w)
    np.testing.assert_allclose(out["AR"], p.sum(0), rtol=1e-12, atol=1e-12)
    rs = p.sum(0).reshape(4, 4, 6)
    normed = rs / np.sqrt((rs**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out["GT"], normed.reshape(16, 6), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["R"], np.roll(p, -1, axis=0), rtol=1e-12, atol=1e-12)


def test_unify_ranks_keeps_which_device_a_read_names() -> None:
    """Merging the gathered rank z into x would turn an all-gather into a local read."""
    c = verify(parse(TP))
    assert [m.kind for m in collectives(unify_ranks(c))] == [m.kind for m in collectives(c)]
    assert unify_ranks(c).devices == c.devices


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("B[x, t] = A[x+y, t, h]", "device dim of A"),
        ("B[x, y, t] = A[x, t, h] * A[y, t, h]", "sharded at most once"),
        ("B[t] = A[y, t, h] + A[mod(y+1, X), t, h]", "device dim of A"),
        ("B[x, t] = A[y, t, h] * A[mod(x+1, X), t, h]", "in one Einsum"),
        ("B[t] = prod(y, h) A[y, t, h]", "prod reduction over devices"),
        ("B[x, t] = A[y, t, h]", "must index the scattered data dim"),
    ],
)
def test_misuse_is_named(body: str, message: str) -> None:
    text = (
        "ranks x=4, y=4, t=16, h=8\ndevice x on tp, y on tp\ninputs A[x, t, h]\n"
        f"{body}\noutputs B\n"
    )
    with pytest.raises(VerifyError, match=message):
        verify(parse(text))


def test_axis_sizes_must_agree() -> None:
    text = "ranks x=4, y=2, t=3\ndevice x on tp, y on tp\ninputs A[x, t]\n"
    text += "B[t] = A[x, t]\noutputs B\n"
    with pytest.raises(VerifyError, match="differ in size"):
        verify(parse(text))


def test_one_device_rank_per_tensor_and_axis() -> None:
    text = "ranks x=4, y=4\ndevice x on tp, y on tp\ninputs A[x, y]\nB[x] = A[x, y]\noutputs B\n"
    with pytest.raises(VerifyError, match="sharded at most once"):
        verify(parse(text))
