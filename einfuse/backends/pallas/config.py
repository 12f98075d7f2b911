"""What a Schedule sets in a Pallas kernel besides its tiles: the compiler's knobs.

The query block is the Schedule's tile of the query rank (``fuse.query_tile``), the key
block the tile ``fuse`` partitioned the key rank with; Triton also takes the warps per
program and the software-pipelining stages of its key loop (``pallas.num_warps``,
``pallas.num_stages``). On a TPU every grid dimension (rows, query blocks) is parallel.
``pallas.kernel=false`` keeps the JAX backend's loop for the group, so the autotuner can
pick it where the kernel loses (the unfused program stays a candidate through ``fuse``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from einfuse.errors import EinfuseError
from einfuse.ir.schedule import Schedule

NUM_WARPS, NUM_STAGES = "pallas.num_warps", "pallas.num_stages"
KERNEL = "pallas.kernel"  # false: the fused group runs as the JAX backend's loop instead
ROWWISE = "pallas.rowwise"  # false: row-wise groups (norm + matmul) run as XLA ops
SCHEDULE_FIELDS = frozenset({"fuse.query_tile", NUM_WARPS, NUM_STAGES, KERNEL, ROWWISE})
# Where a key input (K, V) may be placed: ``vmem`` holds each program's whole key range as
# one block; ``hbm`` leaves it in HBM and streams its tiles by double-buffered DMA (TPU).
PLACEMENTS = ("vmem", "hbm")
DEFAULT_QUERY_TILE = 128


class PlacementError(EinfuseError):
    """A Schedule places a tensor where the Pallas kernel cannot put it."""


class KernelOptionError(EinfuseError):
    """A Schedule sets a Pallas kernel option to a value the kernel cannot take."""


# the query block of Pallas' own GPU attention kernel


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Triton's warps and stages (None: Pallas' defaults)."""

    num_warps: int | None = None
    num_stages: int | None = None
    interpret_tpu: bool = False  # run the TPU kernel in Mosaic's interpreter (a CPU check)

    def __str__(self) -> str:
        return ", ".join(
            f"{name} {'default' if v is None else v}"
            for name, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages))
        )

    @classmethod
    def from_schedule(cls, schedule: Schedule | None, interpret_tpu: bool = False) -> KernelConfig:
        if schedule is None:
            return cls(interpret_tpu=interpret_tpu)
        values = []
        for name in (NUM_WARPS, NUM_STAGES):
            v = schedule.option(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise KernelOptionError(f"schedule option {name}={v!r}: a positive int")
            values.append(v)
        return cls(*values, interpret_tpu=interpret_tpu)

    def compiler_params(self, platform: str, grid_dims: int) -> Any:
        """The ``pallas_call`` compiler params for ``platform`` (None on the CPU)."""
        if platform in ("cuda", "rocm"):
            from jax.experimental.pallas import triton as pl_triton

            return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)
        if platform == "tpu":
            from jax.experimental.pallas import tpu as pl_tpu

            return pl_tpu.CompilerParams(dimension_semantics=("parallel",) * grid_dims)
        return None
