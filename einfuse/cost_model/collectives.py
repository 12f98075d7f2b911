"""Collective communication time (alpha-beta model, ring algorithms) and compute overlap.

A collective over n devices is a sequence of steps; each step costs the link latency alpha and
moves its share of the bytes at the link bandwidth. With B the per-device buffer in bytes (the
buffer reduced for all-reduce, the full input of reduce-scatter, the full output of all-gather,
the buffer each device redistributes in all-to-all):

    all_reduce       2(n-1) alpha + 2(n-1)/n * B / bw       (reduce-scatter then all-gather)
    reduce_scatter    (n-1) alpha +  (n-1)/n * B / bw
    all_gather        (n-1) alpha +  (n-1)/n * B / bw
    all_to_all        (n-1) alpha +  (n-1)/n * B / bw       on a switch (pairwise exchange)
                      (n-1) alpha + floor(n^2/4)/n * B / bw on a ring or torus axis, where each
                                                            byte crosses n/4 links on average

The bandwidth is the link's line rate times its `bus_efficiency` (NCCL reaches ~82% of NVLink's
on a ring). `overlapped_time` is the T3-style pipeline: split a producer into chunks so that
each chunk's collective runs while the next chunk computes (``overlap`` adds contention).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from einfuse.cost_model.target import Interconnect

CollectiveKind = Literal["all_reduce", "reduce_scatter", "all_gather", "all_to_all"]

# Ring steps per collective, as a multiple of (n - 1).
_STEP_FACTOR = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "all_to_all": 1}


def _check(kind: str, n_bytes: float, n_devices: int) -> None:
    if kind not in _STEP_FACTOR:
        raise ValueError(
            f"unknown collective {kind!r}; known collectives: {', '.join(get_args(CollectiveKind))}"
        )
    if not n_bytes >= 0:
        raise ValueError(f"{kind}: byte count must be >= 0, got {n_bytes}")
    if n_devices < 1:
        raise ValueError(f"{kind}: needs at least one device, got {n_devices}")


def collective_latency_s(kind: CollectiveKind, n_devices: int, interconnect: Interconnect) -> float:
    """The size-independent part of a collective: one alpha per ring step."""
    _check(kind, 0, n_devices)
    return _STEP_FACTOR[kind] * (n_devices - 1) * interconnect.latency_s


def collective_transfer_s(
    kind: CollectiveKind,
    n_bytes: float,
    n_devices: int,
    interconnect: Interconnect,
    bidirectional: bool = True,
) -> float:
    """The bandwidth part of a collective: bytes on the busiest link over its bandwidth (a
    one-way ring, ``bidirectional=False``, gets half a ring or torus link: `ring_bandwidth`)."""
    _check(kind, n_bytes, n_devices)
    n = n_devices
    share = (n - 1) / n  # fraction of the buffer each device sends (or receives)
    if kind == "all_to_all" and interconnect.topology in ("ring", "torus_2d"):
        share = (n * n // 4) / n  # shortest-path hops summed over destinations, per device
    return _STEP_FACTOR[kind] * share * n_bytes / ring_bandwidth(interconnect, bidirectional)


def ring_bandwidth(interconnect: Interconnect, bidirectional: bool = True) -> float:
    """Bytes per second one device moves in a ring step, after protocol overhead.

    The figure of a ring or torus link counts both directions, which a library collective uses
    (two rings, one each way); a one-way hand-written ring (T3's ppermute ring without
    ``bidirectional``) gets half of it. A switch port's figure is one direction already, and
    a second ring through the same port shares it: no gain from going both ways.
    """
    bandwidth = interconnect.bandwidth_bytes_per_s * interconnect.bus_efficiency
    if not bidirectional and interconnect.topology in ("ring", "torus_2d"):
        return bandwidth / 2
    return bandwidth


def collective_time(
    kind: CollectiveKind,
    n_bytes: float,
    n_devices: int,
    interconnect: Interconnect,
    bidirectional: bool = True,
) -> float:
    """Seconds for one collective over `n_devices`; zero for a single device."""
    return collective_latency_s(kind, n_devices, interconnect) + collective_transfer_s(
        kind, n_bytes, n_devices, interconnect, bidirectional
    )


def overlapped_time(compute_s: float, comm_s: float, chunks: int, alpha_s: float = 0.0) -> float:
    """Time of a producer whose collective is pipelined with its compute in `chunks` pieces.

    `comm_s` is the unsplit collective's time and includes its fixed cost `alpha_s` once (pass
    `collective_latency_s(...)`); every extra chunk pays `alpha_s` again. With c = compute/k and
    m = (comm - alpha)/k + alpha per chunk, the pipeline takes c + (k-1) max(c, m) + m: the first
    chunk's compute, the slower stage k-1 times, then the last chunk's communication. One chunk
    is the serial compute + comm; more chunks approach max(compute, comm) until the repeated
    alpha dominates.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if compute_s < 0 or comm_s < 0 or alpha_s < 0:
        raise ValueError(
            f"times must be >= 0, got compute={compute_s}, comm={comm_s}, alpha={alpha_s}"
        )
    if comm_s == 0:
        return compute_s
    if alpha_s > comm_s:
        raise ValueError(f"alpha ({alpha_s} s) cannot exceed the whole collective ({comm_s} s)")
    compute_chunk = compute_s / chunks
    comm_chunk = (comm_s - alpha_s) / chunks + alpha_s
    return compute_chunk + (chunks - 1) * max(compute_chunk, comm_chunk) + comm_chunk


def best_chunk_count(compute_s: float, comm_s: float, alpha_s: float, max_chunks: int = 64) -> int:
    """The chunk count in [1, max_chunks] with the least overlapped time; ties go to fewer chunks.

    Returns 1 where overlap does not pay (small collectives dominated by alpha), which is the
    size threshold an overlap rewrite should respect.
    """
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    best, best_time = 1, math.inf
    for chunks in range(1, max_chunks + 1):
        time_s = overlapped_time(compute_s, comm_s, chunks, alpha_s)
        if time_s < best_time * (1 - 1e-12):
            best, best_time = chunks, time_s
    return best
