"""A matrix multiply's time on a target, and the efficiency it loses when it is small.

Overlap rewrites make GEMMs smaller (T3 computes a producer in chunks, TokenWeave in two halves
of the tokens), and a smaller GEMM runs further from peak; this is what decides whether they
pay. Four effects, all read from the target's data:

* **tiles**: a GPU GEMM computes its output in tm x tn tiles, one thread block (one SM) each;
  a dimension that the tile does not divide pays for the padded rest (tile quantization);
* **waves**: the tiles run in ``ceil(tiles / SMs)`` rounds and the last may leave SMs idle
  (wave quantization); with fewer SMs (some held by a collective) the same tiles take more;
* **tile intensity**: per step along K a tile reads ``(tm + tn) tk`` operands for ``tm tn tk``
  MACs, from L2 at each SM's share of its bandwidth. A tile whose intensity ``tm tn / (tm +
  tn)`` is below what keeps the tensor cores busy is operand-bound: its efficiency is the
  ratio, capped at 1. On an H100 this gives a 128 x 256 tile 78% of peak, about what cuBLAS
  reaches on large bf16 GEMMs, and smaller tiles less;
* **memory**: both operands are read and the result written at least once at HBM bandwidth
  (a chunked GEMM re-reads the whole weight matrix for every chunk).

The library is assumed to pick the fastest of ``GPU_TILES`` (cuBLAS' heuristics do choose
smaller tiles for small problems). A TPU v5e has one TensorCore (no waves) whose MXUs pad M
and N to 128; a CPU is a plain roofline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.precision import current_precision, dot_rate
from einfuse.cost_model.target import Target, canonical_dtype
from einfuse.cost_model.units import ELEMENT_BYTES

GPU_TILES: tuple[tuple[int, int], ...] = ((128, 256), (256, 128), (128, 128), (64, 256), (64, 128))
TPU_TILE = 128  # MXU side on v5e: M and N are padded to it


@dataclass(frozen=True, slots=True)
class GemmTime:
    """Seconds of one (m x k) @ (k x n) GEMM; ``efficiency`` is the MAC rate reached over peak."""

    seconds: float
    efficiency: float
    bound: str  # "compute" or "memory"
    tile: tuple[int, int]
    waves: int


def dtype_bytes(dtype: object) -> int:
    """Bytes of one element of ``dtype`` (bfloat16 -> 2)."""
    name = canonical_dtype(dtype)
    if name not in ELEMENT_BYTES:
        raise CostModelError(f"no element size for dtype {name!r}; known: {sorted(ELEMENT_BYTES)}")
    return ELEMENT_BYTES[name]


def matrix_rate(target: Target, dtype: object) -> float:
    """MACs per second of the matrix unit at ``dtype`` (float32 by the target's dot route)."""
    units = target.units_of("matrix")
    if not units:
        raise CostModelError(f"target {target.name!r} has no matrix unit")
    name = canonical_dtype(dtype)
    if name == "float32" and name not in units[0].dtypes:
        routed = dot_rate(target, current_precision())
        if routed is not None:
            return routed[1]
    try:
        return units[0].rate(name)
    except KeyError as error:
        raise CostModelError(str(error.args[0])) from None


def processors(target: Target) -> int:
    """Units that run GEMM tiles at once: SMs on a GPU (shared-memory instances), else 1."""
    if target.device_kind != "gpu":
        return 1
    return max((m.instances for m in target.memory if m.managed), default=1)


def gemm_time(
    m: int,
    n: int,
    k: int,
    dtype: object,
    target: Target,
    *,
    cores: int | None = None,
    hbm_bytes_per_s: float | None = None,
) -> GemmTime:
    """The GEMM's time on ``cores`` of the target's processors (default: all) with
    ``hbm_bytes_per_s`` of its main-memory bandwidth (default: all); see the module docstring."""
    if min(m, n, k) < 1:
        raise CostModelError(f"a GEMM needs positive sizes, got m={m}, n={n}, k={k}")
    total = processors(target)
    cores = total if cores is None else cores
    if not 1 <= cores <= total:
        raise CostModelError(f"{cores} cores requested; target {target.name!r} has {total}")
    rate = matrix_rate(target, dtype) * cores / total
    hbm = target.main_memory.bandwidth_bytes_per_s if hbm_bytes_per_s is None else hbm_bytes_per_s
    if not hbm > 0:
        raise CostModelError(f"HBM bandwidth must be > 0, got {hbm}")
    memory_s = (m * k + k * n + m * n) * dtype_bytes(dtype) / hbm
    macs = m * n * k
    if target.device_kind == "gpu":
        best = min(_gpu_tile_s(m, n, k, t, cores, rate, target, dtype) for t in GPU_TILES)
        compute_s, tile, waves = best
    elif target.device_kind == "cpu":
        compute_s, tile, waves = macs / rate, (m, n), 1
    else:
        padded = _round_up(m, TPU_TILE) * _round_up(n, TPU_TILE) * k
        compute_s, tile, waves = padded / rate, (TPU_TILE, TPU_TILE), 1
    seconds = max(compute_s, memory_s)
    bound = "compute" if compute_s >= memory_s else "memory"
    peak = matrix_rate(target, dtype) * cores / total
    return GemmTime(seconds, macs / (peak * seconds), bound, tile, waves)


def _gpu_tile_s(
    m: int, n: int, k: int, tile: tuple[int, int], cores: int, rate: float, target: Target, dtype
) -> tuple[float, tuple[int, int], int]:
    """(seconds, tile, waves): each SM runs its tiles at the tile's intensity-bound rate."""
    tm, tn = tile
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    waves = math.ceil(tiles / cores)
    per_sm_rate = rate / cores * tile_efficiency(tile, target, dtype)
    return waves * tm * tn * k / per_sm_rate, tile, waves


def tile_efficiency(tile: tuple[int, int], target: Target, dtype: object) -> float:
    """The fraction of peak one SM reaches on ``tile`` when its operands come from L2."""
    levels = [m for m in target.memory if m.name == "l2"]
    if not levels:
        return 1.0
    sms = processors(target)
    per_sm_macs = matrix_rate(target, dtype) / sms
    per_sm_l2 = levels[0].bandwidth_bytes_per_s / sms
    needed = per_sm_macs * dtype_bytes(dtype) / per_sm_l2  # MACs per operand element
    tm, tn = tile
    return min(1.0, tm * tn / (tm + tn) / needed)


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to
