"""The time of a fused group's loop run as one Pallas kernel (a `KernelLoop`) on a GPU or TPU.

A simple model, stated so its predictions can be checked against a table of measurements:

* **one key step** of one program runs its work one operation after another (the dots, the
  exponentials, the vector ops of the online softmax: a program's warps issue them in
  sequence), each at its unit's rate divided among the cores (SMs; one TensorCore on a
  v5e). Dots run on the matrix unit in their dtype: bfloat16 and float16 on the tensor
  cores; a float32 dot at the target's float32 route for JAX's matmul precision, which by
  default on an NVIDIA GPU is TF32 on the tensor cores (Pallas' Triton lowering runs a
  float32 dot at DEFAULT or HIGH precision as TF32, at HIGHEST as IEEE float32), on a TPU
  one bfloat16 MXU pass;
* **streamed tiles** (K, V) come from L2 on a GPU (every query block of a row reads the
  same keys), at each SM's share of its bandwidth; with ``num_stages >= 2`` the copy of the
  next tile overlaps this step's work (Triton's software pipelining), with 1 it adds. On a
  TPU a row's keys are in VMEM (``kernel_footprint``): no per-step copy;
* **the grid** (rows x query blocks) runs in parallel over the SMs, in waves: equal
  programs take ``ceil(programs / SMs)`` program times; under a causal band (fewer key tiles
  for the first query blocks) the longer of the average load per SM and the longest
  program. A TPU v5e runs the programs one after another on its one core;
* **registers**: a GPU program whose carried state and score tile exceed what
  ``num_warps`` warps hold (255 32-bit registers a thread) spills, priced as twice the step's
  compute;
* the kernel takes at least its compulsory HBM traffic (each row's K and V once, each query
  block and carried state in and out once) at HBM bandwidth, plus a kernel launch.

`jax_loop_seconds` prices the same loop as the JAX backend runs it (``pallas.kernel=false``):
rows, query blocks and key steps one after another, each step's contractions and reductions
an XLA kernel of their own (a launch each) at the whole device's rates, and on a GPU a
while-loop trip per step (XLA:GPU reads the loop predicate back to the host).
"""

from __future__ import annotations

import math

from einfuse.cost_model.kernel_footprint import KernelLoop, footprint, kernel_level
from einfuse.cost_model.overheads import Overheads
from einfuse.cost_model.target import Target
from einfuse.cost_model.units import einsum_charges
from einfuse.cost_model.work import einsum_work
from einfuse.ir.dtypes import tensor_dtypes

# One trip of an XLA:GPU while loop beyond its kernels (the predicate read back to the host):
# fitted to the fused JAX loop measured on an H200 (3-pass attention, 4096 x 4096, head
# dim 64, tiles 512 x 512: 1.28 ms for 64 steps of 5 kernels each, 2 us a launch).
GPU_LOOP_TRIP_S = 10e-6
REGISTER_BYTES_PER_THREAD = 255 * 4  # CUDA: at most 255 32-bit registers per thread
DEFAULT_NUM_WARPS, DEFAULT_NUM_STAGES = 4, 3  # Pallas' Triton CompilerParams defaults


def step_compute_s(loop: KernelLoop, target: Target, precision: str | None = None) -> float:
    """Seconds of one key step of one program on one core, its operations in sequence;
    float32 dots at ``precision`` (default: JAX's matmul precision now)."""
    from einfuse.cost_model.model import work_dtype

    body = loop.body
    sizes = dict(loop.body_sizes)
    ir = tensor_dtypes(body)
    dtypes = [work_dtype(e, ir, loop.dtype) for e in body.einsums]
    work = [einsum_work(e) for e in body.einsums]
    charges = einsum_charges(target, dtypes, body.einsums, work, {}, precision)
    total = 0.0
    for e, w, charge in zip(body.einsums, work, charges):
        macs = math.prod(sizes[r] for r in e.ranks) * w.macs
        vec, trans = w.counts(sizes)
        for _unit, cm, cv, ct, rate in charge:
            total += (macs * cm + vec * cv + trans * ct) / rate
    return total * cores(target)


def cores(target: Target) -> int:
    """Programs that run at once: the instances of the per-kernel level (SMs), else 1."""
    level = kernel_level(target)
    return level.instances if level is not None else 1


def program_steps(loop: KernelLoop) -> list[int]:
    """Key steps of each query block's program (a causal band visits tiles up to its
    diagonal: a sliding window is priced as causal)."""
    if not loop.causal:
        return [loop.key_steps] * loop.q_blocks
    return [
        min(loop.key_steps, -(-((j + 1) * loop.q_tile) // loop.key_tile))
        for j in range(loop.q_blocks)
    ]


def pallas_seconds(
    loop: KernelLoop,
    target: Target,
    num_warps: int | None = None,
    num_stages: int | None = None,
    overheads: Overheads | None = None,
) -> float:
    """Predicted seconds of ``loop`` as one Pallas kernel (see the module docstring)."""
    gpu = target.device_kind == "gpu"
    warps = num_warps or DEFAULT_NUM_WARPS
    stages = num_stages or DEFAULT_NUM_STAGES
    n = cores(target)
    compute = step_compute_s(loop, target)
    if gpu and footprint(loop, target, stages).registers > warps * 32 * REGISTER_BYTES_PER_THREAD:
        compute *= 2  # spilled to local memory
    stream = sum(b.bytes for b in loop.of_role("stream"))
    step = compute
    if gpu:
        fetch = stream / (_stream_bandwidth(target) / n)
        step = max(compute, fetch) if stages >= 2 else compute + fetch
    steps = program_steps(loop) * loop.rows
    if gpu:
        if len(set(steps)) == 1:
            busy = math.ceil(len(steps) / n) * steps[0]
        else:
            busy = max(sum(steps) / n, max(steps))
    else:
        busy = sum(steps)
    once = sum(b.bytes for b in (*loop.of_role("query"), *loop.of_role("carry")))
    hbm = loop.rows * (loop.key_steps * stream + loop.q_blocks * 2 * once)
    launch = (overheads or Overheads.default_for(target.device_kind)).kernel_s
    return max(busy * step, hbm / target.main_memory.bandwidth_bytes_per_s) + launch


def _stream_bandwidth(target: Target) -> float:
    """Where streamed tiles come from: the largest cache below main memory, else main memory."""
    caches = [m for m in target.memory[1:] if not m.managed]
    return (caches[0] if caches else target.main_memory).bandwidth_bytes_per_s


def jax_loop_seconds(loop: KernelLoop, target: Target, overheads: Overheads | None = None) -> float:
    """Predicted seconds of ``loop`` as the JAX backend's loop (see the module docstring)."""
    oh = overheads or Overheads.default_for(target.device_kind)
    kernels = 1 + sum(1 for e in loop.body.einsums if e.reduced_ranks)
    trip = kernels * oh.kernel_s + (GPU_LOOP_TRIP_S if target.device_kind == "gpu" else 0.0)
    # Each op of a step is its own fusion: the score tile goes out to main memory and back
    # between them, and the key tiles are read, with nothing overlapping in a serial loop.
    score = sum(b.bytes for b in loop.of_role("score"))
    stream = sum(b.bytes for b in loop.of_role("stream"))
    traffic = (stream + 2 * score * max(kernels - 1, 1)) / target.main_memory.bandwidth_bytes_per_s
    step = step_compute_s(loop, target) / cores(target) + trip + traffic
    return sum(program_steps(loop)) * loop.rows * step
