"""A Llama-style decoder in plain JAX, written the way model code writes it.

Grouped-query attention, rotary position embeddings, RMSNorm, a SwiGLU MLP, a causal mask
filled with ``jnp.finfo(dtype).min`` and a softmax that runs in float32 on bfloat16 scores
(``softmax(s.astype(float32)).astype(bfloat16)``, as Llama, Gemma and BERT code does). The
weights are random (nothing is downloaded): the model is for compiling and comparing, not for
reading its text. ``forward(params, tokens)`` returns the logits of every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Config:
    vocab: int = 512
    dim: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 512
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def init_params(cfg: Config, seed: int = 0, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """Random weights scaled as at initialization, so activations stay O(1) through layers."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), dtype)

    hd = cfg.head_dim
    layers = [
        {
            "attn_norm": jnp.asarray(1 + 0.1 * rng.standard_normal(cfg.dim), dtype),
            "wq": w(cfg.dim, cfg.heads * hd),
            "wk": w(cfg.dim, cfg.kv_heads * hd),
            "wv": w(cfg.dim, cfg.kv_heads * hd),
            "wo": w(cfg.heads * hd, cfg.dim),
            "mlp_norm": jnp.asarray(1 + 0.1 * rng.standard_normal(cfg.dim), dtype),
            "w_gate": w(cfg.dim, cfg.hidden),
            "w_up": w(cfg.dim, cfg.hidden),
            "w_down": w(cfg.hidden, cfg.dim),
        }
        for _ in range(cfg.layers)
    ]
    return {
        "embed": jnp.asarray(rng.standard_normal((cfg.vocab, cfg.dim)), dtype),
        "layers": layers,
        "norm": jnp.ones(cfg.dim, dtype),
        "out": w(cfg.dim, cfg.vocab),
    }


def cast_params(params: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """In float32, as Llama does, then back to the activations' dtype."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return (h.astype(x.dtype)) * weight


def rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of ``x[b, s, h, d]`` (the rotate-half form)."""
    s, d = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.arange(s, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[None, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[None, :, None, :].astype(x.dtype)
    half = d // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(x: jax.Array, p: dict[str, Any], cfg: Config) -> jax.Array:
    b, s, _ = x.shape
    hd, kvh = cfg.head_dim, cfg.kv_heads
    group = cfg.heads // kvh
    q = rope((x @ p["wq"]).reshape(b, s, cfg.heads, hd), cfg.rope_theta)
    k = rope((x @ p["wk"]).reshape(b, s, kvh, hd), cfg.rope_theta)
    v = (x @ p["wv"]).reshape(b, s, kvh, hd)
    q = q.reshape(b, s, kvh, group, hd)  # grouped-query: each K/V head serves `group` queries
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) / jnp.sqrt(jnp.asarray(hd, x.dtype))
    causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, s, cfg.heads * hd)
    return out @ p["wo"]


def mlp(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def forward(params: dict[str, Any], tokens: jax.Array, cfg: Config = Config()) -> jax.Array:
    """Logits ``[batch, seq, vocab]`` of the decoder for ``tokens[batch, seq]``."""
    x = params["embed"][tokens]
    for p in params["layers"]:
        x = x + attention(rms_norm(x, p["attn_norm"], cfg.eps), p, cfg)
        x = x + mlp(rms_norm(x, p["mlp_norm"], cfg.eps), p)
    return rms_norm(x, params["norm"], cfg.eps) @ params["out"]


def greedy_agreement(a: jax.Array, b: jax.Array) -> float:
    """Share of positions whose next-token prediction (argmax of the logits) agrees."""
    return float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1)))
