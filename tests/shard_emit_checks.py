"""Emission checks on 8 simulated devices; run by tests/test_shard_emit.py in a subprocess
(XLA_FLAGS must be set before jax is imported). Prints one JSON object of results."""

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
from hypothesis import example, given, settings
from hypothesis import strategies as st

from einfuse.backends.inspection import hlo_text, inspect_hlo
from einfuse.backends.jax_backend import emit_jax
from einfuse.backends.reference import interpret
from einfuse.ir import parse
from einfuse.ir.devices import collectives
from einfuse.ir.errors import EinfuseError
from einfuse.ir.verify import verify
from tests.shard_subprocess import report

RTOL = ATOL = 1e-5  # float32 against the float64 reference; collectives reorder the sums

# One cascade per communication kind: (head of the body, einsum), over inputs A[x, t, h], W.
KINDS = {
    "local": "Y[x, t, d] = A[x, t, h] * W[h, d] * (x + 1)",
    "local_slice": "Y[x, t, h0] = A[x, t, h] * V[x*H0+h0, h]",
    "local_ring_slice": "Y[x, t0, h] = A[x, mod(x+1, X)*T0+t0, h] * X",
    "all_reduce": "Y[t, d] = A[y, t, h] * W[h, d]",
    "all_reduce_max": "Y[t, h] = max(y) A[y, t, h]",
    "reduce_scatter": "Y[x, t0, d] = A[y, x*T0+t0, h] * W[h, d]",
    "reduce_scatter_min": "Y[x, t0, h] = min(y) A[y, x*T0+t0, h]",
    "all_gather": "Y[z, t, h] = A[z, t, h] * 2.0",
    "ppermute_ring": "Y[x, t, h] = A[mod(x+1, X), t, h]",
    "ppermute_edge": "Y[x, t, h] = A[x-1, t, h]",
}


def cascade(kind: str, n: int, t0: int, h: int, d: int) -> Any:
    text = (
        f"ranks x={n}, y={n}, z={n}, t={n * t0}, t0={t0}, h={h}, h0={h // n}, d={d}\n"
        "device x on tp, y on tp\n"
        "inputs A[x, t, h], W[h, d], V[h, h]\n"
        f"{KINDS[kind]}\noutputs Y\n"
    )
    return verify(parse(text))


def inputs(c: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        t.name: rng.standard_normal(tuple(int(c.size(r)) for r in t.ranks)).astype(np.float32)
        for t in c.inputs
    }


def compare(kind: str, n: int, t0: int, h: int, d: int, seed: int) -> None:
    c = cascade(kind, n, t0, h, d)
    arrays = inputs(c, seed)
    got = emit_jax(c).as_dict(**arrays)["Y"]
    want = interpret(c, {k: v.astype(np.float64) for k, v in arrays.items()})["Y"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def for_kind(kind: str, seen: dict[str, set[int]]) -> Callable[[], None]:
    @settings(max_examples=2, deadline=None, database=None)
    @example(8, 2, 16, 3, 1)  # the full mesh, every kind
    @given(
        st.sampled_from([2, 4, 8]),
        st.integers(1, 3),
        st.sampled_from([8, 16]),
        st.integers(1, 4),
        st.integers(0, 2**31),
    )
    def check(n: int, t0: int, h: int, d: int, seed: int) -> None:
        compare(kind, n, t0, h, d, seed)
        seen.setdefault(kind, set()).add(n)

    return check


def check_kinds() -> dict[str, Any]:
    """Each kind, over hypothesis' small shapes and 2, 4 or 8 devices, equals the reference;
    and each test cascade is classified as the kind it is named after."""
    seen: dict[str, set[int]] = {}
    for kind in KINDS:
        for_kind(kind, seen)()
    classified = {}
    for kind in KINDS:
        moving = collectives(cascade(kind, 4, 2, 8, 3))
        classified[kind] = moving[0].kind if moving else "local"
    return {"checked": {k: sorted(v) for k, v in seen.items()}, "classified": classified}


def unsharded(c: Any) -> Any:
    """The same cascade on one device: device ranks read as plain ranks."""
    from dataclasses import replace

    return replace(c, devices=())


def loss(f: Callable[..., Any]) -> Callable[..., Any]:
    """A scalar of every output element, so each one's cotangent is non-trivial."""
    return lambda *args: sum(jnp.sum(jnp.sin(y)) for y in f(*args))


def check_grads() -> dict[str, float]:
    """jax.grad through every kind's shard_map equals the grad of the unsharded emission."""
    out = {}
    for kind in sorted(KINDS):
        c = cascade(kind, 4, 2, 8, 3)
        arrays = inputs(c, 7)
        names = [t.name for t in c.inputs]

        sharded = jax.jit(jax.grad(loss(emit_jax(c, jit=False)), argnums=(0, 1, 2)))
        plain = jax.jit(jax.grad(loss(emit_jax(unsharded(c), jit=False)), argnums=(0, 1, 2)))
        xs = [arrays[n] for n in names]
        got, want = sharded(*xs), plain(*xs)
        out[kind] = max(
            float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in zip(got, want)
        )
    return out


def check_source_and_hlo() -> dict[str, Any]:
    text = (
        "ranks x=8, y=8, z=8, t=16, t0=2, h=8, d=4\ndevice x on tp, y on tp\n"
        "inputs A[x, t, h], W[x, h, d]\n"
        "P[x, t, d] = A[x, t, h] * W[x, h, d]\n"
        "RS[x, t0, d] = P[y, x*T0+t0, d]\n"
        "AR[t, d] = P[y, t, d]\n"
        "G[z, t0, d] = RS[z, t0, d]\n"
        "R[x, t, d] = P[mod(x+1, X), t, d]\n"
        "outputs AR, G, R\n"
    )
    f = emit_jax(verify(parse(text)))
    arrays = inputs(f.cascade, 3)
    source = f.source()
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays.values()]
    summary = inspect_hlo(jax.jit(f).lower(*specs)).as_dict()["collectives"]
    counts = {k: v["sync"] + v["async_start"] for k, v in summary.items()}
    # A device's own offset in a data index is a dynamic slice, not a gather.
    gathers = {}
    for kind in ("local_slice", "local_ring_slice"):
        c = cascade(kind, 8, 2, 16, 3)
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs(c, 0).values()]
        gathers[kind] = hlo_text(jax.jit(emit_jax(c)).lower(*structs)).count(" gather(")
    return {"source": source, "hlo": counts, "gathers": gathers}


def check_too_few_devices() -> str:
    c = cascade("all_reduce", 16, 1, 16, 2)
    try:
        emit_jax(c).as_dict(**inputs(c, 0))
    except EinfuseError as exc:
        return str(exc)
    return "no error"


def main() -> None:
    report(
        {
            "kinds": check_kinds,
            "grads": check_grads,
            "source_and_hlo": check_source_and_hlo,
            "too_few_devices": check_too_few_devices,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
