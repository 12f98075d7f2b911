"""The jaxpr lifter: which equations become Einsums; the lifted program still computes f."""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einfuse.backends.program import run_program
from einfuse.einsum_cascade.lift import Program, Region, lift
from einfuse.einsum_cascade.lift_views import reshape_plan
from einfuse.ir import Access, Op, Size, Var, parse, verify
from einfuse.ir.dtypes import tensor_dtypes


def lifted(f, *args) -> Program:
    return lift(jax.make_jaxpr(f)(*args))


def normal(*shape: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def runs_like_jax(f, *args, atol: float = 1e-5) -> Program:
    program = lifted(f, *args)
    got = run_program(program, *jax.tree_util.tree_leaves(args))
    want = jax.tree_util.tree_leaves(jax.jit(f)(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=atol)
    return program


def only_region(program: Program) -> Region:
    assert len(program.regions) == 1, program
    return program.regions[0]


def attention(q, k, v):
    s = jnp.einsum("pe,me->pm", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("pm,mf->pf", jax.nn.softmax(s, axis=-1), v)


def test_attention_lifts_to_one_fusemax_shaped_cascade():
    program = runs_like_jax(attention, normal(4, 8), normal(6, 8, seed=1), normal(6, 8, seed=2))
    einsums = only_region(program).cascade.einsums
    assert not program.opaques
    contractions = [
        e for e in einsums if e.reduce == "sum" and len(e.inputs) == 2 and e.reduced_ranks
    ]
    assert len(contractions) == 2
    assert [e.reduce for e in einsums if e.reduce != "sum"] == ["max"]
    assert sum(isinstance(e.expr, Op) and e.expr.op == "exp" for e in einsums) == 1
    assert len(einsums) == 7  # QK, scale, max, exp, sum, divide, AV


def test_lifted_cascades_verify_and_round_trip_through_text():
    def block(x, w, g):
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g
        return jax.nn.gelu(h @ w) @ w.T + x

    program = runs_like_jax(block, normal(5, 8), normal(8, 8, seed=1), normal(8, seed=2))
    for region in program.regions:
        assert verify(region.cascade) is region.cascade
        assert parse(str(region.cascade)) == region.cascade


def test_causal_mask_from_iota_becomes_a_rank_comparison():
    def causal(q, k, v):
        s = q @ k.T
        s = jnp.where(jnp.tril(jnp.ones(s.shape, bool)), s, -jnp.inf)
        return jax.nn.softmax(s) @ v

    program = runs_like_jax(causal, normal(5, 8), normal(5, 8, seed=1), normal(5, 8, seed=2))
    wheres = [e for e in only_region(program).cascade.einsums if "where" in str(e.expr)]
    assert len(wheres) == 1
    cond = wheres[0].expr.args[0]
    assert isinstance(cond, Op) and cond.op == "ge"
    assert all(isinstance(a, Var) for a in cond.args)  # no mask tensor is read


def test_reshape_split_reads_a_mixed_radix_index():
    def heads(x):
        return jnp.exp(x.reshape(4, 2, 3))

    program = runs_like_jax(heads, normal(4, 6))
    (einsum,) = only_region(program).cascade.einsums
    (read,) = [a for a in einsum.expr.walk() if isinstance(a, Access)]
    split = read.indices[1]
    assert isinstance(split, Op) and split.op == "add"
    assert any(isinstance(n, Size) for n in split.walk())


def test_reshape_merge_stays_opaque():
    program = runs_like_jax(lambda x: jnp.exp(x).reshape(12) * 2.0, normal(4, 3))
    assert [o.primitive for o in program.opaques] == ["reshape"]
    assert len(program.regions) == 2


@pytest.mark.parametrize(
    ("src", "dst", "plan"),
    [
        ((6,), (2, 3), {0: (0, 1)}),
        ((2, 6), (2, 1, 2, 3), {0: (0,), 1: (2, 3)}),
        ((4, 1, 8), (4, 8), {0: (0,), 2: (1,)}),
        ((2, 3), (6,), None),
        ((6, 4), (4, 6), None),
    ],
)
def test_reshape_plan_maps_source_dims_to_split_destination_dims(src, dst, plan):
    assert reshape_plan(src, dst) == plan


def test_float_casts_lift_inside_one_region_as_cast_operators():
    def mixed(x):
        y = jnp.tanh(x).astype(jnp.bfloat16)
        return jnp.exp(y) * y

    program = runs_like_jax(mixed, normal(4, 8), atol=1e-2)
    region = only_region(program)
    assert not program.opaques
    assert "bfloat16(tanh(" in str(region.cascade)
    assert tensor_dtypes(region.cascade)[region.output_tensors[0]] == "bfloat16"


def test_integer_results_are_recomputed_by_jax_not_stored_as_floats():
    big = jnp.array([2**30 + 1, 7], jnp.int32)

    def f(x, ids):
        return jnp.tanh(x), ids * 3 + 1, (x > 0).astype(jnp.int32)

    program = runs_like_jax(f, normal(2), big)
    assert {o.primitive for o in program.opaques} >= {"mul", "add", "convert_element_type"}


def test_custom_jvp_body_is_inlined_and_keeps_its_derivative():
    x = jnp.array([-1.0, 0.0, 2.0])
    program = runs_like_jax(lambda x: jax.nn.relu(x) * 3.0, x)
    region = only_region(program)
    assert region.derivative == "jvp" and "max" in str(region.cascade)

    def through_program(x):
        return jnp.sum(run_program(lifted(lambda x: jax.nn.relu(x) * 3.0, x), x)[0])

    # relu's own rule says 0 at 0; differentiating max(x, 0) would say 1.5.
    np.testing.assert_array_equal(jax.grad(through_program)(x), jnp.array([0.0, 0.0, 3.0]))


def test_custom_vjp_body_is_inlined_and_keeps_its_gradient():
    @jax.custom_vjp
    def clip_grad(x):
        return jnp.sin(x)

    clip_grad.defvjp(lambda x: (jnp.sin(x), None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))
    x = normal(5)
    program = runs_like_jax(lambda x: clip_grad(x) * 2.0, x)
    assert only_region(program).derivative == "vjp"
    grad = jax.grad(lambda x: jnp.sum(run_program(program, x)[0]))(x)
    np.testing.assert_allclose(grad, jnp.full(5, 0.1))


def test_stop_gradient_is_kept_in_derivatives():
    x = normal(4)
    program = runs_like_jax(lambda x: x * jax.lax.stop_gradient(x), x)
    assert only_region(program).derivative == "jvp"
    grad = jax.grad(lambda x: jnp.sum(run_program(program, x)[0]))(x)
    np.testing.assert_allclose(grad, x)


def test_a_stop_gradient_that_only_shifts_a_softmax_leaves_the_derivative_to_einfuse():
    # jax.nn.softmax subtracts stop_gradient(max): the result does not depend on the shift,
    # so the emitted program's own derivative is the original's.
    x = normal(3, 5)
    program = runs_like_jax(lambda x: jax.nn.softmax(x * 2.0, axis=-1), x)
    assert only_region(program).derivative == "emitted"
    w = normal(3, 5)
    got = jax.grad(lambda x: jnp.sum(run_program(program, x)[0] * w))(x)
    want = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x * 2.0, axis=-1) * w))(x)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the same stop_gradient read anywhere else keeps the original derivative
    shifted = runs_like_jax(lambda x: jax.nn.softmax(x) + jax.lax.stop_gradient(x.max()), x)
    assert only_region(shifted).derivative == "jvp"


