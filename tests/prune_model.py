"""A tiny random MiniLM (the real ``examples.minilm.encode``, small random weights) and a
float64 NumPy encoder that runs it on given kept tokens: the definition of token pruning."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.special import erf

from examples.minilm import MiniLMConfig

VOCAB = 40


def tiny_params(seed: int, layers: int, hidden: int = 8, heads: int = 2) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def arr(*shape: int, scale: float = 0.5) -> jnp.ndarray:
        return jnp.asarray(rng.normal(0, scale, shape).astype(np.float32))

    def dense(i: int, o: int) -> dict[str, Any]:
        return {"w": arr(i, o), "b": arr(o, scale=0.1)}

    def ln() -> dict[str, Any]:
        return {"scale": 1 + arr(hidden, scale=0.1), "bias": arr(hidden, scale=0.1)}

    layer = lambda: {  # noqa: E731
        "query": dense(hidden, hidden),
        "key": dense(hidden, hidden),
        "value": dense(hidden, hidden),
        "attn_out": dense(hidden, hidden),
        "attn_ln": ln(),
        "mlp_in": dense(hidden, 2 * hidden),
        "mlp_out": dense(2 * hidden, hidden),
        "mlp_ln": ln(),
    }
    return {
        "config": MiniLMConfig(num_heads=heads, layer_norm_eps=1e-12, hidden_size=hidden),
        "embeddings": {
            "word": arr(VOCAB, hidden),
            "position": arr(64, hidden),
            "token_type": arr(2, hidden),
            "ln": ln(),
        },
        "layers": [layer() for _ in range(layers)],
    }


def tiny_tokens(seed: int, batch: int, seq: int, lengths: list[int]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(1, VOCAB, (batch, seq)).astype(np.int32)
    mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids * mask, mask


def _np(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _ln(x: np.ndarray, p: dict[str, Any], eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _np(p["scale"]) + _np(p["bias"])


def _dense(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    return x @ _np(p["w"]) + _np(p["b"])


def pruned_reference(
    params: dict[str, Any], ids: np.ndarray, mask: np.ndarray, kept: dict[int, np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Embeddings when, after layer ``i``'s attention, only the original positions
    ``kept[i][b]`` of each row go on (every later op runs on those rows); and per layer the
    accumulated importance of the tokens present, to check ``kept`` is its top-k."""
    out, importances, _ = reference(params, ids, mask, kept, {})
    return out, importances


def reference(
    params: dict[str, Any],
    ids: np.ndarray,
    mask: np.ndarray,
    kept: dict[int, np.ndarray],
    heads_kept: dict[int, np.ndarray],
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``pruned_reference`` with head pruning too: from layer ``i`` on, only the heads
    ``heads_kept[i]`` (original indices) have nonzero outputs. Also returns per layer the
    accumulated head importance (sum of |head output|), to check ``heads_kept`` is its top-k."""
    cfg, emb = params["config"], params["embeddings"]
    eps, heads = cfg.layer_norm_eps, cfg.num_heads
    batch, seq = ids.shape
    x = _np(emb["word"])[ids] + _np(emb["position"])[:seq][None] + _np(emb["token_type"])[0]
    x = _ln(x, emb["ln"], eps)
    m = mask.astype(np.float64)
    pos = np.broadcast_to(np.arange(seq), (batch, seq))
    acc = np.zeros((batch, seq))
    importances, head_acc, head_importances = [], np.zeros(heads), []
    alive = np.ones(heads)
    for i, layer in enumerate(params["layers"]):
        n, hd = x.shape[1], x.shape[2] // heads
        q, k, v = (
            _dense(x, layer[w]).reshape(batch, n, heads, hd) for w in ("query", "key", "value")
        )
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores + ((1 - m) * np.finfo(np.float32).min)[:, None, None, :]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        computed = probs * alive[None, :, None, None]
        real = computed.sum(axis=(1, 2)) > 0  # queries that receive attention: not padding
        acc = acc + np.einsum("bhqk,bq->bk", computed, real)
        importances.append(acc.copy())
        ctx = np.einsum("bhqk,bkhd->bqhd", probs, v) * alive[:, None]
        head_acc = head_acc + np.abs(ctx).sum(axis=(0, 1, 3))
        head_importances.append(head_acc.copy())
        if i in heads_kept:
            alive = np.isin(np.arange(heads), heads_kept[i]).astype(np.float64)
        ctx = (ctx * alive[:, None]).reshape(batch, n, heads * hd)
        if i in kept:
            rows = [np.searchsorted(pos[b], kept[i][b]) for b in range(batch)]
            x, ctx, m, acc, pos = (
                np.stack([t[b, rows[b]] for b in range(batch)]) for t in (x, ctx, m, acc, pos)
            )
        x = _ln(x + _dense(ctx, layer["attn_out"]), layer["attn_ln"], eps)
        h = _dense(x, layer["mlp_in"])
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = _ln(x + _dense(h, layer["mlp_out"]), layer["mlp_ln"], eps)
    pooled = np.einsum("bsh,bs->bh", x, m) / np.maximum(m.sum(1, keepdims=True), 1e-9)
    out = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return out, importances, head_importances
