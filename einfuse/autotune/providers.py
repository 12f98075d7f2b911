"""The built-in space providers (tiles, loop order, placement, fusion) and Schedule building.

Each provider declares the params of one concern; `space.build_space` runs them in this
file's registration order. The heuristic defaults are what the compiler does untuned:
tiles of at most 512, the given loop order, everything in main memory, and fusion on when
the fused loop would take at least two tiles.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from einfuse.autotune import overlap_space  # noqa: F401  (registers "overlap" first: its
from einfuse.autotune.loop_plan import fused_loop, planned_loops  # passes lead the pipeline)
from einfuse.autotune.space import (
    Choice,
    Param,
    SpaceContext,
    loop_order_choices,
    register_space,
)


@register_space("fuse")
def fuse_params(ctx: SpaceContext) -> Sequence[Param]:
    """Fusion on/off and its tile, for cascades with a rank traversed more than once."""
    from einfuse.passes.manager import registered_passes
    from einfuse.passes.pass_count import pass_counts

    passes = registered_passes()
    if "fuse" not in passes:
        try:  # registered on import; builtin.py may not list it yet
            importlib.import_module("einfuse.passes.fuse")
        except ImportError:
            return ()
        passes = registered_passes()
        if "fuse" not in passes:
            return ()
    smallest = 16  # a fused loop needs tiles of at least this, and two of them
    ranks = [
        r
        for r, n in pass_counts(ctx.cascade).items()
        if n > 1 and ctx.sizes.get(r, 0) >= 2 * smallest
    ]
    if not ranks:
        return ()
    size = max(ctx.sizes[r] for r in ranks)
    choices = ctx.tile_choices(max(ranks, key=ctx.sizes.__getitem__), smallest)
    tile_param = inspect.signature(passes["fuse"]).parameters.get("tile")
    preferred = tile_param.default if tile_param is not None else None
    kernel = _pallas_tiles(ctx)
    if kernel is not None:  # the key tile is the kernel's key block
        choices = tuple(t for t in kernel[0] if t < size) or (min(kernel[0]),)
        preferred = kernel[2]
    default_tile = ctx.default_tile(choices, preferred if isinstance(preferred, int) else None)
    on_by_default = size >= 2 * default_tile
    params = [
        Param("fuse", "pass", "fuse", (True, False), on_by_default, claims=tuple(ranks)),
        Param(
            "fuse.tile",
            "pass_option",
            "fuse",
            choices,
            default_tile,
            option="tile",
            when=("fuse", True),
            claims=tuple(ranks),
        ),
    ]
    query, rows = fused_loop(ctx.cascade, default_tile, tuple(sorted(ctx.sizes.items())))
    # The blockwise loop maps its row ranks (batch, heads) one at a time: tile 1 each, fixed,
    # so the cost model prices a step as the emitter runs it rather than all rows at once.
    for r in rows:
        params.append(Param(f"fuse.rows.{r}", "tile", r, (1,), 1, when=("fuse", True)))
    q_tiles, q_preferred = (kernel[1], kernel[2]) if kernel else (QUERY_TILES, 512)
    if query is not None and ctx.sizes.get(query, 0) > q_tiles[0]:
        top = min(ctx.sizes[query], q_tiles[-1])
        q_choices = tuple(sorted({t for t in (*q_tiles, ctx.sizes[query]) if t <= top}))
        q_default = ctx.default_tile(q_choices, q_preferred)  # the emitter's own default
        params.append(
            Param(
                "fuse.query_tile",
                "tile",
                query,
                q_choices,
                q_default,
                when=("fuse", True),
                claims=(query,),
            )
        )
    return params


# Query tiles of the blockwise loop worth measuring on any target: below 128 the per-block
# overhead dominates, above 1024 a P0 x M0 score tile no longer stays in cache.
QUERY_TILES = (128, 256, 512, 1024)
# The Pallas kernel's (key tiles, query tiles, default of both), per device kind: blocks
# a GPU thread block holds in shared memory and registers (Pallas' own attention uses
# 128 x 128), and on a TPU multiples of the 128 lanes of a vector register.
PALLAS_TILES = {
    "gpu": ((32, 64, 128, 256), (64, 128, 256), 128),
    "tpu": ((128, 256, 512), (128, 256, 512), 128),
}


def _pallas_tiles(ctx: SpaceContext) -> tuple[tuple[int, ...], tuple[int, ...], int] | None:
    """The Pallas kernel's tile choices where the backend is pallas (a CPU interprets the
    GPU kernel, so it gets the GPU's), else None."""
    if ctx.options.backend != "pallas":
        return None
    return PALLAS_TILES.get(ctx.target.device_kind, PALLAS_TILES["gpu"])


