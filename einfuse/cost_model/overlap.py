"""Does overlapping compute with a collective pay, and how finely to split: T3 and reorder-norm.

What the passes call (``split_gain``, TokenWeave's token halves, is in ``token_split``):

* ``chunk_gain``: a producer GEMM followed by the reduce-scatter (or all-reduce) of its partial
  sums, computed in N chunks of its rows so that chunk i's collective runs while chunk i+1
  computes (T3). Returns the best chunk count, 1 where chunking does not pay;
* ``reorder_norm_gain``: all-reduce + residual + RMSNorm against reduce-scatter + RMSNorm on
  the 1/n shard + all-gather (TokenWeave's reordering).

Each returns a frozen value with the serial and overlapped times and a ``why`` line naming the
bound and the numbers, so a pass can report why it did or did not apply. The model:

* collectives: alpha-beta rings (``collectives``), at the link's line rate times its
  ``bus_efficiency``; a chunked collective is a hand-written ring, one-way unless
  ``bidirectional`` (which only helps on ring and torus links, see ``ring_bandwidth``);
* GEMMs: ``gemm.gemm_time`` (tiles, waves over the SMs, operand intensity, HBM);
* launches: every chunk's GEMM and collective is a kernel launch (``Overheads.kernel_s``);
* contention (T3's point): while a collective runs it holds ``collective_cores`` SMs (NCCL's
  channels) and moves ``HBM_BYTES_PER_LINK_BYTE`` bytes of HBM traffic per byte on the link,
  so the compute it overlaps runs on fewer SMs with less memory bandwidth;
* a rewrite whose predicted saving is below ``MIN_GAIN`` of the serial time is not applied:
  the model's error is larger than that (the DESIGN's "overlap rewrites regress small GEMMs").
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.cost_model.collectives import (
    CollectiveKind,
    collective_time,
    ring_bandwidth,
)
from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.gemm import GemmTime, dtype_bytes, gemm_time, processors
from einfuse.cost_model.overheads import Overheads
from einfuse.cost_model.target import Interconnect, Target

# A ring reduction step reads the local partial and the received chunk and the peer writes
# that chunk into this device's memory: about 3 bytes of HBM traffic per byte on the link.
HBM_BYTES_PER_LINK_BYTE = 3.0
MIN_GAIN = 0.03  # below 3% of the serial time, a predicted gain is within the model's error


@dataclass(frozen=True, slots=True)
class ChunkGain:
    """T3 chunking of a producer GEMM and its collective, at the best chunk count."""

    serial_s: float
    overlapped_s: float  # at ``chunks``; equals ``serial_s`` when ``chunks == 1``
    chunks: int
    gemm_s: float  # the whole GEMM alone
    comm_s: float  # the whole collective alone
    why: str

    @property
    def gain(self) -> float:
        """Fraction of the serial time saved (0 when the rewrite does not apply)."""
        return 1 - self.overlapped_s / self.serial_s

    @property
    def applies(self) -> bool:
        return self.chunks > 1


@dataclass(frozen=True, slots=True)
class ReorderNormGain:
    """all-reduce + RMSNorm against reduce-scatter + RMSNorm on the shard + all-gather."""

    serial_s: float
    reordered_s: float
    why: str

    @property
    def gain(self) -> float:
        return 1 - self.reordered_s / self.serial_s

    @property
    def applies(self) -> bool:
        return self.gain >= MIN_GAIN


def interconnect_for(target: Target, tp: int) -> Interconnect:
    """The target's links, checked to join ``tp`` devices; a clear error otherwise."""
    ic = target.interconnect
    if ic is None:
        raise CostModelError(f"target {target.name!r} has no interconnect to run collectives on")
    if tp < 1:
        raise CostModelError(f"tensor-parallel degree must be >= 1, got {tp}")
    if ic.max_devices and tp > ic.max_devices:
        raise CostModelError(
            f"target {target.name!r} joins at most {ic.max_devices} devices at its link "
            f"bandwidth; TP degree {tp} would cross a slower network this model does not price"
        )
    return ic


def launch_s(target: Target) -> float:
    """One kernel launch (or collective start) on the target."""
    return (target.overheads or Overheads.default_for(target.device_kind)).kernel_s


def gemm_during_comm(
    m: int, n: int, k: int, dtype: object, target: Target, ic: Interconnect, bidirectional: bool
) -> GemmTime:
    """The GEMM while a collective runs: without the collective's SMs and HBM traffic."""
    total = processors(target)
    cores = max(1, total - ic.collective_cores) if target.device_kind == "gpu" else total
    hbm = target.main_memory.bandwidth_bytes_per_s
    left = hbm - HBM_BYTES_PER_LINK_BYTE * ring_bandwidth(ic, bidirectional)
    return gemm_time(m, n, k, dtype, target, cores=cores, hbm_bytes_per_s=max(left, 0.1 * hbm))


def stage_s(alone_s: float, contended_s: float, comm_s: float) -> float:
    """One pipeline stage: compute that runs slowed (``contended_s``) while a collective of
    ``comm_s`` is in flight and at full speed (``alone_s``) after it ends; the stage lasts
    until both are done."""
    if comm_s >= contended_s:
        return comm_s
    return comm_s + (1 - comm_s / contended_s) * alone_s


