"""einfuse.jit with no pass against jax.jit: run time, first-call time, peak memory.

Workloads: the MiniLM encoder (examples/minilm.py) at batch 8 and 32, sequence 128, and a
softmax attention ([1, S, 8, 64], float32) at S = 1024 .. 8192.

* Run time: both compiled functions in ONE process, timed interleaved in shuffled rounds
  (``time_interleaved``); the ratio of medians is the number to read.
* First call (trace + lift + emit + compile + run) and peak memory: each implementation in
  its own fresh process, so neither warms the other. Memory is the whole process's peak
  RSS and its rise over the RSS before the first call.

    python -m benchmarks.jit_overhead                 # everything
    python -m benchmarks.jit_overhead --quick         # MiniLM batch 8 and attention 1024
"""

from __future__ import annotations

import argparse
from typing import Any

from einfuse.autotune.timing_subprocess import measure_in_subprocess
from einfuse.autotune.timing_table import format_table

IMPLS = ("jax", "einfuse")


def _compile(impl: str, fn: Any) -> Any:
    import jax

    if impl == "jax":
        return jax.jit(fn)
    import einfuse

    return einfuse.jit(fn)


def _workload(name: str, size: int) -> tuple[Any, tuple]:
    import jax
    import jax.numpy as jnp

    if name == "minilm":
        from examples import minilm

        params = minilm.load_params()
        sentences = (minilm.SENTENCES * (size // len(minilm.SENTENCES) + 1))[:size]
        ids, mask = minilm.tokenize(minilm.load_tokenizer(), sentences, pad_to=128)
        return minilm.encode, (params, jnp.asarray(ids), jnp.asarray(mask))
    from benchmarks.fused_attention import softmax_attention

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, size, 8, 64), jnp.float32) for key in keys)
    return (lambda q, k, v: softmax_attention(q, k, v, False)), (q, k, v)


def make_one(impl: str, workload: str, size: int) -> Any:
    fn, args = _workload(workload, size)
    compiled = _compile(impl, fn)
    return lambda: compiled(*args)


def make_both(workload: str, size: int) -> dict[str, Any]:
    fn, args = _workload(workload, size)
    out = {}
    for impl in IMPLS:
        compiled = _compile(impl, fn)
        out[impl] = lambda c=compiled: c(*args)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    work = [("minilm", 8), ("minilm", 32), ("attention", 1024), ("attention", 2048)]
    work += [("attention", 4096), ("attention", 8192)]
    if args.quick:
        work = [("minilm", 8), ("attention", 1024)]
    rows = []
    for workload, size in work:
        both = measure_in_subprocess(
            "benchmarks.jit_overhead:make_both",
            {"workload": workload, "size": size},
            warmup=2,
            repeats=args.repeats,
        )
        single = {
            impl: measure_in_subprocess(
                "benchmarks.jit_overhead:make_one",
                {"impl": impl, "workload": workload, "size": size},
                warmup=0,
                repeats=0,
            )
            for impl in IMPLS
        }
        t = {i: (both.get("timings") or {}).get(i, {}).get("median") for i in IMPLS}
        first = {i: (single[i].get("first_call_s") or {}).get("main") for i in IMPLS}
        rows.append(
            {
                "workload": f"{workload} {size}",
                "status": both["error"] or single["einfuse"]["error"] or "ok",
                "jax s": t["jax"],
                "einfuse s": t["einfuse"],
                "run ratio": t["einfuse"] / t["jax"] if t["jax"] and t["einfuse"] else None,
                "jax first s": first["jax"],
                "einfuse first s": first["einfuse"],
                "first ratio": first["einfuse"] / first["jax"]
                if first["jax"] and first["einfuse"]
                else None,
                "jax peak MiB": single["jax"].get("peak_rss_mib"),
                "einfuse peak MiB": single["einfuse"].get("peak_rss_mib"),
                "jax rise MiB": single["jax"].get("rise_mib"),
                "einfuse rise MiB": single["einfuse"].get("rise_mib"),
                "steal": both.get("steal_fraction"),
            }
        )
    cols = list(rows[0])
    formats = {c: ".4f" for c in ("jax s", "einfuse s")}
    formats |= {c: ".3f" for c in ("run ratio", "first ratio", "steal")}
    formats |= {c: ".2f" for c in ("jax first s", "einfuse first s")}
    formats |= {c: ".0f" for c in cols if c.endswith("MiB")}
    print(format_table(rows, cols, formats=formats, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
