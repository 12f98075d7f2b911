"""With no pass, einfuse.jit re-emits what jax.jit compiles: the same optimized HLO, op for op.

The GPT block (examples/gpt_block.py) is lifted into cascades and emitted back as JAX; XLA
must see the same program (every op kind counted equal), or the no-pass path is slower than
``jax.jit`` for no reason. Before the emitter chose its evaluation order by cost
(``jax_layout``), a masked score map was transposed in and out, and XLA's CPU tree-reduction
rewrite split the softmax's row reductions into ``reduce-window`` + ``reduce``.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einfuse
from einfuse.backends.inspection import inspect_hlo
from einfuse.backends.jax_backend import emit_jax, emit_jax_source
from einfuse.backends.jax_layout import choose_order
from einfuse.backends.reference import interpret
from einfuse.ir import parse
from examples.gpt_block import block, causal_attention, make_inputs

# Sequence 64 > 32, the CPU tree-reduction rewrite's window: it fires here if it can.
B, S, D = 2, 64, 64


def op_counts(fn, *args) -> dict[str, int]:
    return dict(inspect_hlo(fn.lower(*args)).op_counts)


def instructions(fn, *args) -> Counter[str]:
    """Optimized HLO instructions with names and metadata dropped: shape, opcode, operands'
    shapes, dimension numbers, layouts. Equal multisets mean XLA compiled the same program."""
    out: Counter[str] = Counter()
    for line in fn.lower(*args).compile().as_text().splitlines():
        if m := re.match(r"\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*)$", line):
            body = re.sub(r",\s*(metadata|backend_config)=.*", "", m.group(1))
            out[re.sub(r"%[\w.\-]+", "%", body)] += 1
    return out


def count_differences(a: dict[str, int], b: dict[str, int]) -> dict[str, tuple[int, int]]:
    pairs = {k: (a.get(k, 0), b.get(k, 0)) for k in a.keys() | b.keys()}
    return {k: (x, y) for k, (x, y) in pairs.items() if x != y}


@pytest.fixture(scope="module")
def gpt_f32():
    return make_inputs(B, S, D, jnp.float32)


def test_gpt_block_with_no_pass_compiles_to_the_ops_jax_jit_compiles(gpt_f32) -> None:
    want = op_counts(jax.jit(block), *gpt_f32)
    got = op_counts(einfuse.jit(block), *gpt_f32)
    assert got.get("reduce-window", 0) == 0
    assert count_differences(want, got) == {}


def test_gpt_block_with_no_pass_compiles_to_jax_jits_program_instruction_for_instruction(
    gpt_f32,
) -> None:
    """Beyond counts: the same shapes, layouts and dot dimension numbers (batch ranks lead)."""
    assert instructions(einfuse.jit(block), *gpt_f32) == instructions(jax.jit(block), *gpt_f32)


def test_gpt_block_with_no_pass_matches_jax_jit(gpt_f32) -> None:
    want = jax.jit(block)(*gpt_f32)
    got = einfuse.jit(block)(*gpt_f32)
    assert float(jnp.std(want)) > 0.1  # a real signal, not zeros
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def bf16_attention_counts() -> tuple[dict[str, int], dict[str, int]]:
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(key, (B, 4, S, 16), jnp.bfloat16) for key in keys)
    return op_counts(jax.jit(causal_attention), q, k, v), op_counts(
        einfuse.jit(causal_attention), q, k, v
    )


# The all-bfloat16 program lifts as one region (casts are IR operators), so no bool mask is
# stored and read back as a float between regions.
def test_bf16_causal_attention_compiles_to_the_ops_jax_jit_compiles(
    bf16_attention_counts,
) -> None:
    want, got = bf16_attention_counts
    assert count_differences(want, got) == {}


# --------------------------------------------------------------------------- evaluation order
MASKED = "inputs S[a, j, b, e]\nW[a, j, b, e] = where(b >= e, S[a, j, b, e] / 4.0, -inf)\noutputs W"


def test_a_masked_map_runs_in_the_output_order_without_transposes() -> None:
    c = parse(MASKED)
    sizes = {"a": 2, "j": 3, "b": 5, "e": 5}
    assert "transpose" not in emit_jax_source(c, sizes)
    s = np.random.default_rng(7).standard_normal((2, 3, 5, 5)).astype(np.float32)
    (w,) = emit_jax(c)(s)
    np.testing.assert_allclose(w, interpret(c, {"S": s})["W"], rtol=1e-6)


def test_operands_stored_alike_are_read_as_stored_and_transposed_once() -> None:
    c = parse("inputs X[m, p], Z[m, p]\nY[p, m] = X[m, p] + exp(Z[m, p])\noutputs Y")
    assert emit_jax_source(c, {"m": 3, "p": 4}).count("jnp.transpose") == 1


def test_a_reduction_over_a_middle_rank_reads_its_operand_as_stored() -> None:
    c = parse("inputs X[a, r, b]\nY[a, b] = max(r) X[a, r, b]\noutputs Y")
    src = emit_jax_source(c, {"a": 2, "r": 3, "b": 4})
    assert "jnp.max(X, axis=1)" in src and "transpose" not in src


def test_choose_order_prefers_the_output_order_on_a_tie() -> None:
    e = parse("inputs X[m]\nY[p, m] = X[m] * p\noutputs Y").einsums[0]
    order = choose_order(e.expr, ("p", "m"), {"p": 3, "m": 4}, lambda a: ("m",))
    assert order == ("p", "m")


def test_a_batched_contraction_puts_the_batch_ranks_first_in_each_operand() -> None:
    """As a user's ``q.transpose(0, 2, 1, 3)`` does: XLA then keeps K's head dim minor."""
    c = parse(
        "inputs Q[a, b, j, k], K[a, e, j, k]\n"
        "S[a, j, b, e] = Q[a, b, j, k] * K[a, e, j, k]\noutputs S"
    )
    src = emit_jax_source(c, {"a": 2, "b": 3, "j": 4, "k": 5, "e": 6})
    assert 'jnp.einsum("ajbk,ajek->ajbe"' in src
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 6, 4, 5))
    (s,) = emit_jax(c)(q.astype(np.float32), k.astype(np.float32))
    np.testing.assert_allclose(s, interpret(c, {"Q": q, "K": k})["S"], rtol=1e-5, atol=1e-5)
