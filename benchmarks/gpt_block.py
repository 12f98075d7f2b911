"""A GPT block (examples/gpt_block.py) through jax.jit, einfuse.jit with no pass, and "fuse".

Default sizes: batch 2, sequence 1024, width 256, 4 heads, float32 and bfloat16.
``--model llama`` runs the Llama-style decoder of examples/llama.py instead (GQA with half as
many K/V heads, RoPE, RMSNorm, SwiGLU, a ``finfo.min`` causal fill, float32 softmax;
``--layers`` of them, random weights, the width as its model dimension).

* Run time: the three compiled functions of one dtype in ONE process, timed interleaved in
  shuffled rounds after warm-up (``time_interleaved``); read the ratio of medians to jax.jit
  (wall time, and process CPU time, steadier on a shared machine). ``jax_again``, a second
  ``jax.jit`` of the same function timed beside them, shows how far a ratio moves by noise.
  Every implementation's output is checked against jax.jit's before it is timed.
* First call (trace + lift + emit + compile + run) and peak memory: each implementation in its
  own fresh process, so none warms another; peak RSS of the whole process and its rise over
  the RSS after making the inputs.
* HLO (listed below the table): the optimized-HLO op kinds whose counts differ from
  jax.jit's (``-`` when none do).

    python -m benchmarks.gpt_block                     # f32 and bf16, seq 1024
    python -m benchmarks.gpt_block --dtypes float32 --seq 512 --repeats 5
    python -m benchmarks.gpt_block --model llama --dtypes bfloat16 --batch 1 --seq 2048
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from einfuse.autotune.timing import Timing
from einfuse.autotune.timing_subprocess import measure_in_subprocess
from einfuse.autotune.timing_table import format_table

IMPLS = ("jax", "einfuse", "einfuse_fuse")
# A second, separately compiled jax.jit timed beside the others: the noise floor of a ratio.
CONTROL = "jax_again"


def _compiled(impl: str, model: str = "gpt") -> Any:
    import jax

    if model == "llama":
        from examples.llama import forward as fn
    else:
        from examples.gpt_block import block as fn
    if impl == "jax":
        return jax.jit(fn, static_argnums=2)
    import einfuse

    passes = "fuse" if impl == "einfuse_fuse" else None
    return einfuse.jit(fn, static_argnums=2, passes=passes)


def _inputs(
    dtype: str, batch: int, seq: int, width: int, heads: int, model: str = "gpt", layers: int = 2
) -> tuple[Any, Any, Any]:
    """The model's arguments: weights, activations (or tokens), and its static third one."""
    import jax

    if model == "llama":
        import numpy as np

        from examples.llama import Config, init_params

        kv_heads = max(1, heads // 2)
        cfg = Config(dim=width, heads=heads, kv_heads=kv_heads, hidden=2 * width, layers=layers)
        tokens = np.random.default_rng(1).integers(0, cfg.vocab, (batch, seq))
        params = init_params(cfg, dtype=dtype)
        return (*jax.block_until_ready((params, jax.numpy.asarray(tokens))), cfg)
    from examples.gpt_block import make_inputs

    params, x = make_inputs(batch, seq, width, dtype)
    return (*jax.block_until_ready((params, x)), heads)


def make_one(impl: str, dtype: str, model: str = "gpt", layers: int = 2, **sizes: int) -> Any:
    """One implementation and its inputs: the zero-argument call to measure."""
    fn, args = _compiled(impl, model), _inputs(dtype, **sizes, model=model, layers=layers)
    return lambda: fn(*args)


def make_all(dtype: str, model: str = "gpt", layers: int = 2, **sizes: int) -> dict[str, Any]:
    """Every implementation on the same inputs, to be timed interleaved."""
    import numpy as np

    args = _inputs(dtype, **sizes, model=model, layers=layers)
    fns = {i: _compiled(i, model) for i in IMPLS} | {CONTROL: _compiled("jax", model)}
    want = np.asarray(fns["jax"](*args), np.float32)
    tol = 1e-4 if dtype == "float32" else 2e-2  # relative to the output's scale
    for impl, fn in fns.items():  # a fast wrong answer is no result: check before timing
        got = np.asarray(fn(*args), np.float32)
        err = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
        if not err <= tol:
            raise AssertionError(f"{impl} differs from jax.jit by {err:.2e} (> {tol})")
    return {i: (lambda f=f: f(*args)) for i, f in fns.items()}


def hlo_differences(
    dtype: str, model: str = "gpt", layers: int = 2, **sizes: int
) -> dict[str, str]:
    """Per implementation, the optimized-HLO op kinds whose counts differ from jax.jit's."""
    from einfuse.backends.inspection import inspect_hlo

    args = _inputs(dtype, **sizes, model=model, layers=layers)
    counts = {i: inspect_hlo(_compiled(i, model).lower(*args)).op_counts for i in IMPLS}
    out = {}
    for impl in IMPLS:
        kinds = sorted(set(counts[impl]) | set(counts["jax"]))
        diff = [
            f"{k} {counts['jax'].get(k, 0)}->{counts[impl].get(k, 0)}"
            for k in kinds
            if counts[impl].get(k, 0) != counts["jax"].get(k, 0)
        ]
        out[impl] = ", ".join(diff) or "-"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--model", choices=("gpt", "llama"), default="gpt")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (--model llama)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-hlo", action="store_true", help="skip the HLO op-count comparison")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    sizes = {"batch": args.batch, "seq": args.seq, "width": args.width, "heads": args.heads}
    sizes |= {"model": args.model, "layers": args.layers}
    rows: list[dict[str, Any]] = []
    notes = ["optimized-HLO op counts unlike jax.jit's (kind jax->impl; - when all equal):"]
    for dtype in args.dtypes.split(","):
        print(f"{dtype}: timing interleaved", file=sys.stderr, flush=True)
        both = measure_in_subprocess(
            "benchmarks.gpt_block:make_all",
            {"dtype": dtype, **sizes},
            warmup=2,
            repeats=args.repeats,
        )
        single = {}
        for impl in IMPLS:
            print(f"{dtype}: {impl} alone", file=sys.stderr, flush=True)
            single[impl] = measure_in_subprocess(
                "benchmarks.gpt_block:make_one",
                {"impl": impl, "dtype": dtype, **sizes},
                warmup=0,
                repeats=0,
            )
        hlo = {} if args.no_hlo else hlo_differences(dtype, **sizes)
        timings = both.get("timings") or {}
        base, base_cpu = _medians(timings.get("jax"))
        for impl in (*IMPLS, CONTROL):
            t, cpu = _medians(timings.get(impl))
            alone = single.get(impl, {})
            rows.append(
                {
                    "dtype": dtype,
                    "impl": impl,
                    "status": (both["error"] or alone.get("error") or "ok")[:40],
                    "median ms": None if t is None else t * 1e3,
                    "speed vs jax.jit": base / t if base and t else None,
                    "cpu-time speed": base_cpu / cpu if base_cpu and cpu else None,
                    "first call s": (alone.get("first_call_s") or {}).get("main"),
                    "peak MiB": alone.get("peak_rss_mib"),
                    "rise MiB": alone.get("rise_mib"),
                    "steal": both.get("steal_fraction"),
                }
            )
            if impl in hlo:
                notes.append(f"  {dtype} {impl}: {hlo[impl]}")
    cols = list(rows[0])
    formats = {"median ms": ".2f", "speed vs jax.jit": ".3f", "cpu-time speed": ".3f"}
    formats |= {"first call s": ".2f"}
    formats |= {"peak MiB": ".0f", "rise MiB": ".0f", "steal": ".2f"}
    print(format_table(rows, cols, formats=formats, markdown=args.markdown))
    if not args.no_hlo:
        print("\n" + "\n".join(notes))
    return 0


def _medians(timing: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(wall, process CPU) medians of one candidate's samples, in seconds."""
    if not timing:
        return None, None
    t = Timing.from_dict(timing)
    return t.median, t.cpu_median


if __name__ == "__main__":
    raise SystemExit(main())
