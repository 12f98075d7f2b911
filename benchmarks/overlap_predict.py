"""What the overlap cost model predicts for a Llama-70B-like layer under TP=8: predictions, not
measurements (no multi-GPU machine here), next to what the T3 and TokenWeave papers report.

Per token count: T3's chunked reduce-scatter (``chunk_gain``) on the two row-parallel GEMMs
(attention output, ``[T, 1024] @ [1024, 8192]`` a device, and MLP down, ``[T, 3584] @ [3584,
8192]``), with NCCL's SMs taken from compute and, for comparison, without (T3's hardware
tracks and triggers DMA instead); reorder-norm (``reorder_norm_gain``) on all-reduce + RMSNorm
and on the whole layer; TokenWeave's split (``split_gain``) of the whole layer, alone and with
the reordered norm, with the chosen split point. Re-run it when the model changes:

    python -m benchmarks.overlap_predict --target h100 --tokens 1024,2048,4096,8192,16384
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from einfuse.cost_model.overlap import chunk_gain, reorder_norm_gain
from einfuse.cost_model.target import Target, get_target
from einfuse.cost_model.token_split import LayerShape, split_gain

HIDDEN, FFN, HEADS, KV_HEADS, TP = 8192, 28672, 64, 8, 8  # Llama-3-70B
PAPERS = (
    "T3 (Pati et al., ASPLOS 2024): communication-heavy sublayers 30% faster (geomean), up to "
    "47%, with hardware track-and-trigger and near-memory reductions; TokenWeave (2025): up to "
    "29% lower latency, with a fused all-reduce + RMSNorm on 2-8 SMs using NVLS multimem"
)


def rows(target: Target, tokens: list[int]) -> list[list[str]]:
    """One table row per token count (see the module docstring)."""
    free = dataclasses.replace(
        target, interconnect=dataclasses.replace(target.interconnect, collective_cores=0)
    )
    out = []
    for t in tokens:
        layer = LayerShape(t, HIDDEN, FFN, HEADS, KV_HEADS)
        oproj = chunk_gain(t, HIDDEN, HIDDEN // TP, tp=TP, target=target)
        down = chunk_gain(t, HIDDEN, FFN // TP, tp=TP, target=target)
        ideal = [chunk_gain(t, HIDDEN, k, tp=TP, target=free) for k in (HIDDEN // TP, FFN // TP)]
        norm = reorder_norm_gain(t, HIDDEN, tp=TP, target=target)
        split = split_gain(layer, tp=TP, target=target)
        both = split_gain(layer, tp=TP, target=target, reorder_norm=True)
        layer_reorder = 1 - both.serial_s / split.serial_s
        out.append(
            [
                str(t),
                f"{_speedup([oproj])} ({oproj.chunks})",
                f"{_speedup([down])} ({down.chunks})",
                f"{_speedup([oproj, down])} / {_speedup(ideal)}",
                f"{_pct(norm.gain)} / {_pct(layer_reorder)}",
                f"{_pct(split.gain)}",
                f"{split.first} + {t - split.first} ({split.offset:+d})",
                f"{_pct(1 - both.split_s / split.serial_s)}",
                f"{split.serial_s * 1e3:.2f}",
            ]
        )
    return out


HEADER = [
    "tokens",
    "T3 attn-out + RS: speedup (chunks)",
    "T3 MLP-down + RS: speedup (chunks)",
    "T3 geomean / without SM theft",
    "reorder-norm saves: AR+norm / layer",
    "TokenWeave split saves: layer",
    "halves (offset)",
    "split + reorder saves: layer",
    "serial layer (ms)",
]


def _speedup(gains: list) -> str:
    """Geometric mean of serial / overlapped over ``gains``, as T3 reports it."""
    speedups = [g.serial_s / g.overlapped_s for g in gains]
    return f"{math.prod(speedups) ** (1 / len(speedups)):.2f}x"


def _pct(saving: float) -> str:
    return f"{saving:.1%}" if saving > 0 else "0 (not applied)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="h100")
    parser.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    args = parser.parse_args()
    target = get_target(args.target)
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"Llama-70B-like layer, TP={TP}, bfloat16, on {target.name}:\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows(target, tokens):
        print("| " + " | ".join(row) + " |")
    print(f"\nPapers: {PAPERS}.")


if __name__ == "__main__":
    main()
