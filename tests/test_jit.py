"""``einfuse.jit`` behaves like ``jax.jit``: same values, pytrees, statics, cache, grad and vmap."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einfuse.frontend import jit
from einfuse.ir.errors import EinfuseError


def normal(*shape: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def assert_trees_close(got, want, tol: float = 1e-5) -> None:
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- the suite
def softmax_attention(q, k, v):
    s = jnp.einsum("pe,me->pm", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("pm,mf->pf", jax.nn.softmax(s, axis=-1), v)


def handwritten_attention(q, k, v):
    s = q @ k.T
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    return (e / jnp.sum(e, axis=-1, keepdims=True)) @ v


def xla_attention(q, k, v):  # [T, N, H]
    return jax.nn.dot_product_attention(q[None], k[None], v[None], implementation="xla")[0]


def xla_causal_attention(q, k, v):
    return jax.nn.dot_product_attention(
        q[None], k[None], v[None], is_causal=True, implementation="xla"
    )[0]


def iota_causal_attention(q, k, v):
    s = q @ k.T
    rows = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jax.nn.softmax(jnp.where(cols <= rows, s, -jnp.inf)) @ v


def tril_causal_attention(q, k, v):
    s = jnp.where(jnp.tril(jnp.ones((q.shape[0], k.shape[0]), bool)), q @ k.T, -1e30)
    return jax.nn.softmax(s) @ v


def padded_attention(q, k, v, lengths):
    valid = jnp.arange(k.shape[0])[None, :] < lengths[:, None]
    s = jnp.where(valid, q @ k.T, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s) @ v


def gqa_attention(q, k, v):  # q [T, H, D], k and v [S, G, D]
    t, h, d = q.shape
    g = k.shape[1]
    s = jnp.einsum("tgrd,sgd->grts", q.reshape(t, g, h // g, d), k) / math.sqrt(d)
    return jnp.einsum("grts,sgd->tgrd", jax.nn.softmax(s, -1), v).reshape(t, h, d)


def gelu_mlp(x, w1, w2):
    return jax.nn.gelu(x @ w1, approximate=False) @ w2


def tanh_gelu_mlp(x, w1, w2):
    return jax.nn.gelu(x @ w1, approximate=True) @ w2


def swiglu_mlp(x, w1, w2):
    return (jax.nn.silu(x @ w1) * (x @ w1[:, ::-1])) @ w2


def layer_norm(x, scale, bias):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def rms_norm(x, scale, bias):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale + bias


def transformer_block(x, p):
    t, dm = x.shape
    h = rms_norm(x, p["g1"], 0.0)
    q, k, v = (jnp.einsum("td,de->te", h, p[n]).reshape(t, 2, dm // 2) for n in "qkv")
    s = jnp.einsum("thd,shd->hts", q, k) / math.sqrt(dm // 2)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    a = jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), v).reshape(t, dm)
    x = x + a @ p["o"]
    return x + jax.nn.gelu(rms_norm(x, p["g2"], 0.0) @ p["up"]) @ p["down"]


def with_unknown_ops(x, idx):
    return jnp.cumsum(jnp.exp(x[idx]), axis=0) + jnp.sort(x, axis=1)[idx]


T, S, D, F = 5, 7, 8, 16
QKV = (normal(T, D), normal(S, D, seed=1), normal(S, D, seed=2))
HEADS = (normal(T, 2, D), normal(S, 2, D, seed=1), normal(S, 2, D, seed=2))
MLP = (normal(T, D), normal(D, F, seed=1) / 3, normal(F, D, seed=2) / 3)
NORM = (normal(T, D), normal(D, seed=1), normal(D, seed=2))
BLOCK = (
    normal(T, D),
    {n: normal(D, D, seed=i) / 3 for i, n in enumerate(["q", "k", "v", "o"])}
    | {"up": normal(D, F, seed=5) / 3, "down": normal(F, D, seed=6) / 3}
    | {"g1": normal(D, seed=7), "g2": normal(D, seed=8)},
)
SUITE = [
    (softmax_attention, QKV),
    (handwritten_attention, QKV),
    (xla_attention, HEADS),
    (xla_causal_attention, (HEADS[0], HEADS[0] * 0.5, HEADS[2][:T])),
    (iota_causal_attention, (QKV[0], QKV[1][:T], QKV[2][:T])),
    (tril_causal_attention, (QKV[0], QKV[1][:T], QKV[2][:T])),
    (padded_attention, (*QKV[:2], QKV[2], jnp.array([1, 3, 7, 2, 5], jnp.int32))),
    (gqa_attention, (normal(T, 4, D), HEADS[1], HEADS[2])),
    (gelu_mlp, MLP),
    (tanh_gelu_mlp, MLP),
    (swiglu_mlp, (MLP[0], normal(D, D, seed=3), normal(D, D, seed=4))),
    (layer_norm, NORM),
    (rms_norm, NORM),
    (transformer_block, BLOCK),
    (with_unknown_ops, (normal(T, D), jnp.array([3, 0, 4, 4], jnp.int32))),
]
IDS = [f.__name__ for f, _ in SUITE]


@pytest.mark.parametrize(("fn", "args"), SUITE, ids=IDS)
def test_einfuse_jit_equals_jax_jit(fn, args):
    compiled = jit(fn)
    assert_trees_close(compiled(*args), jax.jit(fn)(*args))
    traced = compiled.trace(*args)
    assert traced.program.regions and not traced.runner.fallbacks  # emitted, not plain JAX


# The FuseMax pipeline keeps every function's values: attention spellings (and the block's
# attention) are rewritten to the 1-pass form, everything else is left as it was. Tile 4
# does not divide the 7 keys, so padding masks are exercised too.
FUSED = {f.__name__ for f, _ in SUITE if "attention" in f.__name__} | {"transformer_block"}


@pytest.mark.parametrize("pipeline", ["fuse", "fuse{tile=4}"])
@pytest.mark.parametrize(("fn", "args"), SUITE, ids=IDS)
def test_fuse_pipeline_keeps_every_suite_function_equal_to_jax_jit(fn, args, pipeline):
    compiled = jit(fn, passes=pipeline)
    assert_trees_close(compiled(*args), jax.jit(fn)(*args))
    running_max = "= max(RM[" in compiled.cascade(*args)
    assert running_max == (fn.__name__ in FUSED)


def float_argnums(args) -> tuple[int, ...]:
    leaves = [jax.tree_util.tree_leaves(a) for a in args]
    return tuple(i for i, ls in enumerate(leaves) if jnp.issubdtype(ls[0].dtype, jnp.floating))


def pick(*names: str) -> list:
    return [pytest.param(f, a, id=f.__name__) for f, a in SUITE if f.__name__ in names]


# Gradients compile two programs each, so a representative subset: softmax with its
# stop_gradient, an integer padding mask, a norm, a custom_jvp activation, a whole block.
@pytest.mark.parametrize(
    ("fn", "args"),
    pick("softmax_attention", "padded_attention", "layer_norm", "swiglu_mlp", "transformer_block"),
)
def test_grad_through_einfuse_jit_equals_jax(fn, args):
    argnums = float_argnums(args)
    compiled = jit(fn)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(compiled(*a))), argnums))(*args)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums))(*args)
    assert_trees_close(got, want, tol=2e-5)


@pytest.mark.parametrize(
    ("fn", "args"),
    pick("softmax_attention", "tril_causal_attention", "layer_norm", "with_unknown_ops"),
)
def test_vmap_of_einfuse_jit_equals_vmap_of_the_function(fn, args):
    batched = jnp.stack([args[0], args[0] * 0.5 + 1.0, -args[0]])
    in_axes = (0,) + (None,) * (len(args) - 1)
    got = jax.vmap(jit(fn), in_axes)(batched, *args[1:])
    want = jax.vmap(fn, in_axes)(batched, *args[1:])
    assert_trees_close(got, want)


# --------------------------------------------------------------------------- calling convention
def test_pytrees_in_and_out_keep_their_structure():
    def f(params, xs):
        y = xs[0] @ params["w"] + params["b"]
        return {"y": y, "stats": (jnp.max(y), jnp.sum(xs[1]))}

    args = ({"w": normal(D, F), "b": normal(F, seed=1)}, (normal(T, D, seed=2), normal(3, seed=3)))
    assert_trees_close(jit(f)(*args), jax.jit(f)(*args))


def test_keyword_arguments_are_traced_like_positional_ones():
    def f(x, *, scale):
        return jnp.exp(x) * scale

    x = normal(T)
    assert_trees_close(jit(f)(x, scale=normal(T, seed=1)), f(x, scale=normal(T, seed=1)))


def test_static_argument_selects_the_program():
    def f(q, k, v, causal):
        s = q @ k.T
        if causal:
            s = jnp.where(jnp.tril(jnp.ones(s.shape, bool)), s, -jnp.inf)
        return jax.nn.softmax(s) @ v

    compiled = jit(f, static_argnames="causal")
    q, k, v = QKV[0], QKV[1][:T], QKV[2][:T]
    for causal in (True, False):
        want = jax.jit(f, static_argnames="causal")(q, k, v, causal=causal)
        assert_trees_close(compiled(q, k, v, causal=causal), want)
    assert compiled.cache_info().misses == 2
    assert_trees_close(compiled(q, k, v, True), f(q, k, v, True))  # static by position too
    assert compiled.cache_info().misses == 3  # like jax.jit, keyword and position key apart


def test_cache_hits_on_same_shapes_and_misses_on_new_ones():
    compiled = jit(softmax_attention)
    compiled(*QKV)
    compiled(*(x + 1.0 for x in QKV))
    assert compiled.cache_info()[:2] == (1, 1)
    compiled(QKV[0][:3], *QKV[1:])
    assert compiled.cache_info()[:2] == (1, 2)
    compiled(*(x.astype(jnp.bfloat16) for x in QKV))
    assert compiled.cache_info()[:2] == (1, 3)


def test_decorator_forms_both_work():
    @jit
    def plain(x):
        return jnp.tanh(x)

    @jit(passes=None, target="cpu")
    def configured(x):
        return jnp.tanh(x)

    x = normal(4)
    assert_trees_close(plain(x), jnp.tanh(x))
    assert_trees_close(configured(x), jnp.tanh(x))
    assert plain.__name__ == "plain"


def test_passes_run_on_every_region_and_keep_the_values():
    q, k, v = normal(32, D), normal(64, D, seed=1), normal(64, D, seed=2)
    compiled = jit(softmax_attention, passes="fuse{tile=16}")
    assert_trees_close(compiled(q, k, v), jax.jit(softmax_attention)(q, k, v))
    text = compiled.cascade(q, k, v)
    assert "partition " in text and "= max(RM[" in text  # a running max: fused
    history = compiled.trace(q, k, v).pass_history[0]
    names = [name for name, _ in history]  # after the canonical form: fuse's rewrites, then fuse
    assert names[-1] == "fuse{tile=16}" and names[1].startswith("fuse{tile=16}: partition ")


def test_donated_arguments_are_accepted():
    compiled = jit(lambda x, y: jnp.exp(x) + y, donate_argnums=0)
    x, y = normal(4), normal(4, seed=1)
    want = jnp.exp(x) + y
    assert_trees_close(compiled(jnp.array(x), y), want)


def test_unhashable_static_argument_is_refused_like_jax_jit():
    compiled = jit(lambda x, cfg: x * len(cfg), static_argnums=1)
    with pytest.raises(ValueError, match="hashable"):
        compiled(normal(3), [1, 2])


def test_non_array_argument_is_refused_like_jax_jit():
    with pytest.raises(TypeError, match="abstract array"):
        jit(lambda x, name: x)(normal(3), "relu")


@pytest.mark.parametrize(
    ("options", "match"),
    [({"target": "fpga"}, "unknown target"), ({"passes": "nope"}, "unknown pass")],
)
def test_unsupported_options_raise_clear_errors(options, match):
    with pytest.raises(EinfuseError, match=match):
        jit(jnp.tanh, **options)


# --------------------------------------------------------------------------- inspection
def test_cascade_of_attention_shows_max_reduction_and_exp():
    text = jit(softmax_attention).cascade(*QKV)
    assert "= max(" in text and "exp(" in text
    assert "# opaque" not in text


def test_explain_lists_opaque_ops_with_their_source_line():
    compiled = jit(with_unknown_ops)
    text = compiled.explain(normal(T, D), jnp.array([3, 0], jnp.int32))
    assert f"cumsum at {__file__}:" in text and f"sort at {__file__}:" in text
    assert "region 0" in text and "HLO summary" in text and "fusions" in text


def test_lower_gives_stablehlo_and_compiles():
    lowered = jit(softmax_attention).lower(*QKV)
    assert "stablehlo" in lowered.as_text()
    assert_trees_close(lowered.compile()(*QKV), softmax_attention(*QKV))


@pytest.mark.parametrize(
    ("stage", "marker"), [("stablehlo", "stablehlo."), ("optimized", "HloModule")]
)
def test_hlo_text_at_each_stage(stage, marker):
    assert marker in jit(layer_norm).hlo(*NORM, stage=stage)


def test_trace_exposes_the_program_and_its_stages():
    traced = jit(functools.partial(layer_norm, bias=0.0)).trace(*NORM[:2])
    assert traced.program.regions and traced.jaxpr.jaxpr.eqns
    assert set(traced.seconds) == {"trace", "lift", "passes", "emit"}
