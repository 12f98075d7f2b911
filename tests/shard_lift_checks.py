"""Lifting checks on 8 simulated devices; run by tests/test_shard_lift.py in a subprocess
(XLA_FLAGS must be set before jax is imported). Prints one JSON object of results.

The main subject is a tensor-parallel Llama block written by hand with ``shard_map``:
column-parallel QKV and up/gate projections, row-parallel output and down projections whose
partial sums meet in a psum, RMSNorm and residuals on the replicated activations."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import einfuse
from einfuse.backends.inspection import hlo_text, inspect_hlo
from einfuse.ir.devices import collectives
from tests.shard_subprocess import report

T, D, HEADS, DH, F = 8, 32, 8, 4, 64  # tokens, model dim, heads, head dim, MLP dim
EPS = 1e-5
TP = 8
RTOL = 2e-5  # float32; the psums add the 8 partial products in another order


def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:TP]), ("tp",))


def rms_norm(x: jax.Array, g: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * g


def attention(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array) -> jax.Array:
    """Causal attention over the heads of these (local) projections."""
    q, k, v = (jnp.reshape(x @ w, (T, -1, DH)) for w in (wq, wk, wv))
    s = jnp.einsum("thd,shd->hts", q, k) / np.float32(np.sqrt(DH))
    causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    s = jnp.where(causal, s, -1e30)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("hts,shd->thd", p, v)
    return jnp.reshape(o, (T, -1))


def block_body(x, g1, wq, wk, wv, wo, g2, wg, wu, wd):
    """One device's share: its heads and its slice of the MLP; psum joins the partials."""
    h = attention(rms_norm(x, g1), wq, wk, wv)
    x = x + lax.psum(h @ wo, "tp")
    y = rms_norm(x, g2)
    m = jax.nn.silu(y @ wg) * (y @ wu)
    return x + lax.psum(m @ wd, "tp")


COLUMN, ROW, REPLICATED = P(None, "tp"), P("tp", None), P()
SPECS = (REPLICATED, REPLICATED, COLUMN, COLUMN, COLUMN, ROW, REPLICATED, COLUMN, COLUMN, ROW)


def tp_block(*args: jax.Array) -> jax.Array:
    f = jax.shard_map(block_body, mesh=mesh(), in_specs=SPECS, out_specs=P(), check_vma=False)
    return f(*args)


def tp_block_checked(*args: jax.Array) -> jax.Array:
    """The same with check_vma=True: JAX's jaxpr then has pvary and psum_invariant."""
    f = jax.shard_map(block_body, mesh=mesh(), in_specs=SPECS, out_specs=P(), check_vma=True)
    return f(*args)


def unsharded_block(x, g1, wq, wk, wv, wo, g2, wg, wu, wd):
    """The same block on one device: every head, the whole MLP."""
    x = x + attention(rms_norm(x, g1), wq, wk, wv) @ wo
    y = rms_norm(x, g2)
    return x + (jax.nn.silu(y @ wg) * (y @ wu)) @ wd


def block_args(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(T, D), (D,), (D, HEADS * DH), (D, HEADS * DH), (D, HEADS * DH)]
    shapes += [(HEADS * DH, D), (D,), (D, F), (D, F), (F, D)]
    return [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in shapes]


