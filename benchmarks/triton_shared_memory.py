"""Shared memory Triton allocates for a flash-attention program, beside the cost model's count.

``cost_model.kernel_footprint`` counts, per GPU program, the query block plus ``num_stages``
buffers of each streamed key tile. This compiles a flash-attention forward written in Triton
the way the Pallas kernel's body runs (the query block loaded once, K and V tiles loaded per
key step, ``P V`` in float32 as the fused cascade casts it) for an sm_90 target, with no GPU
(``triton.compile`` to a cubin with the bundled ptxas), and prints ``metadata.shared``.

Measured with triton 3.3.1 (``pip install triton``; not a dependency of einfuse):
float32 agrees exactly (327680 B at 128 x 128, head dim 128, 2 stages; 163840 B at 64 x 64);
bfloat16 gets one buffer per load whatever ``num_stages`` (98304 B at 128 x 128 x 128), so
the model over-counts bfloat16 by the extra stages: it may refuse a schedule that compiles,
never accept one that does not. XLA's own Triton (what Pallas uses on the GPU) may differ;
on the H200 it asked 262144 B for Pallas' ``mha`` at float32, 128 x 128 x 128, 2 stages::

    python -m benchmarks.triton_shared_memory [--cc 90]
"""

from __future__ import annotations

import argparse

from einfuse.autotune.loop_plan import planned_loops
from einfuse.cost_model.kernel_footprint import footprint
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade import attention
from einfuse.ir.dtypes import with_input_dtype
from einfuse.passes.fuse import fuse

try:
    import triton
    import triton.language as tl
except ImportError:  # pip install triton (a GPU is not needed)
    raise SystemExit("this script needs triton: pip install triton") from None

CONFIGS = [  # dtype, query block, key block, head dim, warps, stages
    ("float32", 128, 128, 128, 8, 2),
    ("float32", 64, 64, 128, 4, 2),
    ("float32", 128, 64, 128, 8, 3),
    ("bfloat16", 128, 128, 128, 8, 1),
    ("bfloat16", 128, 128, 128, 8, 3),
    ("bfloat16", 128, 256, 128, 8, 2),
]


@triton.jit
def flash(Q, K, V, O, N, BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr):
    oq = tl.program_id(0) * BQ + tl.arange(0, BQ)
    row = tl.program_id(1) * N * D
    od = tl.arange(0, D)
    q = tl.load(Q + row + oq[:, None] * D + od[None, :])
    m = tl.full([BQ], float("-inf"), tl.float32)
    s = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, D], tl.float32)
    for start in range(0, N, BK):
        ok = start + tl.arange(0, BK)
        k = tl.load(K + row + ok[:, None] * D + od[None, :])
        v = tl.load(V + row + ok[:, None] * D + od[None, :])
        qk = tl.dot(q, tl.trans(k))
        new = tl.maximum(m, tl.max(qk, 1))
        p = tl.exp(qk - new[:, None])
        scale = tl.exp(m - new)
        s = s * scale + tl.sum(p, 1)
        acc = acc * scale[:, None] + tl.dot(p, v.to(tl.float32))
        m = new
    tl.store(O + row + oq[:, None] * D + od[None, :], acc / s[:, None])


def triton_shared(dtype: str, bq: int, bk: int, d: int, warps: int, stages: int, cc: int) -> int:
    """``metadata.shared`` of ``flash`` compiled for compute capability ``cc``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {"float32": "*fp32", "bfloat16": "*bf16"}[dtype]
    signature = {"Q": ptr, "K": ptr, "V": ptr, "O": "*fp32", "N": "i32"}
    signature |= dict.fromkeys(("BQ", "BK", "D"), "constexpr")
    src = ASTSource(flash, signature=signature, constexprs={"BQ": bq, "BK": bk, "D": d})
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options).metadata.shared


def model_shared(dtype: str, bq: int, bk: int, d: int, stages: int) -> int:
    sizes = dict(p=1024, m=1024, e=d, f=d)
    c = with_input_dtype(attention("3pass", heads=False, batch=False, **sizes), dtype)
    (planned,) = planned_loops(fuse(c, tile=bk), tuple(sorted(sizes.items())))
    return footprint(planned.kernel(bq, dtype), get_target("h200"), stages).bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, default=90, help="compute capability (90: H100/H200)")
    args = ap.parse_args()
    print("| dtype | q x k x d | warps | stages | Triton B | model B |")
    print("|---|---|---|---|---|---|")
    for dtype, bq, bk, d, warps, stages in CONFIGS:
        got = triton_shared(dtype, bq, bk, d, warps, stages, args.cc)
        want = model_shared(dtype, bq, bk, d, stages)
        print(f"| {dtype} | {bq}x{bk}x{d} | {warps} | {stages} | {got} | {want} |")


if __name__ == "__main__":
    main()
