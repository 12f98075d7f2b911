"""The cascade library: every cascade verifies, prints and parses back, and its reference
interpretation equals an independent NumPy implementation in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

from einfuse.backends.reference import interpret
from einfuse.einsum_cascade import (
    FORMS,
    LibraryError,
    attention,
    gelu_mlp,
    layernorm,
    matmul_chain,
    rmsnorm,
    swiglu_mlp,
    transformer_block,
)
from einfuse.ir import Cascade, parse, verify
from einfuse.passes.pass_count import pass_counts

Array = np.ndarray
TOL = 1e-12
LAYOUTS = {
    "plain": dict(batch=False, heads=False),
    "batch_heads": dict(batch=True, heads=True),
    "gqa": dict(batch=True, heads=True, kv_groups=2),
}


# --------------------------------------------------------------------------- NumPy side
erf = np.vectorize(math.erf, otypes=[np.float64])


def nonzero(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
    """Random values bounded away from 0, so no term of a check can vanish by accident."""
    return rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)


def random_inputs(c: Cascade, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, Array]:
    return {t.name: nonzero(rng, c.tensor_shape(t.name, sizes)) for t in c.inputs}


def softmax_attention(q: Array, k: Array, v: Array, causal: bool, scale: float) -> Array:
    """Textbook attention on ``q[..., P, E]``, ``k[..., M, E]``, ``v[..., M, F]``."""
    s = q @ np.swapaxes(k, -1, -2) * scale
    if causal:
        p, m = s.shape[-2:]
        s = np.where(np.arange(m)[None, :] <= np.arange(p)[:, None], s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ v


def library_attention_ref(
    q: Array, k: Array, v: Array, *, causal: bool, scale: float, groups: int | None
) -> Array:
    """The library's layout (``Q[b, h, (g,) e, p]``, ``K[b, h, e, m]``) through textbook attention.

    Query heads are flattened as ``h*G + g`` and kv heads shared by ``np.repeat``, as
    Hugging Face's ``repeat_kv`` does; the result is unflattened again.
    """
    if groups is not None:
        lead = q.shape[:-3]
        q = q.reshape(*lead[:-1], lead[-1] * groups, *q.shape[-2:])
        k, v = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
    out = softmax_attention(
        np.swapaxes(q, -1, -2), np.swapaxes(k, -1, -2), np.swapaxes(v, -1, -2), causal, scale
    )
    out = np.swapaxes(out, -1, -2)  # [..., F, P]
    if groups is not None:
        out = out.reshape(*out.shape[:-3], out.shape[-3] // groups, groups, *out.shape[-2:])
    return out


def np_layernorm(x: Array, w: Array, b: Array, eps: float) -> Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_rmsnorm(x: Array, w: Array, eps: float) -> Array:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_gelu(u: Array) -> Array:
    return 0.5 * u * (1 + erf(u / math.sqrt(2)))


def np_silu(u: Array) -> Array:
    return u / (1 + np.exp(-u))


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def np_block(
    kind: str, t: dict[str, Array], *, heads: int, groups: int, causal: bool, eps: float
) -> Array:
    """A pre-norm block on ``x[B, P, D]`` with flattened weight matrices, HF style."""
    x = t["X"]
    B, P, D = x.shape
    llama = kind == "llama"

    def norm(y: Array, n: str) -> Array:
        return (
            np_rmsnorm(y, t[f"{n}_W"], eps)
            if llama
            else np_layernorm(y, t[f"{n}_W"], t[f"{n}_BIAS"], eps)
        )

    def proj(y: Array, w: Array, bias_name: str, n_heads: int) -> Array:
        """[B, P, D] @ [D, n*E] -> [B, n, P, E]."""
        out = y @ w.reshape(D, -1)
        if not llama:
            out = out + t[bias_name].reshape(-1)
        return out.reshape(B, P, n_heads, -1).transpose(0, 2, 1, 3)

    xn = norm(x, "N1")
    q = proj(xn, t["WQ"], "WQ_B", heads * groups)
    k = proj(xn, t["WK"], "WK_B", heads)
    v = proj(xn, t["WV"], "WV_B", heads)
    if llama:
        cos, sin = t["COS"], t["SIN"]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    o = softmax_attention(q, k, v, causal, 1 / math.sqrt(q.shape[-1]))
    o = o.transpose(0, 2, 1, 3).reshape(B, P, -1) @ t["WO"].reshape(-1, D)
    h1 = x + o + (0 if llama else t["WO_B"])
    xn2 = norm(h1, "N2")
    if llama:
        mlp = (np_silu(xn2 @ t["W_GATE"]) * (xn2 @ t["W_UP"])) @ t["W_DOWN"]
    else:
        mlp = np_gelu(xn2 @ t["W1"] + t["W1_B"]) @ t["W2"] + t["W2_B"]
    return h1 + mlp


def check(
    c: Cascade, inputs: dict[str, Array], expected: Array, sizes: dict[str, int] | None = None
) -> None:
    out = interpret(c, inputs, sizes)[c.outputs[0]]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------- attention
def attention_sizes(layout: dict[str, object], p: int, m: int) -> dict[str, int]:
    sizes = {"e": 4, "f": 3, "p": p, "m": m}
    if layout.get("batch"):
        sizes["b"] = 2
    if layout.get("heads"):
        sizes["h"] = 2
    if layout.get("kv_groups"):
        sizes["g"] = layout["kv_groups"]
    return sizes


def run_attention(
    form: str,
    causal: bool,
    layout: dict[str, object],
    p: int,
    m: int,
    tile: int | None,
    seed: int,
    scale: float | None = None,
) -> None:
    c = attention(form, causal=causal, tile=tile, scale=scale, **layout)
    sizes = attention_sizes(layout, p, m)
    t = random_inputs(c, sizes, np.random.default_rng(seed))
    expected = library_attention_ref(
        t["Q"],
        t["K"],
        t["V"],
        causal=causal,
        groups=layout.get("kv_groups"),
        scale=1 / math.sqrt(sizes["e"]) if scale is None else scale,
    )
    check(c, t, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("form", FORMS)
def test_attention_forms_match_numpy_softmax(form: str, causal: bool, layout: str) -> None:
    tile = 3 if form in ("2pass", "1pass") else None
    run_attention(form, causal, LAYOUTS[layout], p=5, m=8, tile=tile, seed=len(form) + causal)


@pytest.mark.parametrize(("p", "m"), [(5, 8), (8, 5)])
@pytest.mark.parametrize("tile", [3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("form", ["2pass", "1pass"])
def test_partitioned_attention_is_exact_whether_or_not_the_tile_divides_m(
    form: str, causal: bool, tile: int, p: int, m: int
) -> None:
    run_attention(form, causal, LAYOUTS["gqa"], p=p, m=m, tile=tile, seed=7 * tile + p)


def test_attention_with_an_explicit_scale_uses_it() -> None:
    run_attention("1pass", True, LAYOUTS["batch_heads"], p=5, m=8, tile=3, seed=3, scale=0.3)
    assert "* 0.3" in str(attention("3pass", scale=0.3))


def test_attention_scale_is_a_constant_once_e_is_bound() -> None:
    assert "QK[b, h, m, p] = Q[b, h, e, p] * K[b, h, e, m] * 0.5" in str(attention(e=4))
    assert "* rsqrt(E)" in str(attention())


def test_symbolic_tile_is_bound_at_interpretation() -> None:
    c = attention("1pass", causal=True)
    assert "m1=ceiling(M/M0)" in str(c)
    sizes = {"b": 1, "h": 2, "e": 4, "f": 3, "p": 5, "m": 7, "m0": 3}
    t = random_inputs(c, sizes, np.random.default_rng(11))
    expected = library_attention_ref(t["Q"], t["K"], t["V"], causal=True, scale=0.5, groups=None)
    check(c, t, expected, sizes={"m0": 3})


def test_concrete_sizes_are_recorded_with_the_tile() -> None:
    c = attention("2pass", kv_groups=2, tile=3, b=1, h=2, e=4, f=3, p=5, m=8)
    assert dict(c.sizes) == dict(b=1, h=2, e=4, f=3, p=5, m=8, g=2, m1=3, m0=3)
    assert c.partitions[0].tile == 3
    sizes = attention_sizes(LAYOUTS["gqa"], 5, 8) | {"b": 1}
    t = random_inputs(c, sizes, np.random.default_rng(5))
    check(c, t, library_attention_ref(t["Q"], t["K"], t["V"], causal=False, scale=0.5, groups=2))


def test_padding_mask_appears_only_when_the_tile_may_not_divide_m() -> None:
    assert "MBQK" not in str(attention("1pass", tile=4, m=8))
    assert "m1 * M0 + m0 < M" in str(attention("1pass", tile=3, m=8))
    assert "m1 * M0 + m0 < M" in str(attention("1pass", tile=4))  # M symbolic


def test_attention_forms_take_their_named_number_of_passes() -> None:
    expected = {"3pass": 3, "deferred": 2, "2pass": 2, "1pass": 1}
    for form, passes in expected.items():
        for causal in (False, True):
            assert pass_counts(attention(form, causal=causal))["m"] == passes, (form, causal)


def test_gqa_query_heads_carry_the_group_rank() -> None:
    c = attention(kv_groups=4)
    assert c.input_decl("Q").ranks == ("b", "h", "g", "e", "p")
    assert c.input_decl("K").ranks == ("b", "h", "e", "m")
    assert c.tensor_ranks("AV") == ("b", "h", "g", "f", "p")
    assert c.size("g") == 4


# --------------------------------------------------------------------------- other layers
@pytest.mark.parametrize("batch", [True, False])
def test_rmsnorm_matches_numpy(batch: bool) -> None:
    c = rmsnorm(eps=1e-5, batch=batch)
    sizes = {"b": 2, "p": 3, "d": 8}
    t = random_inputs(c, sizes, np.random.default_rng(1))
    check(c, t, np_rmsnorm(t["X"], t["W"], 1e-5))


def test_layernorm_matches_numpy() -> None:
    c = layernorm(eps=1e-5, d=8)
    t = random_inputs(c, {"b": 2, "p": 3, "d": 8}, np.random.default_rng(2))
    check(c, t, np_layernorm(t["X"], t["W"], t["BIAS"], 1e-5))


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_matches_numpy(bias: bool) -> None:
    c = gelu_mlp(bias=bias)
    t = random_inputs(c, {"b": 2, "p": 3, "d": 4, "i": 6}, np.random.default_rng(3))
    u = t["X"] @ t["W1"] + (t["W1_B"] if bias else 0)
    check(c, t, np_gelu(u) @ t["W2"] + (t["W2_B"] if bias else 0))


def test_swiglu_mlp_matches_numpy() -> None:
    c = swiglu_mlp()
    t = random_inputs(c, {"b": 2, "p": 3, "d": 4, "i": 6}, np.random.default_rng(4))
    check(c, t, (np_silu(t["X"] @ t["W_GATE"]) * (t["X"] @ t["W_UP"])) @ t["W_DOWN"])


@pytest.mark.parametrize("n", [1, 3])
def test_matmul_chain_matches_numpy(n: int) -> None:
    c = matmul_chain(n)
    assert len(c.einsums) == n
    t = random_inputs(c, {f"i{k}": 2 + k for k in range(n + 2)}, np.random.default_rng(n))
    expected = t["A0"]
    for k in range(1, n + 1):
        expected = expected @ t[f"A{k}"]
    check(c, t, expected)


# --------------------------------------------------------------------------- blocks
BLOCK_SIZES = {"b": 2, "p": 5, "d": 8, "h": 2, "e": 4, "f": 4, "i": 6}


@pytest.mark.parametrize(
    ("kind", "form", "tile", "kv_groups", "g"),
    [
        ("bert", "3pass", None, None, None),
        ("bert", "1pass", 4, None, None),
        ("bert", "2pass", 3, 2, 2),  # BERT with grouped heads, on request
        ("llama", "3pass", None, 2, 2),
        ("llama", "1pass", 3, 2, 2),
        ("llama", "2pass", 2, 1, 1),
        ("llama", "deferred", None, None, 3),  # symbolic G, bound by the weights' shapes
    ],
)
def test_transformer_block_matches_numpy(
    kind: str, form: str, tile: int | None, kv_groups: int | None, g: int | None
) -> None:
    c = transformer_block(kind, attention_form=form, tile=tile, kv_groups=kv_groups)
    sizes = BLOCK_SIZES | ({"g": g} if g else {})
    t = random_inputs(c, sizes, np.random.default_rng(len(kind) + len(form)))
    llama = kind == "llama"
    eps = 1e-6 if llama else 1e-12
    expected = np_block(kind, t, heads=2, groups=g or 1, causal=llama, eps=eps)
    check(c, t, expected)


def test_llama_block_rotates_queries_and_keys_by_half_the_head_dim() -> None:
    c = transformer_block("llama", e=4, g=2)
    assert c.size("eh") == 2
    q = next(e for e in c.einsums if e.output == "Q")
    assert str(q.expr) == (
        "QP[b, h, g, e, p] * COS[p, e] + (QP[b, h, g, e-EH, p] - QP[b, h, g, e+EH, p]) * SIN[p, e]"
    )
    assert c.input_decl("COS").ranks == ("p", "e")


def test_bert_block_without_batch_is_noncausal_by_default() -> None:
    c = transformer_block("bert", batch=False)
    assert "MQK" not in str(c)
    sizes = {k: v for k, v in BLOCK_SIZES.items() if k != "b"}
    t = random_inputs(c, sizes, np.random.default_rng(9))
    expected = np_block(
        "bert",
        {k: v[None] if k == "X" else v for k, v in t.items()},
        heads=2,
        groups=1,
        causal=False,
        eps=1e-12,
    )[0]
    check(c, t, expected)


# --------------------------------------------------------------------------- every cascade
def every_cascade() -> list[Cascade]:
    out = [
        attention(f, causal=c, tile=3 if f in ("2pass", "1pass") else None, **LAYOUTS[k])
        for f in FORMS
        for c in (False, True)
        for k in LAYOUTS
    ]
    out += [rmsnorm(), layernorm(), gelu_mlp(), gelu_mlp(bias=False), swiglu_mlp(), matmul_chain(4)]
    # e is bound: the text form's size parser reads a bare "E" (in eh=E/2) as Euler's number.
    out += [
        transformer_block(k, attention_form=f, tile=4 if f in ("2pass", "1pass") else None, e=4)
        for k in ("bert", "llama")
        for f in FORMS
    ]
    return out


def test_every_library_cascade_verifies_and_round_trips_through_text() -> None:
    for c in every_cascade():
        verify(c)
        assert parse(str(c)) == c, str(c)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: attention("4pass"), "unknown attention form '4pass'"),
        (lambda: transformer_block(attention_form="flash"), "unknown attention form 'flash'"),
        (lambda: attention(kv_groups=2, heads=False), "needs heads"),
        (lambda: attention(n=3), "no rank 'n'"),
        (lambda: attention("1pass", tile=4, m1=2), "m1 is set by tile"),
        (lambda: attention("3pass", tile=4), "tile applies to the forms"),
        (lambda: attention("1pass", tile=0), "tile must be a positive int"),
        (lambda: attention(p=0), "must be positive"),
        (lambda: attention(kv_groups=2, g=2), "g is set by kv_groups"),
        (lambda: transformer_block("gpt"), "unknown kind 'gpt'"),
        (lambda: transformer_block("llama", e=5), "need an even e"),
        (lambda: transformer_block("bert", m=4), "m is set by p"),
        (lambda: matmul_chain(0), "must be an int >= 1"),
    ],
)
def test_library_refuses_what_it_cannot_build(call, message: str) -> None:
    with pytest.raises(LibraryError, match=message):
        call()
