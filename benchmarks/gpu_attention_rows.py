"""The rows of ``benchmarks.gpu_attention``: one attention shape, every implementation.

:func:`make` runs in a measuring child (``einfuse.autotune.timing_subprocess``), one per
size (its masks share the inputs), so a crash, an out-of-memory or a poisoned CUDA context
loses one size, not the run.
It builds each row as an ahead-of-time compiled executable (the first call's time is lower +
compile + run), checks its output against the reference (cuDNN's output where cuDNN runs,
else a float32 softmax), reads XLA's memory analysis of it, sweeps the tuned Pallas row's
configurations within a time budget, and writes all of that to a side JSON file; it returns
the rows that work, which the child then times interleaved in shuffled rounds. A row that
fails is one line in the side file, never the end of the shape.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.gpu_attention import JAX_TILE, PALLAS_TILE, ROWS, TOLERANCE, Case
from einfuse.autotune.measure import describe_error
from einfuse.frontend import JitFunction

# (key tile, query tile, num_warps, num_stages), the likeliest winners first: the sweep stops
# when its time budget is spent. FlashAttention-2's Triton kernels use 128 x 64 blocks with 4
# warps and 3 stages for head dim 128 on Hopper.
SWEEP = (
    (64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
    (128, 128, 8, 3), (64, 128, 4, 2), (128, 64, 4, 2), (64, 128, 8, 2),
    (128, 128, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 3),
    (128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 8, 2), (128, 64, 8, 3),
)  # fmt: skip


class Skip(Exception):
    """A row that cannot run here (no GPU, not installed): its message is the whole reason."""


def attention(q: Any, k: Any, v: Any, causal: bool) -> Any:
    """The user's attention, [b, s, h, d]; keys and values may have fewer heads (GQA)."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    scale = d**-0.5  # a Python float: the scores keep the inputs' dtype
    if kh == h:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    else:
        qg = q.reshape(b, s, kh, h // kh, d)
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    if causal:
        scores = jnp.where(jnp.tril(jnp.ones((s, k.shape[1]), bool)), scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    if kh == h:
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)
    return jnp.einsum("bhgqk,bkhd->bqhgd", p, v).reshape(b, s, h, d)


class _Scheduled(JitFunction):
    """``einfuse.jit`` whose every region runs ``passes`` with a fixed Schedule: what a tuned
    store would hand it (``einfuse.jit`` has no public argument for a Schedule yet)."""

    def __init__(self, fun: Callable[..., Any], options: Mapping[str, Any], **kw: Any) -> None:
        super().__init__(fun, target=None, static_argnums=(), static_argnames=(),
                         donate_argnums=(), autotune=None, **kw)  # fmt: skip
        self.schedule_options = dict(options)

    def _tuned(self, program: Any, region: Any) -> tuple[Any, Any]:
        from einfuse.autotune.providers import fused_loop
        from einfuse.compile_path import region_sizes
        from einfuse.ir.schedule import Schedule
        from einfuse.passes.manager import parse_pipeline

        opts = dict(self.schedule_options)
        q_tile = opts.pop("fuse.query_tile", None)
        tile = dict(parse_pipeline(self.passes)[0].options)["tile"]
        sizes = region_sizes(program, region)
        query, _ = fused_loop(region.cascade, tile, tuple(sorted(sizes.items())))
        tiles = {query: q_tile} if query is not None and q_tile else {}
        return None, (self.passes, Schedule(tiles=tiles, options=opts))


def build(row: str, case: Case, config: tuple[int, int, int, int] | None = None) -> Any:
    """The jittable ``f(q, k, v)`` of a row (raises with the reason where it cannot run)."""
    causal, gpu = case.causal, jax.default_backend() == "gpu"
    if row == "cudnn":
        if not gpu:
            raise Skip("skipped: cuDNN needs an NVIDIA GPU")
        return functools.partial(
            jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn"
        )
    if row == "pallas_mha":
        if not gpu:
            raise Skip("skipped: Pallas' Triton mha needs a GPU (interpreted: minutes)")
        from jax.experimental.pallas.ops.gpu.attention import mha

        def f(q: Any, k: Any, v: Any) -> Any:
            g = q.shape[2] // k.shape[2]  # mha has no GQA: K/V repeated inside the jit
            k, v = (jnp.repeat(x, g, axis=2) if g > 1 else x for x in (k, v))
            return mha(q, k, v, None, sm_scale=case.dim**-0.5, causal=causal)

        return f
    if row == "jit":
        return functools.partial(attention, causal=causal)
    if row == "tokamax":
        try:
            import tokamax
        except ImportError as exc:
            raise Skip(f"not installed ({describe_error(exc)})") from exc
        return functools.partial(tokamax.dot_product_attention, is_causal=causal)
    fn = functools.partial(attention, causal=causal)
    if row == "einfuse_jax":
        import einfuse

        return einfuse.jit(fn, passes=f"fuse{{tile={JAX_TILE}}}")
    if row == "einfuse_pallas":
        import einfuse

        return einfuse.jit(fn, passes=f"fuse{{tile={PALLAS_TILE}}}", backend="pallas")
    if row == "pallas_tuned":
        assert config is not None
        k_tile, q_tile, warps, stages = config
        options = {"fuse.query_tile": q_tile, "pallas.num_warps": warps,
                   "pallas.num_stages": stages}  # fmt: skip
        return _Scheduled(fn, options, passes=f"fuse{{tile={k_tile}}}", backend="pallas")
    raise ValueError(f"unknown row {row!r}; known: {', '.join(ROWS)}")


def inputs(case: Case, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(kq, (case.batch, case.seq, case.heads, case.dim), dtype)
    kvs = (case.batch, case.seq, case.kv_heads, case.dim)
    k, v = jax.random.normal(kk, kvs, dtype), jax.random.normal(kv, kvs, dtype)
    return jax.block_until_ready((q, k, v))


def compiled_row(fn: Any, args: tuple) -> tuple[Callable[[], Any], dict[str, Any]]:
    """Compile ``fn`` ahead of time; the zero-argument call, the first call's time, and XLA's
    memory analysis (what the executable allocates besides its inputs)."""
    start = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    exe = jitted.lower(*args).compile()
    out = jax.block_until_ready(exe(*args))
    info: dict[str, Any] = {"first_call_s": time.perf_counter() - start}
    try:
        mem = exe.memory_analysis()
        info["temp_mib"] = mem.temp_size_in_bytes / 2**20
        info["out_mib"] = mem.output_size_in_bytes / 2**20
    except Exception as exc:  # not every backend reports it
        info["memory"] = describe_error(exc)
    return functools.partial(exe, *args), {**info, "out": out}


def check(out: Any, ref: Any, dtype: str) -> dict[str, Any]:
    """The max abs error against ``ref``, and whether every element is within tolerance."""
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE["float32"])
    ref = ref.astype(jnp.float32)
    err = jnp.abs(out.astype(jnp.float32) - ref)
    return {"max_err": float(err.max()), "ok": bool(jnp.all(err <= atol + rtol * jnp.abs(ref)))}


def device_peak_mib() -> float | None:
    """The device allocator's peak in this process (None where JAX does not report it)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def make(
    cases: list[dict], rows: list[str], side: str, sweep_s: float, slow_s: float = 1.0
) -> dict[str, Callable[[], Any]]:
    """The measuring child's setup for shapes that share their inputs (see the module
    docstring); the callables are named ``"<case index>:<row>"``."""
    info: dict[str, Any] = {"platform": jax.default_backend(), "cases": []}
    info["device"] = jax.local_devices()[0].device_kind
    runnable: dict[str, Callable[[], Any]] = {}
    for i, case in enumerate(cases):
        got = _make_case(Case(**case), rows, sweep_s / len(cases), slow_s, info, side)
        runnable |= {f"{i}:{row}": call for row, call in got.items()}
    info["device_peak_mib"] = device_peak_mib()
    Path(side).write_text(json.dumps(info))
    return runnable


def _make_case(
    c: Case, rows: list[str], sweep_s: float, slow_s: float, info: dict, side: str
) -> dict[str, Callable[[], Any]]:
    args = inputs(c)
    mine: dict[str, Any] = {"rows": {}, "sweep": []}
    info["cases"].append(mine)
    ref = None
    runnable: dict[str, Callable[[], Any]] = {}

    def record(row: str, result: dict[str, Any]) -> None:
        mine["rows"][row] = result
        Path(side).write_text(json.dumps(info))  # a child that dies still leaves the rest

    def attempt(row: str, config: Any = None) -> tuple[Callable[[], Any] | None, dict]:
        try:
            call, got = compiled_row(build(row, c, config), args)
        except Skip as exc:
            return None, {"error": str(exc)}
        except Exception as exc:
            return None, {"error": describe_error(exc)}
        out = got.pop("out")
        if ref is not None:
            got |= check(out, ref, c.dtype)
        return call, {**got, "_out": out}

    mine["reference"] = "cudnn"
    if "cudnn" in rows:
        call, got = attempt("cudnn")
        ref = got.pop("_out", None)
        if call is not None:
            got |= {"max_err": 0.0, "ok": True}
            runnable["cudnn"] = call
        record("cudnn", got)
    if ref is None:  # no cuDNN here: a float32 softmax is the reference, where it fits
        mine["reference"] = "float32 jax.jit softmax"
        try:
            f32 = tuple(a.astype(jnp.float32) for a in args)
            ref = jax.block_until_ready(
                jax.jit(functools.partial(attention, causal=c.causal))(*f32)
            )
        except Exception as exc:  # the rows still run and are timed, unchecked
            mine["reference"] = f"none ({describe_error(exc)})"
    for row in rows:
        if row in ("cudnn", "pallas_tuned"):
            continue
        call, got = attempt(row)
        got.pop("_out", None)
        if call is not None:
            _time_if_slow(call, got, slow_s)
            if "single_s" not in got:
                runnable[row] = call
        record(row, got)
    if "pallas_tuned" in rows:
        best = _sweep(attempt, sweep_s, mine)
        if best is None:
            record("pallas_tuned", {"error": "no configuration of the sweep ran correctly"})
        else:
            call, got = best
            runnable["pallas_tuned"] = call
            record("pallas_tuned", got)
    return runnable


def _time_if_slow(call: Callable[[], Any], got: dict[str, Any], slow_s: float) -> None:
    """A row slower than ``slow_s`` a call is timed once here, not in the interleaved rounds."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    t = time.perf_counter() - start
    if t > slow_s:
        got["single_s"] = t


def _sweep(attempt: Callable[..., Any], budget_s: float, info: dict[str, Any]) -> Any:
    """Run the sweep's configurations (in order) until ``budget_s`` is spent; the fastest
    correct one by the median of 3 calls, with how many were tried in its label."""
    start, best, best_t = time.perf_counter(), None, math.inf
    for config in SWEEP:
        if info["sweep"] and time.perf_counter() - start > budget_s:
            break
        call, got = attempt("pallas_tuned", config)
        got.pop("_out", None)
        entry = {"config": list(config), **got}
        if call is not None and got.get("ok", True):
            samples = []
            for _ in range(4):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                samples.append(time.perf_counter() - t0)
            entry["median_s"] = sorted(samples[1:])[1]
            if entry["median_s"] < best_t:
                best, best_t = (call, entry), entry["median_s"]
        info["sweep"].append(entry)
    if best is None:
        return None
    call, entry = best
    k, q, w, s = entry["config"]
    tried = len(info["sweep"])
    label = f"tile={k} query_tile={q} warps={w} stages={s}, best of {tried}/{len(SWEEP)}"
    return call, {**entry, "label": label, "sweep_s": time.perf_counter() - start}
