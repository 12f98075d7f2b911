"""Shared by the device-rank tests: random inputs for a cascade, and the TP block's cases."""

from __future__ import annotations

import numpy as np

from einfuse.backends.reference import interpret
from einfuse.ir import Cascade


def random_inputs(c: Cascade, seed: int) -> dict[str, np.ndarray]:
    """Every input of ``c`` (sizes bound) at random, bounded away from 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in c.inputs:
        shape = c.tensor_shape(t.name)
        values = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        out[t.name] = values
    return out


def assert_same(before: Cascade, after: Cascade, seed: int, rtol: float = 1e-10) -> None:
    """``after`` computes ``before``'s outputs on the reference, in float64."""
    inputs = random_inputs(before, seed)
    want, got = interpret(before, inputs), interpret(after, inputs)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-12, err_msg=name)


TWO_LAYERS = """\
ranks x=2, y=2, t=8, d=4, i=6
device x on tp, y on tp
inputs X[t, d], W1[x, d, i], W2[x, i, d], V1[x, d, i], V2[x, i, d], NW[d]
U[x, t, i] = X[t, d] * W1[x, d, i]
P[x, t, d] = U[x, t, i] * W2[x, i, d]
AR[t, d] = P[y, t, d]
H[t, d] = X[t, d] + AR[t, d]
MS[t] = H[t, d] * H[t, d] / D
RS[t] = rsqrt(MS[t] + 1e-06)
N[t, d] = H[t, d] * RS[t] * NW[d]
U2[x, t, i] = N[t, d] * V1[x, d, i]
P2[x, t, d] = U2[x, t, i] * V2[x, i, d]
AR2[t, d] = P2[y, t, d]
Y[t, d] = H[t, d] + AR2[t, d]
outputs Y
"""
"""Two tensor-parallel MLP layers (column- then row-parallel, all-reduced) with a residual
and an RMSNorm between them: the smallest cascade on which all three passes apply."""
