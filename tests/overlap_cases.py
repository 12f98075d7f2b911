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
