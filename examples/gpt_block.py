"""A GPT-2-style transformer block in plain JAX, as a user writes it (no einfuse calls).

Pre-LayerNorm, one fused QKV projection, causal softmax attention (``-inf`` fill above the
diagonal), output projection, residual, LayerNorm, tanh-GELU MLP (4x), residual. Tests and
``benchmarks/gpt_block.py`` compile ``block`` with ``jax.jit`` and ``einfuse.jit`` and
compare programs, outputs and run time.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


def init_params(key: jax.Array, d: int, dtype: Any = jnp.float32) -> Params:
    """Random weights (scaled like GPT-2's init) and non-trivial norm gains and biases."""
    ks = jax.random.split(key, 8)

    def normal(k: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
        return (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    return {
        "ln1_g": 1 + normal(ks[0], (d,), 0.1),
        "ln1_b": normal(ks[1], (d,), 0.1),
        "w_qkv": normal(ks[2], (d, 3 * d), 1 / math.sqrt(d)),
        "b_qkv": normal(ks[3], (3 * d,), 0.02),
        "w_o": normal(ks[4], (d, d), 1 / math.sqrt(d)),
        "ln2_g": 1 + normal(ks[5], (d,), 0.1),
        "ln2_b": normal(ks[6], (d,), 0.1),
        "w_fc": normal(ks[7], (d, 4 * d), 1 / math.sqrt(d)),
        "w_proj": normal(ks[0], (4 * d, d), 1 / math.sqrt(4 * d)),
    }


def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * g + b


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``q, k, v``: [batch, heads, seq, head_dim]; softmax over keys at or before the query."""
    s = q.shape[-2]
    scores = jnp.einsum("bhqe,bhke->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((s, s), dtype=bool))
    scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.einsum("bhqk,bhke->bhqe", jax.nn.softmax(scores, axis=-1), v)


def block(params: Params, x: jax.Array, heads: int = 4) -> jax.Array:
    """One block: ``x`` [batch, seq, d] -> [batch, seq, d]."""
    b, s, d = x.shape
    h = layer_norm(x, params["ln1_g"], params["ln1_b"])
    qkv = h @ params["w_qkv"] + params["b_qkv"]
    q, k, v = (
        t.reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3) for t in jnp.split(qkv, 3, -1)
    )
    o = causal_attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, s, d)
    x = x + o @ params["w_o"]
    h = layer_norm(x, params["ln2_g"], params["ln2_b"])
    return x + jax.nn.gelu(h @ params["w_fc"]) @ params["w_proj"]


def make_inputs(
    batch: int = 2, seq: int = 1024, d: int = 256, dtype: Any = jnp.float32, seed: int = 0
) -> tuple[Params, jax.Array]:
    kp, kx = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (batch, seq, d), jnp.float32).astype(dtype)
    return init_params(kp, d, dtype), x
