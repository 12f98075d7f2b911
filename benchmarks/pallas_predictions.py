"""The cost model's predictions for the GPU attention table (issue 11), stated as such.

For each row of ``benchmarks/gpu_attention.py`` (B=1, H=16, D=128, bf16; TFLOP/s counts
4·S²·D·H, halved for causal) the Pallas kernel as the autotuner would choose it: the best
key tile, query tile, warps and stages the model finds among those that fit the target's
shared memory (``cost_model.kernel_footprint``), priced by ``cost_model.kernel_pallas``,
beside Pallas' own default blocks (128 x 128, 8 warps, 2 stages) and the JAX backend's loop
(tiles 512, priced by ``kernel_pallas.jax_loop_seconds``). No GPU is needed::

    python -m benchmarks.pallas_predictions [--target h200] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import itertools

from einfuse.autotune.loop_plan import planned_loops
from einfuse.autotune.providers import PALLAS_TILES
from einfuse.cost_model.kernel_footprint import KernelLoop, footprint
from einfuse.cost_model.kernel_pallas import jax_loop_seconds, pallas_seconds
from einfuse.cost_model.target import Target, get_target
from einfuse.einsum_cascade import attention
from einfuse.ir.dtypes import with_input_dtype
from einfuse.passes.fuse import fuse

LENGTHS = (1024, 4096, 16384, 32768)


def loop_of(n: int, causal: bool, dtype: str, key: int, q: int) -> KernelLoop:
    sizes = dict(p=n, m=n, e=128, f=128, h=16)
    c = with_input_dtype(attention("3pass", causal=causal, batch=False, **sizes), dtype)
    (planned,) = planned_loops(fuse(c, tile=key), tuple(sorted(sizes.items())))
    return planned.kernel(q, dtype)


def best(n: int, causal: bool, dtype: str, target: Target) -> tuple[float, str]:
    """The fastest predicted kernel that fits, and its blocks."""
    keys, queries, _ = PALLAS_TILES[target.device_kind]
    found: tuple[float, str] | None = None
    for key, q in itertools.product(keys, queries):
        loop = loop_of(n, causal, dtype, key, q)
        for warps, stages in itertools.product((4, 8), (1, 2, 3, 4)):
            if not footprint(loop, target, stages).fits:
                continue
            s = pallas_seconds(loop, target, warps, stages)
            if found is None or s < found[0]:
                found = (s, f"k{key} q{q} w{warps} s{stages}")
    assert found is not None
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="h200")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    target = get_target(args.target)
    print(f"predicted by the cost model for {target.name}, {args.dtype}: TFLOP/s (ms)")
    print("| S | causal | tuned kernel | blocks | Pallas default blocks | JAX loop |")
    print("|---|---|---|---|---|---|")
    for causal, n in itertools.product((False, True), LENGTHS):
        flops = 4 * n * n * 128 * 16 / (2 if causal else 1)
        s, blocks = best(n, causal, args.dtype, target)
        default = pallas_seconds(loop_of(n, causal, args.dtype, 128, 128), target, 8, 2)
        jax_loop = jax_loop_seconds(loop_of(n, causal, args.dtype, 512, 512), target)
        cells = [f"{flops / t / 1e12:.0f} ({t * 1e3:.3g})" for t in (s, default, jax_loop)]
        print(f"| {n} | {causal} | {cells[0]} | {blocks} | {cells[1]} | {cells[2]} |")


if __name__ == "__main__":
    main()
