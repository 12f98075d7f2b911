"""Fused attention from ``einfuse.jit(passes="fuse")`` against XLA's attention, on this CPU.

For each sequence length and mask, four implementations of the same attention:

* ``einfuse``: ``einfuse.jit(attention, passes="fuse{tile=T}")`` — lifted, fused (FuseMax
  1-pass), emitted as one blockwise loop;
* ``dpa_xla``: ``jax.jit(jax.nn.dot_product_attention(..., implementation="xla"))``;
* ``jit_softmax``: ``jax.jit`` of a plain softmax(QK^T/sqrt(d))V;
* ``pallas_mha``: Pallas' own flash-attention kernel
  (``jax.experimental.pallas.ops.gpu.attention.mha``, blocks 128 x 128) with
  ``interpret=True``, the only way a Pallas kernel runs on a CPU: its grid becomes XLA loops.
  On a GPU Triton compiles the same kernel; here it shows what the blockwise structure alone
  buys against einfuse's emitted loop.

Each (implementation, length, mask) runs in its own process, so peak memory is its own:
reported as the whole process (peak RSS) and as the rise over the RSS it had after
importing JAX and making its inputs, before the first call. Times are medians of repeated
runs after warm-up; the first call (trace + compile + run) is reported separately. Runs
where ``/proc/stat`` showed CPU steal are flagged. Ratios are taken between processes run
back to back in shuffled order, so compare ratios, not absolute times.

    python -m benchmarks.fused_attention                      # 1024 .. 65536, both masks
    python -m benchmarks.fused_attention --seqs 1024,4096 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

from einfuse.autotune.timing_subprocess import measure_in_subprocess
from einfuse.autotune.timing_table import format_table

BATCH, HEADS, DIM = 1, 8, 64
IMPLS = ("einfuse", "dpa_xla", "jit_softmax", "pallas_mha")


def softmax_attention(q: Any, k: Any, v: Any, causal: bool) -> Any:
    """The user's function: [b, s, h, d] layout, as jax.nn.dot_product_attention takes."""
    import jax
    import jax.numpy as jnp

    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    if causal:
        s = q.shape[1]
        mask = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
        scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def make(impl: str, seq: int, causal: bool, tile: int = 512) -> Any:
    """Build one implementation and its inputs; returns the zero-argument callable to time."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (BATCH, seq, HEADS, DIM), jnp.float32) for key in keys)
    jax.block_until_ready((q, k, v))
    if impl == "einfuse":
        import einfuse

        fn = einfuse.jit(softmax_attention, static_argnums=3, passes=f"fuse{{tile={tile}}}")
    elif impl == "dpa_xla":
        fn = jax.jit(
            lambda q, k, v, causal: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation="xla"
            ),
            static_argnums=3,
        )
    elif impl == "jit_softmax":
        fn = jax.jit(softmax_attention, static_argnums=3)
    elif impl == "pallas_mha":
        from jax.experimental.pallas.ops.gpu.attention import mha

        fn = jax.jit(
            lambda q, k, v, causal: mha(
                q, k, v, None, sm_scale=DIM**-0.5, causal=causal, interpret=True
            ),
            static_argnums=3,
        )
    else:
        raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")
    return lambda: fn(q, k, v, causal)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--masks", default="none,causal", help="none, causal or both")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--memory-limit-mib", type=float, default=20_000)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--long-from", type=int, default=16384, help="one timed run above this")
    ap.add_argument(
        "--skip-xla-above", type=int, default=16384,
        help="run only einfuse from here: XLA runs out of memory, Pallas (interpret) takes minutes",
    )  # fmt: skip
    args = ap.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")]
    masks = [m == "causal" for m in args.masks.split(",")]
    impls = args.impls.split(",")
    runs = [
        (impl, seq, causal)
        for seq in seqs
        for causal in masks
        for impl in impls
        if impl == "einfuse" or seq < args.skip_xla_above
    ]
    skipped = {
        "dpa_xla": "skipped (XLA runs out of memory)",
        "jit_softmax": "skipped (XLA runs out of memory)",
        "pallas_mha": "skipped (interpret mode: minutes a call)",
    }
    random.Random(0).shuffle(runs)  # spread slow drifts of the machine over the alternatives
    results: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for i, (impl, seq, causal) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {impl} seq={seq} causal={causal}", file=sys.stderr, flush=True)
        results[impl, seq, causal] = measure_in_subprocess(
            "benchmarks.fused_attention:make",
            {"impl": impl, "seq": seq, "causal": causal, "tile": args.tile},
            timeout=args.timeout,
            # Past 16K one call takes minutes: time the call after the first, once.
            warmup=1 if seq <= args.long_from else 0,
            repeats=args.repeats if seq <= args.long_from else 1,
            memory_limit_mib=args.memory_limit_mib,
        )
    rows = []
    for seq in seqs:
        for causal in masks:
            base_t = _median(results.get(("dpa_xla", seq, causal)))
            for impl in impls:
                r = results.get((impl, seq, causal))
                row: dict[str, Any] = {"seq": seq, "mask": "causal" if causal else "none"}
                row["impl"] = impl
                if r is None:
                    rows.append({**row, "status": skipped.get(impl, "skipped")})
                    continue
                t = _median(r)
                rows.append(
                    {
                        **row,
                        "status": (r["error"] or "ok")[:40],
                        "median s": t,
                        "speedup vs dpa": (base_t / t) if (t and base_t) else None,
                        "first call s": _first(r),
                        "peak MiB": r.get("peak_rss_mib"),
                        "rise MiB": r.get("rise_mib"),
                        "steal": r.get("steal_fraction"),
                    }
                )
    cols = ["seq", "mask", "impl", "status", "median s", "speedup vs dpa", "first call s"]
    cols += ["peak MiB", "rise MiB", "steal"]
    formats = {"median s": ".4f", "speedup vs dpa": ".2f", "first call s": ".2f"}
    formats |= {"peak MiB": ".0f", "rise MiB": ".0f", "steal": ".2f"}
    print(format_table(rows, cols, formats=formats, markdown=args.markdown))
    return 0


def _median(r: dict[str, Any] | None) -> float | None:
    if not r or r.get("error") or not r.get("timings"):
        return None
    return r["timings"]["main"]["median"]


def _first(r: dict[str, Any]) -> float | None:
    first = r.get("first_call_s") or {}
    return first.get("main")


if __name__ == "__main__":
    raise SystemExit(main())
