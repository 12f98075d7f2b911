"""A float64 NumPy run of ``examples.llama`` (a causal decoder with rotary positions) on
given kept tokens: the definition of token pruning for causal models."""

from __future__ import annotations

from typing import Any

import numpy as np

from examples import llama

TINY = llama.Config(vocab=32, dim=16, layers=2, heads=4, kv_heads=2, hidden=32)


def _np(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _rms(x: np.ndarray, w: Any, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * _np(w)


def _rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding of ``x[b, n, h, d]`` at the given (original) token positions."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, d, 2) / d)
    angles = positions[:, None] * freqs[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, -1)[None, :, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, -1)[None, :, None, :]
    rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def causal_reference(
    params: dict[str, Any], tokens: np.ndarray, cfg: llama.Config, kept: dict[int, np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits when, after layer ``i``'s attention, only the original positions ``kept[i]``
    (the same for every row) go on, at their original rotary positions, causal among
    themselves; and per layer the accumulated importance of the tokens present (attention
    received, each layer's divided by the number of queries that see the token)."""
    b, n = tokens.shape
    hd, kvh = cfg.head_dim, cfg.kv_heads
    x = _np(params["embed"])[tokens]
    pos = np.arange(n)
    acc, importances = np.zeros(n), []
    for i, p in enumerate(params["layers"]):
        n = len(pos)
        h = _rms(x, p["attn_norm"], cfg.eps)
        q = _rope((h @ _np(p["wq"])).reshape(b, n, cfg.heads, hd), pos, cfg.rope_theta)
        k = _rope((h @ _np(p["wk"])).reshape(b, n, kvh, hd), pos, cfg.rope_theta)
        v = (h @ _np(p["wv"])).reshape(b, n, kvh, hd)
        q = q.reshape(b, n, kvh, cfg.heads // kvh, hd)
        scores = np.einsum("bqhgd,bkhd->bhgqk", q, k) / np.sqrt(hd)
        scores = np.where(pos[:, None] >= pos[None, :], scores, np.finfo(np.float32).min)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        acc = acc + probs.sum(axis=(0, 1, 2, 3)) / (n - np.arange(n))
        importances.append(acc.copy())
        out = np.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, n, cfg.heads * hd)
        if i in kept:
            rows = np.searchsorted(pos, kept[i])
            x, out, acc, pos = x[:, rows], out[:, rows], acc[rows], pos[rows]
        x = x + out @ _np(p["wo"])
        h = _rms(x, p["mlp_norm"], cfg.eps)
        gate = h @ _np(p["w_gate"])
        x = x + (gate / (1 + np.exp(-gate)) * (h @ _np(p["w_up"]))) @ _np(p["w_down"])
    return _rms(x, params["norm"], cfg.eps) @ _np(params["out"]), importances
