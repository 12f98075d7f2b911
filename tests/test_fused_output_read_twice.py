"""A fused attention whose output is also read after the loop (``return o, o.sum()``).

``fuse`` then fuses the sum over the query rank too, so what runs after the attention
loop is a second fused group; the planner once dropped that group's initial value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einfuse.autotune.measure import describe_error
from einfuse.backends.jax_backend import lower_cascade
from einfuse.frontend import jit
from einfuse.ir import parse
from einfuse.ir.cascade import Einsum
from einfuse.ir.errors import VerifyError


def attn(x):
    s = x @ x.T * 0.125
    o = jax.nn.softmax(s) @ x
    return o, o.sum()


def attn_tree(x):
    o, loss = attn(x)
    return {"loss": loss, "out": o}


def loss(x):
    return attn(x)[1]


def _close(got, want) -> None:
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = float(np.abs(np.asarray(w)).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("rows", [256, 600])  # 600: the sum over rows spans two tiles
@pytest.mark.parametrize("fn", [attn, attn_tree], ids=["tuple", "pytree"])
def test_fused_output_read_again_matches_jax(fn, rows):
    x = jax.random.normal(jax.random.PRNGKey(rows), (rows, 64), jnp.float32)
    _close(jit(fn, passes="fuse")(x), jax.jit(fn)(x))


def test_gradient_through_fused_output_read_again_matches_jax():
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 64), jnp.float32)
    want = jax.jit(jax.grad(loss))(x)
    _close(jit(jax.grad(loss), passes="fuse")(x), want)
    _close(jax.grad(jit(loss, passes="fuse"))(x), want)


def test_recurrence_without_initial_value_is_a_verify_error_in_the_emitter():
    c = parse("ranks m=4\ninputs X[m]\nR[0] = 0.0\nR[m+1] = R[m] + X[m]\noutputs R")
    broken = c.with_einsums([Einsum(e.output, e.indices, e.expr, e.reduce) for e in c.einsums])
    with pytest.raises(VerifyError, match="no initial value"):
        lower_cascade(broken, {"m": 4})


def test_an_exception_without_message_is_recorded_with_where_it_was_raised():
    try:
        raise AssertionError  # what a failed ``assert`` raises outside pytest
    except AssertionError as exc:
        reason = describe_error(exc)
    assert reason.startswith("AssertionError: internal error at test_fused_output_read_twice.py:")
