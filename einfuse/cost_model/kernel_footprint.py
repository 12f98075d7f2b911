"""What one Pallas kernel program holds on chip, and whether the target lets it.

The Pallas backend runs a fused group's loop as one ``pallas_call`` over (rows x query
blocks), each program looping over the key tiles (see ``einfuse.backends.pallas``). A
`KernelLoop` is that loop as the cost model needs it, read off the backend-neutral loop plan
(``einfuse.autotune.loop_plan.kernel_loops`` builds it from ``blockwise_plan.plan_loop``):
per program, the blocks it reads once (the query side: ``Q``), the tiles it streams per key
step (``K``, ``V``), the state it carries (running max, sum, ``P V``, at least float32) and
the largest step intermediate (the ``P0 x M0`` score tile, accumulated in float32).

Where they live, per platform (what each compiler allocates):

* GPU (Triton): the query block and ``num_stages`` buffers of every streamed tile are in
  shared memory (Triton's software pipeliner keeps one buffer per stage of each load it
  pipelines; the query block is a dot operand read every step); the carried state and the
  score tile are registers. The sum must fit the shared memory of one thread block
  (``per_kernel_bytes``: 227 KiB on an H100/H200), else Triton refuses with "Shared memory
  size limit exceeded". Checked against Triton 3.3.1's allocator for sm_90
  (``benchmarks/triton_shared_memory.py``): float32 exactly (327680 B at 128 x 128, head
  dim 128, 2 stages); bfloat16 got one buffer per load whatever the stages, so the count
  may refuse a bfloat16 schedule that compiles, not accept one that does not. XLA's Triton
  asked 262144 B for Pallas' own float32 ``mha`` at those blocks (no query block: it
  scales the query in registers first);
* TPU (Mosaic): every block of a BlockSpec is double-buffered in VMEM, and the kernel's
  key-tiled inputs are blocked over the whole key range of a row (one DMA per row, one tile
  sliced per step), so they count whole; the carried state and the score tile are VMEM
  values too. The sum must fit the scoped VMEM limit (16 MiB on a v5e);
* CPU (interpret mode): no limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from einfuse.cost_model.target import MemoryLevel, Target
from einfuse.ir.cascade import Cascade
from einfuse.ir.dtypes import ITEMSIZE

Role = str  # "query" (read once), "stream" (one tile per key step), "carry", "score"


@dataclass(frozen=True, slots=True)
class LoopBlock:
    """One array a program holds: its per-program extents (rows dropped, the query rank at
    the query tile, the key rank at the key tile) and dtype."""

    name: str
    role: Role
    dims: tuple[int, ...]
    dtype: str

    @property
    def bytes(self) -> int:
        return math.prod(self.dims) * ITEMSIZE[self.dtype]

    def describe(self) -> str:
        shape = "x".join(map(str, self.dims)) or "scalar"
        return f"{self.name.removesuffix('__qm')} {shape} {self.dtype}"


@dataclass(frozen=True, slots=True)
class KernelLoop:
    """A fused group's loop as one kernel: its grid, its key loop and its blocks.

    ``body`` is one key step with the query rank at ``q_tile`` (``body_sizes``): what the
    cost model counts one step's work on; ``loop_rank`` names the cost model's kernel of the
    group (``loop m1``) that this kernel replaces.
    """

    loop_rank: str
    rows: int  # programs along the grid's first axis (batch x heads)
    q_tile: int
    q_blocks: int
    key_tile: int
    key_steps: int
    causal: bool  # key tiles above the band's edge are never visited
    blocks: tuple[LoopBlock, ...]
    body: Cascade
    body_sizes: tuple[tuple[str, int], ...]
    dtype: str  # the cascade's compute dtype (its inputs')
    carry_dtype: str

    @property
    def programs(self) -> int:
        return self.rows * self.q_blocks

    def of_role(self, role: Role) -> tuple[LoopBlock, ...]:
        return tuple(b for b in self.blocks if b.role == role)


@dataclass(frozen=True, slots=True)
class KernelFootprint:
    """The bytes one program holds at the target's per-kernel level, part by part."""

    level: MemoryLevel | None  # None: the target bounds nothing (a CPU runs interpreted)
    parts: tuple[tuple[str, int], ...]  # (what, bytes) at that level
    registers: int  # bytes a GPU program keeps in registers (carry, score tile)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.parts)

    @property
    def fits(self) -> bool:
        return self.level is None or self.bytes <= self.level.kernel_capacity_bytes

    def refusal(self, target: Target) -> str:
        """Why the kernel cannot compile on ``target`` ("" when it fits)."""
        if self.fits:
            return ""
        assert self.level is not None
        where = "per block" if target.device_kind == "gpu" else "per kernel"
        parts = ", ".join(what for what, _ in self.parts)
        level = self.level.name.replace("_", " ")
        return (
            f"needs {self.bytes} B of {level} {where} ({parts}); "
            f"{target.name} has {int(self.level.kernel_capacity_bytes)} B"
        )


def kernel_level(target: Target) -> MemoryLevel | None:
    """The managed level whose per-kernel capacity bounds a program, if the target has one."""
    levels = [m for m in target.memory[1:] if m.managed and m.per_kernel_bytes is not None]
    return max(levels, key=lambda m: m.capacity_bytes, default=None)


def footprint(
    loop: KernelLoop, target: Target, num_stages: int = 1, streamed: frozenset[str] = frozenset()
) -> KernelFootprint:
    """What one program of ``loop`` holds on ``target`` (see the module docstring);
    ``streamed``: key inputs placed in HBM, of which a TPU program holds two tiles."""
    level = kernel_level(target)
    query, stream = loop.of_role("query"), loop.of_role("stream")
    carry, score = loop.of_role("carry"), loop.of_role("score")
    parts: list[tuple[str, int]] = []
    registers = 0
    if level is None:
        return KernelFootprint(None, (), 0)
    if target.device_kind == "gpu":
        parts.append(_part("query", 1, query))
        parts.append(_part("K/V", num_stages, stream, f"{num_stages} stages"))
        registers = _sum(carry) + _sum(score)
    else:  # Mosaic: each BlockSpec block twice (double-buffered); key inputs whole per row
        parts.append(_part("query", 2, query, "2 buffers"))
        whole = tuple(b for b in stream if b.name not in streamed)
        rows = 2 * loop.key_steps
        parts.append(_part("K/V", rows, whole, f"2 buffers x {loop.key_steps} tiles"))
        dma = tuple(b for b in stream if b.name in streamed)
        parts.append(_part("streamed K/V", 2, dma, "2 DMA slots"))
        # Carried state: its initial block in and its final block out, double-buffered,
        # and the value the loop updates.
        parts.append(_part("carried state", 5, carry, "5 copies"))
        parts.append(_part("score tile", 1, score))
    return KernelFootprint(level, tuple(p for p in parts if p[1]), registers)


def _sum(blocks: tuple[LoopBlock, ...]) -> int:
    return sum(b.bytes for b in blocks)


def _part(
    what: str, copies: int, blocks: tuple[LoopBlock, ...], times: str = ""
) -> tuple[str, int]:
    """``("K/V 2 stages x (K 128x64 bfloat16 + V ...) = 65536 B", 65536)``."""
    listed = " + ".join(b.describe() for b in blocks)
    if times:
        listed = f"{times} x ({listed})" if len(blocks) > 1 else f"{times} x {listed}"
    n = copies * _sum(blocks)
    return f"{what} {listed} = {n} B", n
