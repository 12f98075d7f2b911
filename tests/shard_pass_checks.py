"""The overlap passes on the library's tensor-parallel Llama block, emitted as shard_maps on 8
simulated devices; run by tests/test_shard_passes.py in a subprocess. Prints one JSON object.

Each pipeline's program must equal the unsharded reference (the float64 interpreter, which
reads device ranks as plain ranks) and differentiate like the unsharded JAX program; the
optimized HLO shows the collectives each pass promises."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from einfuse.backends.inspection import hlo_text, inspect_hlo
from einfuse.backends.jax_backend import emit_jax
from einfuse.backends.reference import interpret
from einfuse.backends.xla_overlap import top_level_options
from einfuse.einsum_cascade import tp_block
from einfuse.passes.manager import run_passes
from tests.shard_subprocess import report

SPLIT = "split-tokens{wave=2,force=true}"
CHUNK = "chunk-collective{chunks=2}"
PIPELINES = {
    "none": "",
    "reorder-norm": "reorder-norm",
    "split-tokens": SPLIT,
    "chunk-collective": CHUNK,
    "chunk-collective-bidirectional": "chunk-collective{chunks=2,bidirectional=true}",
    "all-three": f"{SPLIT},reorder-norm,{CHUNK}",
}
DIFFERENTIATED = ("reorder-norm", "split-tokens", "chunk-collective", "all-three")


def block() -> Any:
    return tp_block(8, p=16, d=8, h=8, g=1, e=4, f=4, i=16).with_sizes()


def inputs(c: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {t.name: tuple(int(c.size(r)) for r in t.ranks) for t in c.inputs}
    return {k: (rng.standard_normal(s) / 2).astype(np.float32) for k, s in shapes.items()}


def loss(f: Any, names: list[str]) -> Any:
    return lambda *xs: jnp.sum(jnp.sin(f.as_dict(**dict(zip(names, xs)))["Y"]))


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_pipelines() -> dict[str, Any]:
    base = block()
    arrays = inputs(base, 0)
    names = [t.name for t in base.inputs]
    xs = [arrays[n] for n in names]
    want = interpret(base, {k: v.astype(np.float64) for k, v in arrays.items()})["Y"]
    unsharded = emit_jax(replace(base, devices=()), jit=False)
    want_grads = jax.jit(jax.grad(loss(unsharded, names), argnums=tuple(range(len(xs)))))(*xs)
    out: dict[str, Any] = {}
    for name, pipeline in PIPELINES.items():
        c = run_passes(base, pipeline).cascade if pipeline else base
        f = emit_jax(c)
        result: dict[str, Any] = {"values": rel(f.as_dict(**arrays)["Y"], want)}
        lowered = jax.jit(emit_jax(c, jit=False), compiler_options=top_level_options()).lower(*xs)
        collectives = inspect_hlo(lowered).as_dict()["collectives"]
        result["hlo"] = {k: v["sync"] + v["async_start"] for k, v in collectives.items()}
        result["gathers"] = hlo_text(lowered).count(" gather(")
        if name in DIFFERENTIATED:
            plain = emit_jax(c, jit=False)
            grads = jax.jit(jax.grad(loss(plain, names), argnums=tuple(range(len(xs)))))(*xs)
            result["grads"] = max(rel(g, w) for g, w in zip(grads, want_grads))
        out[name] = result
    return out


def main() -> None:
    report({"pipelines": check_pipelines})


if __name__ == "__main__":
    sys.exit(main())
