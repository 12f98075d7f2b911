"""The fused loops of a candidate program, read off the backends' loop plan.

One place where the autotuner asks ``blockwise_plan.plan_loop`` about a fused cascade: the
space providers (which rank is the query, which ranks are rows mapped one at a time) and the
model evaluator (each Pallas kernel's blocks, for ``cost_model.kernel_footprint`` and
``cost_model.kernel_pallas``). Groups are planned as ``jax_blockwise.lower_program`` emits
them: the first group of the cascade, then those of what runs before and after its loop.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from einfuse.cost_model.kernel_footprint import KernelLoop, LoopBlock
from einfuse.ir.cascade import Cascade, TensorDecl, bind_sizes
from einfuse.ir.dtypes import promote, tensor_dtypes

if TYPE_CHECKING:
    from einfuse.backends.blockwise_plan import BlockPlan

SizeKey = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PlannedLoop:
    """One fused group's loop plan: the cascade as the loop runs it, the plan, its rows."""

    cascade: Cascade
    plan: BlockPlan
    rows: tuple[str, ...]
    sizes: SizeKey

    def kernel(self, q_tile: int, dtype: str | None) -> KernelLoop:
        """The loop as one kernel with query blocks of ``q_tile`` (capped at the rank)."""
        from einfuse.backends.blockwise_plan import (
            QBLOCK,
            STEP,
            grid_rows,
            split_flat_reads,
            squeezed_dims,
        )

        c, plan, g = self.cascade, self.plan, self.plan.group
        sizes = dict(self.sizes)
        # One program per grid row (a query head of a GQA group too), as the kernel runs it.
        rows = grid_rows(plan.body, g, plan.query, sizes)
        query = plan.query
        total = sizes[query] if query else 1
        q = min(q_tile, total) if query else 1
        step = {**sizes, **dict.fromkeys(rows, 1)}
        if query is not None:
            step[query] = q
        types = tensor_dtypes(c)
        wide = {t: promote(types[t], "float32") or "float32" for t in g.carried}

        def arrives(name: str) -> str:  # as ``jax_blockwise`` declares the step's inputs
            base = name.removesuffix("__prev").removesuffix("__blk")
            return wide.get(base) or types.get(base, "float32")

        # The dims a program holds, as the kernel lays them out: a K/V input read per head at
        # ``h*D+d`` split, and any dim read at a row (``e*K+k`` of a GQA query) dropped.
        body, _ = split_flat_reads(plan.body, rows)
        squeezed = squeezed_dims(body, rows)
        decls = tuple(TensorDecl(t.name, t.ranks, arrives(t.name), t.loc) for t in body.inputs)
        body = Cascade(decls, body.einsums, body.outputs, body.sizes, body.partitions)

        def block(name: str, role: str, ranks: tuple[str, ...], dtype: str) -> LoopBlock:
            dropped = squeezed.get(name, ())
            dims = tuple(
                step[r]
                for k, r in enumerate(ranks)
                if r not in rows and (k >= len(dropped) or dropped[k] is None)
            )
            return LoopBlock(name, role, dims, dtype)

        blocks = []
        for t in body.inputs:
            if t.name in (STEP, QBLOCK) or t.name.endswith("__prev"):
                continue  # indices; a carried state's initial value is the state itself
            base = t.name.removesuffix("__blk")
            role = "stream" if t.name.endswith("__blk") else "query"
            blocks.append(replace(block(t.name, role, t.ranks, t.dtype), name=base))
        blocks += [block(t, "carry", body.tensor_ranks(t), wide[t]) for t in g.carried]
        inner = [e for e in body.einsums if e.output not in g.carried]
        if inner:  # the largest step intermediate: the score tile, accumulated in float32
            e = max(inner, key=lambda e: _elements(body.tensor_ranks(e.output), step, rows))
            dt = promote(types.get(e.output, "float32"), "float32") or "float32"
            blocks.append(block(e.output, "score", body.tensor_ranks(e.output), dt))
        carry = max(wide.values(), key=lambda d: d == "float64", default="float32")
        return KernelLoop(
            loop_rank=g.rank,
            rows=_elements(rows, sizes, ()),
            q_tile=q,
            q_blocks=-(-total // q),
            key_tile=sizes[g.inner] if g.inner else 1,
            key_steps=sizes[g.rank],
            causal=plan.causal,
            blocks=tuple(blocks),
            body=body,
            body_sizes=tuple(sorted(step.items())),
            dtype=dtype or "float32",
            carry_dtype=carry,
        )


def _elements(ranks: tuple[str, ...], sizes: Mapping[str, int], rows: tuple[str, ...]) -> int:
    n = 1
    for r in ranks:
        if r not in rows:
            n *= sizes[r]
    return n


@functools.lru_cache(maxsize=64)
def planned_loops(fused: Cascade, sizes: SizeKey) -> tuple[PlannedLoop, ...]:
    """Every fused group's loop plan in ``fused`` (already through ``fuse``) at ``sizes``,
    as the emitter plans them; a group it cannot loop is left out (it runs unfused)."""
    from einfuse.backends.blockwise_plan import plan_loop
    from einfuse.backends.jax_values import BackendUnsupported
    from einfuse.passes.fuse import fused_groups

    groups = fused_groups(fused)
    if not groups:
        return ()
    bound = bind_sizes(fused, {r: n for r, n in sizes if r in fused.all_ranks()})
    try:
        c, plan, rows = plan_loop(fused, groups[0], bound)
    except BackendUnsupported:
        return ()
    key = tuple(sorted(bound.items()))
    here = PlannedLoop(c, plan, rows, key)
    return (*planned_loops(plan.pre, sizes), here, *planned_loops(plan.post, sizes))


@functools.lru_cache(maxsize=64)
def fused_loop(cascade: Cascade, tile: int, sizes: SizeKey) -> tuple[str | None, tuple[str, ...]]:
    """The query rank and the row ranks of the blockwise loop ``fuse{tile}`` leads to."""
    from einfuse.passes.fuse import fuse

    loops = planned_loops(fuse(cascade, tile=tile), sizes)
    if not loops:
        return None, ()
    return loops[0].plan.query, loops[0].rows
