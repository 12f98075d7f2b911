"""Fixed costs the roofline misses: per kernel, per loop step, per operation, per dot operand.

A target may carry its own (the calibrated host does, see ``calibrate``); otherwise
``Overheads.default_for`` gives figures per device kind.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Overheads:
    """Fixed costs per kernel, per loop step, per operation in a loop, per dot operand element.

    Operations are the Einsums, each counted once per step it runs (hoisted ones less often),
    plus one slice or update per tile moved across the kernel boundary. ``dot_*_element_s`` is
    what a CPU matrix multiply step costs beyond its MACs per element of its result tile
    (written, then added into the partial sum) and of its operand tiles (packed into the GEMM's
    panels): why thin tiles and tiled reductions run slower than a roofline predicts.
    ``slice_element_s`` is what each element of a tile moved across the kernel boundary costs
    beyond its bytes (XLA:CPU's dynamic slice or update copies it element by element into or
    out of a buffer of its own, then the dot reads that copy): why a loop order that slices a
    large operand tile again every step runs much slower than one that slices it once.

    The nominal CPU figures were measured on the 2-core development host with XLA:CPU (jax
    0.10.2): a ``fori_loop`` costs 0.5-1 us per iteration and each dot, reduction or fusion in
    its body 1.1 us of CPU time (about 3 us of wall time under load). A GPU kernel runs its
    steps as a grid, but each kernel launch costs a few microseconds (an assumed 2 us, not
    measured here); other accelerators run one pipelined program and default to zero.
    """

    kernel_s: float = 0.0
    loop_step_s: float = 0.0
    op_s: float = 0.0
    dot_result_element_s: float = 0.0
    dot_operand_element_s: float = 0.0
    slice_element_s: float = 0.0

    @staticmethod
    def default_for(device_kind: str) -> Overheads:
        if device_kind == "cpu":
            return Overheads(
                loop_step_s=1.0e-6,
                op_s=1.5e-6,
                dot_result_element_s=0.8e-9,
                dot_operand_element_s=0.15e-9,
                slice_element_s=1.0e-9,
            )
        if device_kind == "gpu":
            return Overheads(kernel_s=2.0e-6)
        return Overheads()