def chunk_gain(
    tokens: int,
    n: int,
    k: int,
    *,
    tp: int,
    target: Target,
    dtype: object = "bfloat16",
    kind: CollectiveKind = "reduce_scatter",
    bidirectional: bool = False,
    max_chunks: int = 16,
    chunks: int | None = None,
) -> ChunkGain:
    """T3 on a ``[tokens, k] @ [k, n]`` producer whose ``[tokens, n]`` partial sums are
    reduced over ``tp`` devices by ``kind``: the best chunk count of the token rows.

    Chunks = 1 is the serial GEMM then the library collective. With c chunks, the first chunk
    computes alone, each later one while its predecessor communicates (``stage_s``), and the
    last chunk's collective ends the pipeline; every chunk pays two launches. ``chunks``
    prices that count alone (the autotuner's given choice), still refused below ``MIN_GAIN``.
    """
    ic = interconnect_for(target, tp)
    if min(tokens, n, k) < 1 or max_chunks < 1:
        raise CostModelError(
            f"chunk_gain needs positive sizes and max_chunks, got tokens={tokens}, n={n}, "
            f"k={k}, max_chunks={max_chunks}"
        )
    launch = launch_s(target)
    full = gemm_time(tokens, n, k, dtype, target)
    nbytes = tokens * n * dtype_bytes(dtype)
    comm_full = collective_time(kind, nbytes, tp, ic) if tp > 1 else 0.0
    serial = full.seconds + comm_full + 2 * launch
    base = f"GEMM {micros(full.seconds)} ({full.bound}-bound, {full.efficiency:.0%} of peak) then "
    base += f"{kind.replace('_', '-')} {micros(comm_full)} on {tp} devices"
    if tp == 1:
        return ChunkGain(serial, serial, 1, full.seconds, 0.0, "one device: no collective")
    if not ic.asynchronous:
        why = f"not applied: {target.name} runs collectives synchronously, nothing overlaps; {base}"
        return ChunkGain(serial, serial, 1, full.seconds, comm_full, why)
    best, best_s, detail = 1, serial, ""
    tried = range(2, min(max_chunks, tokens) + 1) if chunks is None else (chunks,)
    for count in tried if chunks != 1 else ():
        rows = -(-tokens // count)
        alone = gemm_time(rows, n, k, dtype, target)
        busy = gemm_during_comm(rows, n, k, dtype, target, ic, bidirectional)
        m = collective_time(kind, nbytes / count, tp, ic, bidirectional) + launch
        c, c_busy = alone.seconds + launch, busy.seconds + launch
        total = c + (count - 1) * stage_s(c, c_busy, m) + m
        if total < best_s * (1 - 1e-12):
            best, best_s = count, total
            detail = (
                f"a chunk's GEMM {micros(c)} alone ({alone.efficiency:.0%} of peak), "
                f"{micros(c_busy)} while a collective holds {ic.collective_cores} SMs"
            )
    gain = 1 - best_s / serial
    if best == 1 or gain < MIN_GAIN:
        why = f"not applied: best is {best} chunk(s), saving {gain:.1%} < {MIN_GAIN:.0%}; {base}"
        return ChunkGain(serial, serial, 1, full.seconds, comm_full, why)
    why = f"{best} chunks: {micros(serial)} -> {micros(best_s)} (-{gain:.1%}); {base}; {detail}"
    return ChunkGain(serial, best_s, best, full.seconds, comm_full, why)


def norm_s(tokens: int, hidden: int, dtype: object, target: Target) -> float:
    """Fused residual add + RMSNorm over ``[tokens, hidden]``: memory-bound, it reads the
    reduced sum and the residual and writes the new residual and the normed activations."""
    moved = 4 * tokens * hidden * dtype_bytes(dtype) + hidden * dtype_bytes(dtype)
    return moved / target.main_memory.bandwidth_bytes_per_s + launch_s(target)


def reorder_norm_gain(
    tokens: int, hidden: int, *, tp: int, target: Target, dtype: object = "bfloat16"
) -> ReorderNormGain:
    """all-reduce + norm on all tokens against reduce-scatter + norm on ``tokens / tp`` rows
    + all-gather: the same ring traffic and alphas, 1/tp of the norm, one more launch."""
    ic = interconnect_for(target, tp)
    if min(tokens, hidden) < 1:
        raise CostModelError(f"reorder_norm_gain needs positive sizes, got {tokens}, {hidden}")
    nbytes = tokens * hidden * dtype_bytes(dtype)
    launch = launch_s(target)
    norm_full = norm_s(tokens, hidden, dtype, target)
    if tp == 1:
        return ReorderNormGain(norm_full, norm_full, "one device: no collective to reorder")
    all_reduce = collective_time("all_reduce", nbytes, tp, ic) + launch
    split = collective_time("reduce_scatter", nbytes, tp, ic) + collective_time(
        "all_gather", nbytes, tp, ic
    )
    norm_shard = norm_s(-(-tokens // tp), hidden, dtype, target)
    serial = all_reduce + norm_full
    reordered = split + 2 * launch + norm_shard
    gain = 1 - reordered / serial
    numbers = (
        f"all-reduce {micros(all_reduce)} + norm {micros(norm_full)} = {micros(serial)} against "
        f"reduce-scatter + all-gather {micros(split + 2 * launch)} + norm on 1/{tp} "
        f"{micros(norm_shard)} = {micros(reordered)} (memory-bound norm)"
    )
    verdict = f"saves {gain:.1%}" if gain >= MIN_GAIN else f"not applied: saves {gain:.1%}"
    return ReorderNormGain(serial, reordered, f"{verdict}; {numbers}")


def micros(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"