@register_space("pallas")
def pallas_params(ctx: SpaceContext) -> Sequence[Param]:
    """The Pallas backend's own choices, for a cascade ``fuse`` applies to: the kernel or
    the JAX loop for each fused group; on a GPU, Triton's warps and pipeline stages."""
    from einfuse.backends.pallas.config import KERNEL, NUM_STAGES, NUM_WARPS, PLACEMENTS

    if ctx.options.backend != "pallas" or not fuse_params(ctx):
        return ()
    params = [Param(KERNEL, "option", KERNEL, (True, False), True, when=("fuse", True))]
    on = (KERNEL, True)
    if ctx.target.device_kind == "gpu":
        # Defaults: Pallas' own (Triton's CompilerParams: 4 warps, 3 stages), what runs untuned.
        params.append(Param(NUM_WARPS, "option", NUM_WARPS, (4, 8), 4, when=on))
        params.append(Param(NUM_STAGES, "option", NUM_STAGES, (1, 2, 3, 4), 3, when=on))
    if ctx.target.device_kind == "tpu":
        # Each key input whole per program in VMEM, or left in HBM and streamed by DMA.
        for name in _key_inputs(ctx):
            params.append(
                Param(f"place.{name}", "placement", name, PLACEMENTS, PLACEMENTS[0], when=on)
            )
    return params


def _key_inputs(ctx: SpaceContext) -> tuple[str, ...]:
    """The tensors a fused loop reads one key tile at a time (K, V), as the loop plan says."""
    from einfuse.passes.fuse import fuse

    tile = _pallas_tiles(ctx)
    loops = planned_loops(
        fuse(ctx.cascade, tile=tile[2] if tile else 128), tuple(sorted(ctx.sizes.items()))
    )
    return tuple(sorted({t for lp in loops for t in lp.plan.tiles}))


def tiled_ranks(ctx: SpaceContext) -> list[str]:
    """Ranks worth tiling: large enough, not already split by a partition, not a recurrence."""
    split = {r for p in ctx.cascade.partitions for r in (p.rank, p.outer, p.inner)}
    iterative = {e.iterative_rank for e in ctx.cascade.einsums if e.is_recurrence}
    return [
        r
        for r in ctx.cascade.all_ranks()
        if r in ctx.sizes
        and ctx.sizes[r] >= ctx.options.min_tiled_size
        and r not in split
        and r not in iterative
    ]


@register_space("tiles")
def tile_params(ctx: SpaceContext) -> Sequence[Param]:
    out = []
    for r in tiled_ranks(ctx):
        choices = ctx.tile_choices(r)
        out.append(Param(f"tile.{r}", "tile", r, choices, ctx.default_tile(choices)))
    return out


@register_space("loop_order")
def loop_order_params(ctx: SpaceContext) -> Sequence[Param]:
    """Orders of the tile loops over the largest tiled ranks that no pass claims."""
    claimed = {r for p in fuse_params(ctx) for r in p.claims}
    ranks = [r for r in tiled_ranks(ctx) if r not in claimed]
    ranks = sorted(ranks, key=lambda r: -ctx.sizes[r])[: ctx.options.max_loop_ranks]
    ranks = [r for r in ctx.cascade.all_ranks() if r in ranks]  # keep program order
    if len(ranks) < 2:
        return ()
    choices = loop_order_choices(ranks, ctx.options.max_loop_ranks)
    return (Param("loop_order", "loop_order", "", choices, choices[0]),)


@register_space("placement")
def placement_params(ctx: SpaceContext) -> Sequence[Param]:
    """Where each intermediate lives, on targets with software-managed memory only.

    Caches place data themselves, so a CPU target gets no placement params; on a GPU or TPU
    the choices are main memory and each managed level a minimal tile of the tensor fits.
    """
    managed = [m for m in ctx.target.memory[1:] if m.managed]
    if not managed:
        return ()
    main = ctx.target.memory[0].name
    outputs = set(ctx.cascade.outputs)
    out = []
    for e in ctx.cascade.einsums:
        if e.output in outputs:
            continue
        ranks = ctx.cascade.tensor_ranks(e.output)
        least = ctx.word_bytes
        for r in ranks:
            least *= min(ctx.sizes.get(r, 1), ctx.options.min_tile)
        levels = [m.name for m in managed if least <= m.capacity_bytes]
        if levels:
            out.append(Param(f"place.{e.output}", "placement", e.output, (main, *levels), main))
    return out


# --------------------------------------------------------------------------- schedules
def schedule_of(by_kind: Mapping[str, list[tuple[str, Choice]]]) -> Any:
    """A `Schedule` from the values of the schedule params, grouped by kind."""
    from einfuse.ir.schedule import Schedule

    loop = by_kind.get("loop_order") or []
    return Schedule(
        tiles=tuple((rank, int(t)) for rank, t in by_kind.get("tile", [])),
        loop_order=tuple(str(loop[0][1]).split(",")) if loop else (),
        placement=tuple((tensor, str(level)) for tensor, level in by_kind.get("placement", [])),
        options=tuple(by_kind.get("option", [])),
    )


def parse_schedule(text: str) -> Any:
    """A `Schedule` back from its text form (stored results keep schedules as text)."""
    from einfuse.ir.schedule import Schedule

    return Schedule.parse(text)
