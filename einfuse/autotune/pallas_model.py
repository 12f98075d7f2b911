"""The model objective for the Pallas backend: each fused loop priced, and refused, as a kernel.

For a candidate that fuses, on a GPU or TPU target, every fused group the emitter turns
into a ``pallas_call`` is checked against the target's per-kernel capacity
(``cost_model.kernel_footprint``) and priced as the kernel runs (``cost_model.kernel_pallas``)
in place of the cost model's price of the same loop; with ``pallas.kernel=false`` the loop is
priced as the JAX backend runs it, one step after another (``jax_loop_seconds``), so the
choice between them compares like with like. The rest of the program keeps the cost model's
price. A kernel that does not fit refuses the candidate with the reason, before anything
compiles. On a CPU target the kernel runs interpreted: nothing is refused or repriced there.
"""

from __future__ import annotations

from typing import Any

from einfuse.autotune.loop_plan import PlannedLoop, planned_loops
from einfuse.cost_model.kernel_footprint import footprint
from einfuse.cost_model.kernel_pallas import (
    DEFAULT_NUM_STAGES,
    jax_loop_seconds,
    pallas_seconds,
)
from einfuse.cost_model.target import Target
from einfuse.ir.cascade import Cascade

PLATFORMS = ("gpu", "tpu")


class Refused(Exception):
    """A candidate whose kernel cannot compile on the target; the message says why."""


def query_tile(planned: PlannedLoop, schedule: Any) -> int:
    """The kernel's query block: the Schedule's tile of the query rank, else Pallas' default
    (as ``emit_pallas`` tiles it)."""
    from einfuse.backends.pallas.config import DEFAULT_QUERY_TILE

    query = planned.plan.query
    return (schedule.tile(query, None) if schedule and query else None) or DEFAULT_QUERY_TILE


class PallasPricer:
    """Prices candidates' Pallas kernels; what depends only on the pipeline, the query tile,
    the warps and the stages is computed once (the model objective scores thousands)."""

    def __init__(self, target: Target | str, dtype: str | None) -> None:
        from einfuse.cost_model.target import get_target

        self.target = get_target(target) if isinstance(target, str) else target
        self.dtype = dtype
        self._loops: dict[str, tuple[PlannedLoop, ...]] = {}
        self._prices: dict[tuple, tuple[float, frozenset[str]] | str] = {}

    def price(
        self, pipeline: str, fused: Cascade, sizes: dict[str, int], schedule: Any
    ) -> tuple[float, frozenset[str]]:
        """Seconds of the candidate's kernels and the names of the cost model's kernels they
        replace (``loop m1``); raises `Refused` for a kernel that does not fit."""
        from einfuse.backends.pallas.config import KERNEL, KernelConfig

        if self.target.device_kind not in PLATFORMS:
            return 0.0, frozenset()
        jax_loop = schedule is not None and schedule.option(KERNEL) is False
        loops = self._loops.get(pipeline)
        if loops is None:
            loops = self._loops[pipeline] = planned_loops(fused, tuple(sorted(sizes.items())))
        if not loops:
            return 0.0, frozenset()
        config = KernelConfig.from_schedule(schedule)
        q_tiles = tuple(query_tile(lp, schedule) for lp in loops)
        streamed = streamed_inputs(schedule)
        key = (pipeline, q_tiles, config.num_warps, config.num_stages, jax_loop, streamed)
        found = self._prices.get(key)
        if found is None:
            found = self._prices[key] = self._price(loops, q_tiles, config, jax_loop, streamed)
        if isinstance(found, str):
            raise Refused(found)
        return found

    def _price(
        self,
        loops: tuple[PlannedLoop, ...],
        q_tiles: tuple[int, ...],
        config: Any,
        jax: bool,
        streamed: frozenset[str],
    ) -> tuple[float, frozenset[str]] | str:
        stages = config.num_stages or DEFAULT_NUM_STAGES
        total, names = 0.0, set()
        for planned, q_tile in zip(loops, q_tiles):
            loop = planned.kernel(q_tile, self.dtype)
            names.add(f"loop {loop.loop_rank}")
            if jax:
                total += jax_loop_seconds(loop, self.target)
                continue
            why = footprint(loop, self.target, stages, streamed).refusal(self.target)
            if why:
                return f"pallas kernel over {loop.loop_rank} {why}"
            total += pallas_seconds(loop, self.target, config.num_warps, config.num_stages)
        return total, frozenset(names)


def streamed_inputs(schedule: Any) -> frozenset[str]:
    """The key inputs a Schedule places in HBM: streamed tile by tile (TPU), not held whole."""
    if schedule is None:
        return frozenset()
    return frozenset(t for t, level in schedule.placement if level == "hbm")


def describe_kernels(
    fused: Cascade, sizes: dict[str, int], schedule: Any, target: Target, dtype: str | None
) -> list[tuple[str, bool]]:
    """For ``einfuse explain --backend pallas``: one line per kernel (its grid, what one
    program holds against the target's capacity, its predicted time), and whether it fits."""
    from einfuse.backends.pallas.config import KERNEL, KernelConfig

    if target.device_kind not in PLATFORMS or (
        schedule is not None and schedule.option(KERNEL) is False
    ):
        return []
    config = KernelConfig.from_schedule(schedule)
    stages = config.num_stages or DEFAULT_NUM_STAGES
    lines = []
    for planned in planned_loops(fused, tuple(sorted(sizes.items()))):
        loop = planned.kernel(query_tile(planned, schedule), dtype)
        fp = footprint(loop, target, stages, streamed_inputs(schedule))
        head = (
            f"pallas kernel over {loop.loop_rank}: grid {loop.rows} rows x {loop.q_blocks} "
            f"query blocks of {loop.q_tile}, {loop.key_steps} key steps of {loop.key_tile}"
        )
        if not fp.fits:
            lines.append((f"{head}; refused: {fp.refusal(target)}", False))
            continue
        assert fp.level is not None
        held = ", ".join(what for what, _ in fp.parts)
        seconds = pallas_seconds(loop, target, config.num_warps, config.num_stages)
        lines.append(
            (
                f"{head}; holds {fp.bytes} of {int(fp.level.kernel_capacity_bytes)} B of "
                f"{fp.level.name.replace('_', ' ')} ({held}); predicted {seconds * 1e3:.4g} ms",
                True,
            )
        )
    return lines
