"""Causal attention with each mask fill real models use, against non-causal, in one process.

``einfuse.jit(passes="fuse")`` skips the key tiles above the diagonal whatever the fill
(``-inf``, ``finfo.min``, ``-1e9``, ``-1e4``, an additive ``s + where(mask, 0, fill)``);
a causal loop should then take about half the non-causal time. ``jax.jit`` of the same
function runs beside it. Every variant is timed interleaved with the others
(``time_interleaved``), so the ratios are what to read; each is checked against ``jax.jit``
first. ``--dtype bfloat16`` runs bfloat16 inputs; ``--f32-softmax`` casts the bfloat16 scores
to float32 for the softmax and back, as Llama, Gemma and BERT code does.

    python -m benchmarks.causal_fills                    # seq 2048 and 4096, 1 head, d=64
    python -m benchmarks.causal_fills --seqs 4096 --repeats 9 --dtype bfloat16 --f32-softmax

``--padding 0.5`` times key-padding masks instead (the last half of the keys padded, no
causal band): ``pad:static`` (``where(k < L, s, finfo.min)``, ``L`` a constant),
``pad:bias`` (BERT's ``s + (1 - mask[k]) * finfo.min``, ``mask`` an input) and
``pad:where`` (``where(mask[k], s, -1e9)``); the padded loop skips the all-masked key tiles.

    python -m benchmarks.causal_fills --seqs 4096 --padding 0.5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

FILLS = ("-inf", "finfo.min", "-1e9", "-1e4", "bias:finfo.min", "bias:-1e9")
PADDINGS = ("pad:static", "pad:bias", "pad:where")


def attention(mask: str, f32_softmax: bool = False, length: int = 0) -> Callable[..., Any]:
    """softmax(Q K^T / 8) V over [seq, 64], masked causally with ``mask``'s fill (or not), or
    with key padding (``pad:``; keys from ``length`` on, or where the input ``real`` is 0)."""
    import jax
    import jax.numpy as jnp

    def fn(q: Any, k: Any, v: Any, real: Any) -> Any:
        s = q @ k.T * 0.125
        fmin = jnp.finfo(s.dtype).min
        if mask == "pad:static":
            s = jnp.where(jnp.arange(q.shape[0])[None, :] < length, s, fmin)
        elif mask == "pad:bias":
            s = s + ((1.0 - real.astype(s.dtype)) * fmin)[None, :]
        elif mask == "pad:where":
            s = jnp.where(real[None, :] > 0, s, -1e9)
        elif mask != "none":
            n = q.shape[0]
            keep = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
            spelled = mask.removeprefix("bias:")
            fill = {"-inf": -jnp.inf, "finfo.min": jnp.finfo(s.dtype).min}.get(spelled)
            fill = float(spelled) if fill is None else fill
            if mask.startswith("bias:"):
                s = s + jnp.where(keep, 0.0, fill)
            else:
                s = jnp.where(keep, s, fill)
        if f32_softmax:
            return jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype) @ v
        return jax.nn.softmax(s, axis=-1) @ v

    return fn


def run(
    seq: int,
    repeats: int,
    fills: tuple[str, ...],
    dtype: str,
    f32_softmax: bool,
    padding: float = 0.0,
) -> list[tuple[str, float, float, float]]:
    """(mask, einfuse median ms, its ratio to non-causal einfuse, jax.jit ms / einfuse ms)."""
    import jax
    import numpy as np

    import einfuse
    from einfuse.autotune.timing import time_interleaved

    keys = jax.random.split(jax.random.PRNGKey(seq), 3)
    q, k, v = (jax.random.normal(key, (seq, 64), jax.numpy.float32).astype(dtype) for key in keys)
    tol = 1e-4 if dtype == "float32" else 3e-2
    length = seq - int(seq * padding)
    real = jax.numpy.asarray(np.arange(seq) < length, jax.numpy.int32)
    calls = {}
    for mask in ("none", *fills):
        fn = attention(mask, f32_softmax, length)
        fused, plain = einfuse.jit(fn, passes="fuse"), jax.jit(fn)
        got, want = fused(q, k, v, real), plain(q, k, v, real)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
        )
        calls[mask] = lambda f=fused: f(q, k, v, real)
        calls[f"jit:{mask}"] = lambda f=plain: f(q, k, v, real)
    times = time_interleaved(calls, repeats=repeats)
    base = times["none"].median
    return [
        (
            m,
            times[m].median * 1e3,
            times[m].median / base,
            times[f"jit:{m}"].median / times[m].median,
        )
        for m in ("none", *fills)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fills", default=",".join(FILLS), help="masks to time besides none")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--f32-softmax", action="store_true", help="softmax in float32")
    parser.add_argument(
        "--padding", type=float, default=0.0, help="fraction of keys padded: time padding masks"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.padding < 1.0:
        parser.error("--padding must be in [0, 1)")
    fills = tuple(f for f in args.fills.split(",") if f)
    if args.padding:
        fills = PADDINGS
    print(f"dtype {args.dtype}, softmax in {'float32' if args.f32_softmax else args.dtype}")
    print("seq   mask             einfuse_ms  vs_unmasked  jax.jit/einfuse")
    for seq in (int(s) for s in args.seqs.split(",")):
        rows = run(seq, args.repeats, fills, args.dtype, args.f32_softmax, args.padding)
        for mask, ms, ratio, speedup in rows:
            print(f"{seq:<5} {mask:<16} {ms:10.1f}  {ratio:11.2f}x  {speedup:14.2f}x", flush=True)


if __name__ == "__main__":
    main()
