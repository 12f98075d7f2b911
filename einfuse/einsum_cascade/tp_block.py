"""The Llama block of ``block.py`` in tensor-parallel form: device ranks over mesh axis ``tp``.

Megatron's split, written with device ranks (``device x on tp, y on tp``, both of size ``X``,
the TP degree): the residual stream ``X[p, d]``, the norms and the residuals are replicated;
the QKV and gate/up projections are column-parallel (device ``x`` holds kv heads
``x*H .. x*H+H-1`` and FFN columns ``x*I .. x*I+I-1``, so the block's ``h`` and ``i`` are the
*local* ranks, of sizes ``heads/tp`` and ``ffn/tp``); attention runs per local head; the output
and down projections are row-parallel and write partial sums ``OP[x, p, d]`` / ``MOP[x, p, d]``
that an all-reduce (a sum over the device rank ``y``) makes whole::

    OP[x, p, d] = AV[x, h, g, f, p] * WO[x, h, g, f, d]
    O[p, d] = OP[y, p, d]                                   (all-reduce)

Weights are ``WQ[x, d, h, g, e]``, ``WK``/``WV[x, d, h, e|f]``, ``WO[x, h, g, f, d]``,
``W_GATE``/``W_UP[x, d, i]``, ``W_DOWN[x, i, d]``; ``shard_weights`` reshards the unsharded
block's. Tokens are flat (``batch=False`` of ``transformer_block``): TokenWeave and T3 split
and chunk the token rank ``p``. Rotary embeddings are optional (``rotary=False`` drops the
``COS``/``SIN`` inputs and reads ``Q = QP``, ``K = KP`` directly).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from einfuse.einsum_cascade.attention import (
    HeadLayout,
    LibraryError,
    attention_lines,
    build_cascade,
    check_sizes,
    positive_int,
    scale_text,
)
from einfuse.einsum_cascade.block import DEFAULT_EPS, _half, _rotary
from einfuse.einsum_cascade.norms import rmsnorm_lines, token_lead
from einfuse.ir import Cascade, default_size

_LAYOUT = HeadLayout(batch=False, heads=True, groups=True)
_SHARDED = {  # weight -> the axis of the unsharded weight that splits into (tp, local)
    "WQ": 1,
    "WK": 1,
    "WV": 1,
    "WO": 0,
    "W_GATE": 1,
    "W_UP": 1,
    "W_DOWN": 0,
}


def tp_block(
    tp: int,
    *,
    kv_groups: int | None = None,
    attention_form: str = "3pass",
    causal: bool = True,
    rotary: bool = True,
    eps: float | None = None,
    **sizes: int,
) -> Cascade:
    """The tensor-parallel Llama block over ``tp`` devices.

    ``sizes`` binds ``p, d, h, g, e, f, i`` with ``h`` (kv heads) and ``i`` (FFN width) the
    *global* sizes; each must divide by ``tp``. Only unpartitioned attention forms
    (``3pass``, ``deferred``): the partitioned ones tile ``m``, which ``split-tokens`` and
    ``chunk-collective`` leave alone anyway.
    """
    if not positive_int(tp):
        raise LibraryError(f"tp_block: tp (the TP degree) must be a positive int, got {tp!r}")
    if attention_form not in ("3pass", "deferred"):
        raise LibraryError(
            f"tp_block: attention_form {attention_form!r}; the TP block takes 3pass or deferred"
        )
    derived = {"m": "p (self-attention)", "eh": "e", "x": "tp", "y": "tp"}
    if kv_groups is not None:
        derived["g"] = "kv_groups"
    given = check_sizes("tp_block", sizes, ("p", "d", "h", "g", "e", "f", "i"), derived)
    for rank in ("h", "i"):
        size = given.get(rank)
        if size is None or not isinstance(size, int) or size % tp:
            raise LibraryError(
                f"tp_block: {rank}={size} must be an int divisible by tp={tp} (each device holds "
                f"{rank}/tp of them)"
            )
        given[rank] = size // tp
    if kv_groups is not None:
        given["g"] = kv_groups
    given["m"] = given.get("p", default_size("p"))
    if rotary:
        given["eh"] = _half(given.get("e", default_size("e")))
    given |= {"x": tp, "y": tp}
    attn = attention_lines(
        attention_form, _LAYOUT, causal=causal, scale=scale_text(None, given.get("e")), pad=False
    )
    lines = _lines([re.sub(r"\[h, ", "[x, h, ", a) for a in attn], rotary, eps)
    order = ("p", "m", "d", "h", "g", "e", "eh", "f", "i", "x", "y")
    return build_cascade("tp_block", lines, {r: given[r] for r in order if r in given})


def _lines(attn: list[str], rotary: bool, eps: float | None) -> list[str]:
    t = token_lead(False)
    eps = DEFAULT_EPS["llama"] if eps is None else eps
    norm1, norm1_decls = rmsnorm_lines("X", "XN1", lead=t, eps=eps, prefix="N1_")
    norm2, norm2_decls = rmsnorm_lines("H1", "XN2", lead=t, eps=eps, prefix="N2_")
    q, kv = "x, h, g, ", "x, h, "
    if rotary:
        qkv = [
            "QP[x, h, g, e, p] = XN1[p, d] * WQ[x, d, h, g, e]",
            "KP[x, h, e, m] = XN1[m, d] * WK[x, d, h, e]",
            f"Q[x, h, g, e, p] = {_rotary('QP', q, 'p')}",
            f"K[x, h, e, m] = {_rotary('KP', kv, 'm')}",
        ]
    else:
        qkv = [
            "Q[x, h, g, e, p] = XN1[p, d] * WQ[x, d, h, g, e]",
            "K[x, h, e, m] = XN1[m, d] * WK[x, d, h, e]",
        ]
    weights = ["WQ[x, d, h, g, e]", "WK[x, d, h, e]", "WV[x, d, h, f]", "WO[x, h, g, f, d]"]
    mlp_weights = ["W_GATE[x, d, i]", "W_UP[x, d, i]", "W_DOWN[x, i, d]"]
    rope = ["COS[p, e]", "SIN[p, e]"] if rotary else []
    decls = ["X[p, d]", *norm1_decls, *weights, *rope, *norm2_decls, *mlp_weights]
    return [
        "device x on tp, y on tp",
        "inputs " + ", ".join(decls),
        *norm1,
        *qkv,
        "V[x, h, f, m] = XN1[m, d] * WV[x, d, h, f]",
        *attn,
        "OP[x, p, d] = AV[x, h, g, f, p] * WO[x, h, g, f, d]",
        "O[p, d] = OP[y, p, d]",
        "H1[p, d] = X[p, d] + O[p, d]",
        *norm2,
        "XG[x, p, i] = XN2[p, d] * W_GATE[x, d, i]",
        "XU[x, p, i] = XN2[p, d] * W_UP[x, d, i]",
        "SG[x, p, i] = XG[x, p, i] * logistic(XG[x, p, i]) * XU[x, p, i]",
        "MOP[x, p, d] = SG[x, p, i] * W_DOWN[x, i, d]",
        "MO[p, d] = MOP[y, p, d]",
        "Y[p, d] = H1[p, d] + MO[p, d]",
        "outputs Y",
    ]


def shard_weights(weights: Mapping[str, np.ndarray], tp: int) -> dict[str, np.ndarray]:
    """The unsharded Llama block's inputs (``batch=False``) as ``tp_block``'s: each sharded
    weight's head / FFN axis split into ``(tp, local)`` with the device index in front."""
    out = dict(weights)
    for name, axis in _SHARDED.items():
        w = np.asarray(weights[name])
        if w.shape[axis] % tp:
            raise LibraryError(
                f"shard_weights: {name}'s axis {axis} ({w.shape[axis]}) is not divisible by tp={tp}"
            )
        split = w.reshape(*w.shape[:axis], tp, w.shape[axis] // tp, *w.shape[axis + 1 :])
        out[name] = np.moveaxis(split, axis, 0)
    return out