def test_each_einsum_records_the_source_line_it_came_from():
    def f(x):
        return jnp.sum(jnp.exp(x), axis=-1)  # the line recorded

    line = inspect.getsourcelines(f)[1] + 1
    (region,) = lifted(f, normal(3, 4)).regions
    locs = {(e.loc.file, e.loc.line) for e in region.cascade.einsums}
    assert locs == {(__file__, line)}


def test_nested_jit_bodies_are_inlined_into_one_region():
    inner = jax.jit(lambda x: jnp.exp(x) + 1.0)
    program = runs_like_jax(lambda x: jnp.sum(inner(x) * inner(2.0 * x), -1), normal(3, 4))
    assert len(program.regions) == 1 and not program.opaques


def test_a_value_read_twice_is_stored_once():
    def f(x):
        e = jnp.exp(x)
        return e + e * 2.0

    einsums = only_region(runs_like_jax(f, normal(3, 4))).cascade.einsums
    assert sum("exp" in str(e.expr) for e in einsums) == 1


def test_single_use_elementwise_chains_become_one_einsum():
    program = runs_like_jax(lambda x, y: jnp.tanh(x * y + 1.0) - y, normal(3, 4), normal(3, 4))
    assert len(only_region(program).cascade.einsums) == 1


def test_dot_with_highest_precision_stays_opaque():
    def f(a, b):
        return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)

    program = runs_like_jax(f, normal(3, 4), normal(4, 5))
    assert [o.primitive for o in program.opaques] == ["dot_general"]


def test_unknown_primitives_stay_opaque_and_the_program_still_matches():
    def f(x):
        return jnp.cumsum(jnp.exp(x), 0), jnp.sort(x, 1), x[jnp.array([2, 0])] * 2.0

    program = runs_like_jax(f, normal(3, 4))
    assert {"cumsum", "sort", "gather"} <= {o.primitive for o in program.opaques}
    assert program.regions


def test_program_text_shows_regions_and_opaque_ops_with_lines():
    text = str(lifted(lambda x: jnp.cumsum(jnp.exp(x)), normal(4)))
    assert "# region 0" in text and "exp(" in text
    assert f"# opaque: cumsum at {__file__}:" in text


def test_reducing_a_broadcast_dim_counts_every_copy():
    def f(x):
        wide = jnp.broadcast_to(x[None], (3, *x.shape))
        return jnp.sum(wide, axis=0), jnp.max(wide, axis=0), jnp.einsum("bij,bjk->ik", wide, wide)

    program = runs_like_jax(f, normal(4, 4))
    assert not program.opaques


def test_integer_expressions_too_large_to_inline_are_left_to_jax():
    def f(x):
        a = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
        for _ in range(10):
            a = a * a + a  # every step doubles the inlined expression
        return x * (a > 5)

    program = runs_like_jax(f, normal(4, 3))
    assert "mul" in {o.primitive for o in program.opaques}
