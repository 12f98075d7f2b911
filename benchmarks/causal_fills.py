"""Causal attention with each mask fill real models use, against non-causal, in one process.

``einfuse.jit(passes="fuse")`` skips the key tiles above the diagonal whatever the fill
(``-inf``, ``finfo.min``, ``-1e9``, ``-1e4``, an additive ``s + where(mask, 0, fill)``);
a causal loop should then take about half the non-causal time. Every variant is timed
interleaved with the others (``time_interleaved``), so the ratios are what to read; each is
checked against ``jax.jit`` first.

    python -m benchmarks.causal_fills                    # seq 2048 and 4096, 1 head, d=64
    python -m benchmarks.causal_fills --seqs 4096 --repeats 9
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

FILLS = ("-inf", "finfo.min", "-1e9", "-1e4", "bias:finfo.min", "bias:-1e9")


def attention(mask: str) -> Callable[..., Any]:
    """softmax(Q K^T / 8) V over [seq, 64], masked causally with ``mask``'s fill (or not)."""
    import jax
    import jax.numpy as jnp

    def fn(q: Any, k: Any, v: Any) -> Any:
        s = q @ k.T * 0.125
        if mask != "none":
            n = q.shape[0]
            keep = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
            spelled = mask.removeprefix("bias:")
            fill = {"-inf": -jnp.inf, "finfo.min": jnp.finfo(s.dtype).min}.get(spelled)
            fill = float(spelled) if fill is None else fill
            if mask.startswith("bias:"):
                s = s + jnp.where(keep, 0.0, fill)
            else:
                s = jnp.where(keep, s, fill)
        return jax.nn.softmax(s, axis=-1) @ v

    return fn


def run(seq: int, repeats: int, fills: tuple[str, ...]) -> list[tuple[str, float, float]]:
    """(mask, median ms, ratio to non-causal) for each mask at ``seq``."""
    import jax
    import numpy as np

    import einfuse
    from einfuse.autotune.timing import time_interleaved

    keys = jax.random.split(jax.random.PRNGKey(seq), 3)
    q, k, v = (jax.random.normal(key, (seq, 64), jax.numpy.float32) for key in keys)
    calls = {}
    for mask in ("none", *fills):
        fused = einfuse.jit(attention(mask), passes="fuse")
        got, want = fused(q, k, v), jax.jit(attention(mask))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
        calls[mask] = lambda f=fused: f(q, k, v)
    times = time_interleaved(calls, repeats=repeats)
    base = times["none"].median
    return [(m, t.median * 1e3, t.median / base) for m, t in times.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fills", default=",".join(FILLS), help="masks to time besides none")
    args = parser.parse_args(argv)
    fills = tuple(f for f in args.fills.split(",") if f)
    print("seq   mask             median_ms  vs_noncausal")
    for seq in (int(s) for s in args.seqs.split(",")):
        for mask, ms, ratio in run(seq, args.repeats, fills):
            print(f"{seq:<5} {mask:<16} {ms:9.1f}  {ratio:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