def loss(f: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args: jnp.sum(jnp.sin(f(*args)))


def grad(f: Callable[..., Any], n: int) -> Callable[..., Any]:
    """The jitted gradient of every argument (plain JAX runs op by op otherwise: slow)."""
    return jax.jit(jax.grad(f, argnums=tuple(range(n))))


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_llama_block() -> dict[str, Any]:
    args = block_args()
    jf = einfuse.jit(tp_block)
    traced = jf.trace(*args)
    regions = traced.program.regions
    kinds = [[m.kind for m in collectives(r.cascade)] for r in regions]
    out = jf(*args)
    n = len(args)
    grads, want_grads = grad(loss(jf), n)(*args), grad(loss(tp_block), n)(*args)
    summary = inspect_hlo(jf.lower(*args)).as_dict()["collectives"]
    return {
        "regions": len(regions),
        "opaque": [o.label for o in traced.program.opaques],
        "fallbacks": list(traced.runner.fallbacks.values()),
        "kinds": kinds,
        "devices": [list(r.cascade.devices) for r in regions],
        "vs_shard_map": rel(out, jax.jit(tp_block)(*args)),
        "vs_unsharded": rel(out, jax.jit(unsharded_block)(*args)),
        "fused_vs_shard_map": rel(einfuse.jit(tp_block, passes="fuse")(*args), out),
        "checked_vma": [
            [m.kind for m in collectives(r.cascade)]
            for r in einfuse.jit(tp_block_checked).trace(*args).program.regions
        ],
        "checked_vma_vs_shard_map": rel(einfuse.jit(tp_block_checked)(*args), out),
        "grads_vs_shard_map": max(rel(g, w) for g, w in zip(grads, want_grads)),
        "hlo": {k: v["sync"] + v["async_start"] for k, v in summary.items()},
        "explain": jf.explain(*args),
    }


PASSES = {
    "none": "",
    "split": "split-tokens{force=true,wave=4}",
    "reorder": "reorder-norm",
    "chunk": "chunk-collective{chunks=1}",
    "all": "split-tokens{force=true,wave=4},reorder-norm,chunk-collective{chunks=1}",
    # priced on jit's target, this CPU: its collectives do not overlap, so nothing applies
    "auto": "reorder-norm{when=pays},chunk-collective{chunks=auto}",
}


def check_passes_through_jit() -> dict[str, Any]:
    """The hand-written shard_map block through einfuse.jit with each overlap pass: values
    and gradients against the unsharded block, and the collectives XLA kept."""
    args, n = block_args(), len(block_args())
    want, want_grads = jax.jit(unsharded_block)(*args), grad(loss(unsharded_block), n)(*args)
    out = {}
    for name, pipeline in PASSES.items():
        jf = einfuse.jit(tp_block, passes=pipeline)
        inspected = inspect_hlo(jf.lower(*args))
        summary = inspected.as_dict()["collectives"]
        kinds = {op.name: op.kind for op in inspected.collective_ops}
        waits = [sorted(kinds[c] for c in deps) for _, deps in inspected.matmul_deps]
        grads = grad(loss(jf), n)(*args)
        out[name] = {
            "matmul_waits": waits,  # per matmul, the kinds of the collectives it waits on
            "values": rel(jf(*args), want),
            "grads": max(rel(g, w) for g, w in zip(grads, want_grads)),
            "hlo": {k: v["sync"] + v["async_start"] for k, v in summary.items()},
        }
    return out


def collectives_fn(with_min: bool) -> Callable[..., tuple[jax.Array, ...]]:
    """A shard_map using every collective (pmin only ``with_min``: JAX cannot differentiate
    it; einfuse's derivative of it is checked against the unsharded one in shard_emit_checks)."""

    def body(x, w1, w2):
        h = jnp.tanh(x @ w1)
        ring = [(i, (i + 1) % TP) for i in range(TP)]
        edge = [(i, i + 2) for i in range(TP - 2)]
        return (
            lax.psum(h @ w2, "tp"),
            lax.pmin(h, "tp") if with_min else h,
            lax.all_gather(h, "tp", axis=1, tiled=True),
            lax.psum_scatter(h @ w2, "tp", scatter_dimension=0, tiled=True),
            lax.ppermute(h, "tp", ring) + lax.ppermute(h, "tp", edge) * lax.axis_index("tp"),
        )

    out_specs = (P(), P() if with_min else COLUMN, P(), P("tp"), COLUMN)
    return jax.shard_map(
        body, mesh=mesh(), in_specs=(P(), COLUMN, ROW), out_specs=out_specs, check_vma=False
    )


def check_every_collective() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    args = [rng.standard_normal(s).astype(np.float32) for s in ((16, 16), (16, 32), (32, 16))]
    every, differentiable = collectives_fn(True), collectives_fn(False)
    jf = einfuse.jit(every)
    traced = jf.trace(*args)
    (region,) = traced.program.regions
    got, want = jf(*args), jax.jit(every)(*args)

    def scalar(f: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *a: sum(jnp.sum(jnp.sin(y)) for y in f(*a))

    grads = grad(scalar(einfuse.jit(differentiable)), 3)(*args)
    want_grads = grad(scalar(differentiable), 3)(*args)
    lowered = jf.lower(*args)
    summary = inspect_hlo(lowered).as_dict()
    return {
        "hlo": {k: v["sync"] + v["async_start"] for k, v in summary["collectives"].items()},
        "gathers": hlo_text(lowered).count(" gather("),
        "kinds": sorted(m.kind for m in collectives(region.cascade)),
        "fallbacks": list(traced.runner.fallbacks.values()),
        "values": max(rel(g, w) for g, w in zip(got, want)),
        "grads": max(rel(g, w) for g, w in zip(grads, want_grads)),
    }


def check_not_understood() -> dict[str, Any]:
    """A body with a primitive the lifter has no rule for stays whole, with the reason."""

    def body(x):
        return lax.psum(jnp.cumsum(x, axis=0), "tp")

    def f(x: jax.Array) -> jax.Array:
        return jax.shard_map(body, mesh=mesh(), in_specs=ROW, out_specs=P(), check_vma=False)(x)

    x = np.arange(64, dtype=np.float32).reshape(16, 4)
    jf = einfuse.jit(f)
    traced = jf.trace(x)
    return {
        "opaque": [(o.label, o.reason) for o in traced.program.opaques],
        "values": rel(jf(x), jax.jit(f)(x)),
        "text": traced.program.__str__(),
    }


def main() -> None:
    report(
        {
            "llama_block": check_llama_block,
            "passes": check_passes_through_jit,
            "every_collective": check_every_collective,
            "not_understood": check_not_understood,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
