"""The tensor-parallel Llama block equals the unsharded one with its weights resharded."""

from __future__ import annotations

import numpy as np
import pytest

from einfuse.backends.reference import interpret
from einfuse.einsum_cascade import LibraryError, shard_weights, tp_block, transformer_block
from einfuse.ir import parse
from einfuse.ir.devices import collectives
from tests.overlap_cases import random_inputs

SIZES = dict(p=8, d=4, e=2, f=2)


@pytest.mark.parametrize(("tp", "h", "i", "groups"), [(2, 2, 6, 2), (4, 4, 8, 1), (1, 3, 5, 1)])
def test_tp_block_equals_the_unsharded_block(tp: int, h: int, i: int, groups: int) -> None:
    ref = transformer_block("llama", kv_groups=groups, batch=False, h=h, i=i, **SIZES)
    inputs = random_inputs(ref, seed=tp)
    want = interpret(ref, inputs)["Y"]
    c = tp_block(tp, kv_groups=groups, h=h, i=i, **SIZES)
    got = interpret(c, shard_weights(inputs, tp))["Y"]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_without_rotary_it_is_the_block_with_identity_rotation() -> None:
    ref = transformer_block("llama", kv_groups=2, batch=False, h=2, i=4, **SIZES)
    inputs = random_inputs(ref, seed=7)
    inputs["COS"], inputs["SIN"] = np.ones((8, 2)), np.zeros((8, 2))
    c = tp_block(2, kv_groups=2, rotary=False, h=2, i=4, **SIZES)
    assert "COS" not in {t.name for t in c.inputs}
    sharded = {k: v for k, v in shard_weights(inputs, 2).items() if k not in ("COS", "SIN")}
    np.testing.assert_allclose(interpret(c, sharded)["Y"], interpret(ref, inputs)["Y"], rtol=1e-12)


def test_row_parallel_projections_are_all_reduced_and_text_round_trips() -> None:
    c = tp_block(4, kv_groups=1, h=4, i=8, **SIZES)
    assert [(m.einsum, m.kind) for m in collectives(c)] == [
        ("O", "all_reduce"),
        ("MO", "all_reduce"),
    ]
    assert c.devices == (("x", "tp"), ("y", "tp"))
    assert parse(str(c)) == c


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: tp_block(3, h=4, i=6), "h=4 must be an int divisible by tp=3"),
        (lambda: tp_block(0, h=4, i=4), "positive int"),
        (lambda: tp_block(2, h=4, i=4, x=2), "x is set by tp"),
        (lambda: tp_block(2, h=4, i=4, attention_form="1pass"), "3pass or deferred"),
        (lambda: shard_weights({"WQ": np.zeros((2, 3, 1, 2))}, 2), "not divisible by tp=2"),
    ],
)
def test_bad_arguments_are_named(make, message: str) -> None:
    with pytest.raises(LibraryError, match=message):
        make()
