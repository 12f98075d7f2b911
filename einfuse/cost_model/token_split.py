"""TokenWeave's token split: two halves of a batch, one half's all-reduce under the other's compute.

``split_gain`` prices a tensor-parallel Llama-style layer (``LayerShape``) run serially, each
sublayer's all-reduce after its compute, against the same layer on two halves of the tokens,
``first = round_up(T, 256) / 2 + offset`` and ``T - first``, on two streams: compute runs the
halves' sublayers in turn (half 0, half 1, half 0, ...), each waiting for its own half's
previous all-reduce; communication runs each half's all-reduce when its compute is done. A
compute segment that runs while a collective is in flight is slowed by the contention of
``overlap`` (fewer SMs, less HBM bandwidth), for as long as the collective runs.

TokenWeave reads the offset from a per-model table measured offline; here it is derived per
shape: offsets over [-T/4, T/4] (``offsets``) are simulated, and the smallest ``|offset|``
within ``OFFSET_TOLERANCE`` of the fastest is taken (a flat optimum is no reason to move).
What moves the optimum: waves (a half whose GEMMs fill their last wave of tiles is cheaper
per token) and causal attention (later tokens attend to more keys, so with one sequence the
first half should get more tokens). A sublayer is: fused residual add + RMSNorm,
the column-parallel GEMM(s), attention or the SiLU gate, the row-parallel GEMM; its all-reduce
(or, with ``reorder_norm``, reduce-scatter + all-gather with the norm on the shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from einfuse.cost_model.collectives import collective_time, ring_bandwidth
from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.gemm import dtype_bytes, gemm_time, matrix_rate, processors
from einfuse.cost_model.overlap import (
    HBM_BYTES_PER_LINK_BYTE,
    MIN_GAIN,
    gemm_during_comm,
    interconnect_for,
    launch_s,
    micros,
)
from einfuse.cost_model.target import Interconnect, Target

MIN_SPLIT_TOKENS = 1024  # TokenWeave splits only batches of at least this many tokens
WAVE_ROUNDING = 256  # the split point is round_up(T, 256) / 2 + offset
OFFSET_CANDIDATES = 128  # offsets tried, over [-T/4, T/4] in steps of a multiple of 32
OFFSET_TOLERANCE = 0.005  # the smallest |offset| within 0.5% of the fastest: a flat optimum
# FlashAttention's MAC rate over peak at large sizes: cuDNN's causal attention measured at
# 569 of 989 TFLOP/s on an H200 (benchmarks/RESULTS.md, 16K tokens).
ATTENTION_EFFICIENCY = 0.58
ATTENTION_BLOCK = 128  # query rows per attention program
LAYERS = 8  # simulated layers; the halves carry across layers, fill and drain amortize


@dataclass(frozen=True, slots=True)
class LayerShape:
    """One transformer layer under tensor parallelism over ``tp`` devices. ``seq_len``: the
    batch is causal sequences of this many tokens (None: one sequence of all tokens)."""

    tokens: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int | None = None
    seq_len: int | None = None

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass(frozen=True, slots=True)
class SplitGain:
    """Per-layer seconds serial and split; ``first`` tokens go to half 0."""

    serial_s: float
    split_s: float
    offset: int
    first: int
    why: str

    @property
    def gain(self) -> float:
        return 1 - self.split_s / self.serial_s

    @property
    def applies(self) -> bool:
        return self.split_s < self.serial_s


@dataclass(frozen=True, slots=True)
class _Segment:
    alone_s: float  # compute with no collective in flight
    busy_s: float  # compute while one is
    comm_s: float  # the collective that follows it


def split_gain(
    layer: LayerShape,
    *,
    tp: int,
    target: Target,
    dtype: object = "bfloat16",
    reorder_norm: bool = False,
    offset: int | None = None,
) -> SplitGain:
    """TokenWeave's split of ``layer.tokens`` in two, at the best offset (see module
    docstring), or at ``offset`` alone (the autotuner's given choice)."""
    ic = interconnect_for(target, tp)
    _check(layer, tp)
    t = layer.tokens
    serial = _simulate(layer, [(0, t)], tp, target, ic, dtype, reorder_norm)
    if t < MIN_SPLIT_TOKENS:
        why = f"not applied: {t} tokens < {MIN_SPLIT_TOKENS} (TokenWeave splits only large batches)"
        return SplitGain(serial, serial, 0, t, why)
    if not ic.asynchronous or tp == 1:
        why = f"not applied: {target.name} cannot overlap collectives with compute"
        return SplitGain(serial, serial, 0, t, why if tp > 1 else "one device: no collective")
    middle = -(-t // WAVE_ROUNDING) * WAVE_ROUNDING // 2
    timed = [
        (_simulate(layer, [(0, middle + o), (middle + o, t - middle - o)], tp, target, ic,
                   dtype, reorder_norm), o)
        for o in (offsets(t) if offset is None else [offset])
        if 0 < middle + o < t
    ]  # fmt: skip
    if not timed:
        why = f"not applied: first half {middle}{offset:+d} is not in (0, {t})"
        return SplitGain(serial, serial, offset or 0, t, why)
    fastest = min(time_s for time_s, _ in timed)
    split, offset = next(x for x in timed if x[0] <= fastest * (1 + OFFSET_TOLERANCE))
    first = middle + offset
    gain = 1 - split / serial
    numbers = (
        f"{micros(serial)} -> {micros(split)} per layer ({-gain:+.1%}) with halves {first} + "
        f"{t - first} (round_up({t}, {WAVE_ROUNDING})/2 {offset:+d})"
    )
    if gain < MIN_GAIN:
        return SplitGain(serial, serial, offset, first, f"not applied: {numbers}")
    return SplitGain(serial, split, offset, first, f"split: {numbers}")


def offsets(tokens: int) -> list[int]:
    """Split offsets to try, smallest first: multiples of 32 (a quarter GEMM tile) up to
    ``tokens / 4`` either way, coarser for large batches to keep ``OFFSET_CANDIDATES``."""
    step = 32 * max(1, -(-tokens // (2 * 32 * OFFSET_CANDIDATES)))
    reach = tokens // 4 // step * step
    return sorted(range(-reach, reach + 1, step), key=lambda o: (abs(o), o))


def _check(layer: LayerShape, tp: int) -> None:
    sizes = (layer.tokens, layer.hidden, layer.ffn, layer.heads, layer.kv_heads, layer.dim)
    if min(sizes) < 1 or (layer.seq_len is not None and layer.seq_len < 1):
        raise CostModelError(f"a layer needs positive sizes, got {layer}")
    if layer.heads % tp or (layer.kv_heads % tp and tp % layer.kv_heads) or layer.ffn % tp:
        raise CostModelError(
            f"TP degree {tp} must divide heads ({layer.heads}) and ffn ({layer.ffn}), and "
            f"divide or be a multiple of kv_heads ({layer.kv_heads})"
        )


def _simulate(
    layer: LayerShape,
    halves: list[tuple[int, int]],
    tp: int,
    target: Target,
    ic: Interconnect,
    dtype: object,
    reorder_norm: bool,
) -> float:
    """Per-layer seconds of ``halves`` ((first token, tokens) each) on two streams."""
    per_half = [_segments(layer, start, n, tp, target, ic, dtype, reorder_norm)
                for start, n in halves]  # fmt: skip
    order = [(h, s) for _ in range(LAYERS) for s in range(2) for h in range(len(halves))]
    compute_free = comm_free = 0.0
    ready = [0.0] * len(halves)  # when each half's last collective ended
    busy: list[tuple[float, float]] = []
    for h, s in order:
        seg = per_half[h][s]
        start = max(compute_free, ready[h])
        compute_free = _finish(start, seg.alone_s, seg.busy_s, busy)
        begin = max(comm_free, compute_free)
        comm_free = ready[h] = begin + seg.comm_s
        busy.append((begin, comm_free))
    return max(comm_free, compute_free) / LAYERS


def _finish(start: float, alone: float, slowed: float, busy: list[tuple[float, float]]) -> float:
    """When compute of ``alone`` seconds started at ``start`` ends, running ``slowed / alone``
    times slower while any collective in ``busy`` (ordered, disjoint intervals) is in flight."""
    now, left = start, alone
    rate = alone / slowed if slowed > 0 else 1.0
    for a, b in busy:
        if b <= now:
            continue
        if a > now:
            if left <= a - now:
                return now + left
            left -= a - now
            now = a
        if left <= (b - now) * rate:
            return now + left / rate
        left -= (b - now) * rate
        now = b
    return now + left


def _segments(
    layer: LayerShape,
    start: int,
    n: int,
    tp: int,
    target: Target,
    ic: Interconnect,
    dtype: object,
    reorder_norm: bool,
) -> tuple[_Segment, _Segment]:
    """The attention and MLP sublayers of ``n`` tokens from position ``start``."""
    h, d, f = layer.hidden, layer.dim, layer.ffn // tp
    heads = layer.heads // tp
    qkv = (layer.heads + 2 * layer.kv_heads) * d // tp if layer.kv_heads >= tp else (
        (layer.heads // tp + 2) * d)  # fmt: skip
    launch = launch_s(target)
    hbm = target.main_memory.bandwidth_bytes_per_s
    hbm_busy = max(hbm - HBM_BYTES_PER_LINK_BYTE * ring_bandwidth(ic), 0.1 * hbm)
    elem = dtype_bytes(dtype)
    norm_rows = -(-n // tp) if reorder_norm else n
    norm_bytes = 4 * norm_rows * h * elem
    gate_bytes = 3 * n * f * elem
    nbytes = n * h * elem
    if reorder_norm:
        comm = collective_time("reduce_scatter", nbytes, tp, ic) + collective_time(
            "all_gather", nbytes, tp, ic
        )
        comm += 2 * launch
    else:
        comm = collective_time("all_reduce", nbytes, tp, ic) + launch

    def gemms(shapes: list[tuple[int, int]], busy: bool) -> float:
        if busy:
            return sum(gemm_during_comm(n, c, k, dtype, target, ic, True).seconds
                       for c, k in shapes)  # fmt: skip
        return sum(gemm_time(n, c, k, dtype, target).seconds for c, k in shapes)

    sublayers = []
    for shapes, extra_bytes, attention in (
        ([(qkv, h), (h, heads * d)], 0, True),
        ([(2 * f, h), (h, f)], gate_bytes, False),
    ):
        times = []
        for busy in (False, True):
            bw = hbm_busy if busy else hbm
            t = gemms(shapes, busy) + (norm_bytes + extra_bytes) / bw + 4 * launch
            if attention:
                t += _attention_s(layer, start, n, heads, target, dtype, ic, busy)
            times.append(t)
        sublayers.append(_Segment(times[0], times[1], comm))
    return sublayers[0], sublayers[1]


def _attention_s(
    layer: LayerShape,
    start: int,
    n: int,
    heads: int,
    target: Target,
    dtype: object,
    ic: Interconnect,
    busy: bool,
) -> float:
    """Causal attention of tokens [start, start + n): each attends to its sequence so far."""
    seq = layer.seq_len or layer.tokens
    keys = 0
    pos = start
    while pos < start + n:  # the pieces of the range in each sequence
        offset = pos % seq
        piece = min(seq - offset, start + n - pos)
        keys += (offset + piece) * (offset + piece + 1) // 2 - offset * (offset + 1) // 2
        pos += piece
    macs = 2 * keys * layer.dim * heads
    total = processors(target)
    cores = max(1, total - ic.collective_cores) if busy and target.device_kind == "gpu" else total
    programs = math.ceil(n / ATTENTION_BLOCK) * heads
    occupancy = programs / (math.ceil(programs / cores) * cores)
    rate = matrix_rate(target, dtype) * cores / total * ATTENTION_EFFICIENCY * occupancy
    return macs / rate
