"""Do SpAtten's local value pruning and progressive quantization (its §3.3-3.4) pay on this
CPU? A measurement on MiniLM, not a pass: each is written as a variant of MiniLM's attention
and compared with the dense model, timed interleaved in one process under ``jax.jit``.

- ``values-k``: local value pruning. Per query, only the ``k`` value rows of highest
  attention probability are read (``lax.top_k``, then a gather of those rows and a weighted
  sum), the others skipped (not renormalized, as SpAtten). ``values-k-masked``: the same
  result from the dense ``P @ V`` with the other probabilities zeroed (no rows skipped).
- ``int8-qk``: the first step of progressive quantization: ``Q K^T`` from int8 Q and K
  (symmetric per-row scales, int32 accumulation); SpAtten re-fetches the low bits for queries
  whose probabilities come out flat, which can only add time, so this row is its best case.
- ``qk-only`` rows time the attention core alone (batch x heads x 256 x 256, head dim 32),
  the ceiling on what any attention-only trick can save.

    python -m benchmarks.pruning_local --texts 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def local_values(probs: jax.Array, v: jax.Array, k: int) -> jax.Array:
    """``probs[b,h,q,m] @ v[b,m,h,d]`` reading only each query's top-``k`` value rows."""
    top, idx = lax.top_k(probs, k)  # [b, h, q, k]
    vh = jnp.moveaxis(v, 2, 1)  # [b, h, m, d]
    rows = jax.vmap(jax.vmap(lambda vv, ii: vv[ii]))(vh, idx)  # [b, h, q, k, d]
    return jnp.einsum("bhqk,bhqkd->bqhd", top, rows)


def masked_values(probs: jax.Array, v: jax.Array, k: int) -> jax.Array:
    """The same result as ``local_values`` from the dense product."""
    kth = lax.top_k(probs, k)[0][..., -1:]
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(probs >= kth, probs, 0.0), v)


def int8_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """``Q K^T`` from int8 operands with per-row scales, accumulated in int32."""

    def quant(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 + 1e-12
        return jnp.round(x / scale).astype(jnp.int8), scale

    (qi, qs), (ki, ks) = quant(q), quant(k)
    s = jnp.einsum("bqhd,bkhd->bhqk", qi, ki, preferred_element_type=jnp.int32)
    return (
        s.astype(jnp.float32)
        * jnp.moveaxis(qs[..., 0], 1, 2)[..., None]
        * (jnp.moveaxis(ks[..., 0], 1, 2)[:, :, None, :])
    )


def raw_scores(kind: str, q: jax.Array, k: jax.Array) -> jax.Array:
    if kind == "int8-qk":
        return int8_scores(q, k)
    return jnp.einsum("bqhd,bkhd->bhqk", q, k)


def attention_variant(kind: str) -> Callable[..., jax.Array]:
    """MiniLM's ``self_attention`` with its core replaced by ``kind``."""
    from examples.minilm import dense

    def self_attention(x: jax.Array, layer: dict, mask_bias: jax.Array, num_heads: int):
        batch, seq, hidden = x.shape
        hd = hidden // num_heads
        q, k, v = (
            dense(x, layer[w]).reshape(batch, seq, num_heads, hd) for w in ("query", "key", "value")
        )
        scores = raw_scores(kind, q, k) / math.sqrt(hd)
        probs = jax.nn.softmax(scores + mask_bias, axis=-1)
        if kind.startswith("values-"):
            keep = int(kind.split("-")[1])
            core = masked_values if kind.endswith("masked") else local_values
            context = core(probs, v, keep)
        else:
            context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return dense(context.reshape(batch, seq, hidden), layer["attn_out"])

    return self_attention


def encoder(kind: str) -> Callable[..., jax.Array]:
    """``minilm.encode`` traced with the attention variant ``kind``."""
    from examples import minilm

    def run(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        saved = minilm.self_attention
        minilm.self_attention = attention_variant(kind)
        try:
            return minilm.encode(params, ids, mask)
        finally:
            minilm.self_attention = saved

    return jax.jit(run)


def core(kind: str, keep: int) -> Callable[..., jax.Array]:
    """The attention core alone: scores, softmax, times V."""

    def run(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        s = raw_scores(kind, q, k)
        p = jax.nn.softmax(s / math.sqrt(q.shape[-1]), axis=-1)
        if kind == "values":
            return local_values(p, v, keep)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    return jax.jit(run)


KINDS = ("dense", "values-64", "values-128", "values-64-masked", "int8-qk")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.pruning_corpus import DATA
    from einfuse.autotune.timing import time_interleaved
    from examples import minilm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    params = minilm.load_params()
    texts = json.loads(DATA.read_text())["evaluation"][: args.texts]
    ids, mask = minilm.tokenize(minilm.load_tokenizer(), texts, args.seq, pad_to=args.seq)
    batches = [
        (ids[i : i + args.batch], mask[i : i + args.batch])
        for i in range(0, len(texts), args.batch)
    ]
    fns = {kind: encoder(kind) for kind in KINDS}
    dense = np.concatenate([np.asarray(fns["dense"](params, *b)) for b in batches])
    cos = {}
    for kind, f in fns.items():
        emb = np.concatenate([np.asarray(f(params, *b)) for b in batches])
        cos[kind] = np.sum(emb * dense, axis=-1) / np.linalg.norm(emb, axis=-1)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq, 12, 32)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    cores = {
        "qk-only dense": core("dense", 0),
        "qk-only values-64": core("values", 64),
        "qk-only int8-qk": core("int8-qk", 0),
    }
    b0 = batches[0]
    calls = {kind: (lambda f=f: f(params, *b0)) for kind, f in fns.items()}
    calls.update({name: (lambda f=f: f(q, k, v)) for name, f in cores.items()})
    timings = time_interleaved(calls, repeats=args.repeats)
    print(f"\nbatch {args.batch}, {args.seq} tokens, {len(texts)} texts, {args.repeats} rounds\n")
    print("| variant | time (median) | ratio to dense | mean cos | min cos |")
    print("|---|---|---|---|---|")
    for name, t in timings.items():
        base = timings["qk-only dense" if name.startswith("qk-only") else "dense"].median
        c = cos.get(name)
        quality = f"{c.mean():.4f} | {c.min():.4f}" if c is not None else "– | –"
        print(f"| {name} | {t.median * 1e3:.0f} ms | {base / t.median:.2f}x | {quality} |")


if __name__ == "__main__":
    main()
