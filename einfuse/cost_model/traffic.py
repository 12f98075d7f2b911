"""Data movement of one kernel's loop nest: a simplified, Timeloop-like reuse analysis.

Under a schedule, the loops of a kernel (``kernels.Kernel``) are the ranks whose tile is smaller
than the rank (trip count ``ceil(size / tile)``), ordered outer to inner by ``loop_order`` and then
by default (output ranks, the carried rank, reduced ranks). Each step works on one tile.

The model, per tensor ``T`` of a kernel:

* its *tile* is the box its accesses cover in one step: per dimension, the product of the tiles
  of the ranks in that index (``m1*M0 + m0`` covers ``1 * M0``), at most the dimension;
* **re-fetch rule**: a tile read from outside is fetched once per iteration of every loop down to
  the innermost loop whose rank indexes ``T``; loops further in that do not index ``T`` reuse the
  resident tile. ``fetches = prod(trips of loops 0..j)`` with ``j`` that innermost loop;
* a result is written once per distinct tile; if a reduction loop sits outside its innermost
  indexing loop, partial sums go out and come back (``fetches`` writes, ``fetches - distinct``
  reads). A recurrence read after the loop only at its last step writes its final state only;
* intermediates of a fused group stay on chip at their placement level (default: the staging
  level) while the tile fits; a carried state whose tile loop sits inside the carried loop keeps
  one tile per iteration of that loop. What does not fit spills: written every step, read by
  each consumer every step, through the memory level that holds one tile;
* every Einsum streams its operand tiles from the level holding them once per step it runs
  (steps = trips of the loops over its own ranks: loop-invariant work is hoisted).

Levels: main memory is ``target.memory[0]``. On a target with software-managed levels (shared
memory, VMEM, a global buffer) tiles are staged in the largest managed level unless placed
elsewhere, and a tile that does not fit its level is an error of the schedule. Tiles processed
at once (loops over ranks marked parallel) share a level's instances; on a GPU a tile is one
thread block and gets one SM's share whatever runs beside it. On a cache-only target (CPU)
nothing is rejected: operations run one at a time, so the smallest cache that holds one
operation's tiles serves its operand streaming. Traffic across the kernel boundary comes from
level 0 for the first touch of a cascade input or output, and from the smallest cache that holds
the whole tensor for re-fetches and for intermediates passed between kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from einfuse.cost_model.fit import place_tiles
from einfuse.cost_model.kernels import AccessShape, EinsumShape, Kernel
from einfuse.cost_model.schedule_view import ScheduleView
from einfuse.cost_model.target import Target


# ------------------------------------------------------------------------------ per schedule
@dataclass(frozen=True, slots=True)
class TrafficContext:
    """Per-cascade constants the traffic analysis needs (built once by ``CostModel``)."""

    target: Target
    shapes: tuple[EinsumShape, ...]
    tensor_dims: Mapping[str, tuple[str, ...]]  # tensor -> declared rank of each dim
    iterative_dim: Mapping[str, int]  # recurrence output -> its iterative dim
    cascade_io: frozenset[str]  # cascade inputs and outputs (first touch from main memory)
    consumers: Mapping[str, int]  # tensor -> number of Einsums reading it
    element_bytes: int
    parallel_by_default: bool  # GPUs: loops over output ranks form the grid; a tile is per SM
    caches: tuple[tuple[int, float], ...] = ()  # (level index, total capacity) of unmanaged levels
    operands: tuple[tuple[AccessShape, ...], ...] = ()  # per Einsum: its write, then its reads
    rank_sets: tuple[frozenset[str], ...] = ()  # per Einsum: its iteration ranks

    def __post_init__(self) -> None:
        levels = enumerate(self.target.memory[1:], start=1)
        caches = tuple((i, lvl.total_capacity_bytes) for i, lvl in levels if not lvl.managed)
        object.__setattr__(self, "caches", caches)
        operands = tuple((sh.write, *sh.reads) for sh in self.shapes)
        object.__setattr__(self, "operands", operands)
        object.__setattr__(self, "rank_sets", tuple(frozenset(sh.ranks) for sh in self.shapes))


class Plan:
    """One schedule's rank sizes and tiles; per-tensor facts are computed on first use.

    Lazily, because the model's fast path prices only the kernels it has not priced before
    under the same sizes and tiles (see ``CostModel.estimate``).
    """

    __slots__ = ("_fp", "_tensors", "ctx", "sizes", "sizes_key", "tiles", "view")

    def __init__(
        self,
        ctx: TrafficContext,
        sizes: dict[str, int],
        tiles: dict[str, int],
        view: ScheduleView,
    ) -> None:
        self.ctx, self.sizes, self.tiles, self.view = ctx, sizes, tiles, view
        self.sizes_key = tuple(sizes.items())  # work counts depend on nothing else
        self._tensors: dict[str, tuple[list[int], int, int]] = {}
        self._fp: dict[int, int] = {}  # id(access) -> elements (accesses live in ``ctx.shapes``)

    def _tensor(self, t: str) -> tuple[list[int], int, int]:
        """(extent of each dim, elements, level serving re-fetches of the whole tensor)."""
        facts = self._tensors.get(t)
        if facts is None:
            ctx, sizes = self.ctx, self.sizes
            d = [sizes[r] if r else 1 for r in ctx.tensor_dims[t]]
            k = ctx.iterative_dim.get(t)
            if k is not None:
                d[k] += 1
            n = math.prod(d)
            facts = self._tensors[t] = (d, n, cache_level(ctx, n * ctx.element_bytes))
        return facts

    def elements(self, t: str) -> int:
        return self._tensor(t)[1]

    def again(self, t: str) -> int:
        """The level serving re-fetches of the whole of ``t``: a cache that holds it, else 0."""
        return self._tensor(t)[2]

    def footprint(self, a: AccessShape) -> int:
        """Elements of ``a``'s tile: per dimension the product of its ranks' tiles, capped."""
        n = self._fp.get(id(a))
        if n is None:
            n = 1
            tiles = self.tiles
            for ranks, size in zip(a.dims, self._tensor(a.tensor)[0]):
                extent = 1
                for r in ranks:
                    extent *= tiles[r]
                n *= extent if extent < size else size
            self._fp[id(a)] = n
        return n


@dataclass(slots=True)
class KernelTraffic:
    """Bytes per memory level for each Einsum of a kernel under one schedule, and the fit."""

    loops: list[tuple[str, int]]
    steps: dict[int, int]  # Einsum index -> steps it runs
    bytes: dict[int, list[float]]  # Einsum index -> bytes served by each level
    moved: dict[int, list[float]]  # the part of ``bytes`` that crosses the kernel boundary
    staging: int = 0  # level index holding the tiles
    fits: bool = True
    reason: str = ""
    spilled: tuple[str, ...] = ()
    in_flight: int = 1
    transfers: int = 0  # tiles moved across the kernel boundary (a slice or update each)
    sliced: int = 0  # elements of those tiles that are part of a larger tensor (copied)
    tiles: dict[int, list[int]] = field(default_factory=dict)  # Einsum -> elements per operand


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def loop_nest(kernel: Kernel, plan: Plan) -> list[tuple[str, int]]:
    """The kernel's loops outer to inner: the schedule's order first, then the default."""
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    ranks = kernel.ranks
    sizes, tiles = plan.sizes, plan.tiles
    for r in (*plan.view.loop_order, *ranks):
        if r in seen or r not in ranks:
            continue
        seen.add(r)
        trips = -(-sizes[r] // tiles[r])
        if trips > 1:
            out.append((r, trips))
    return out


def cache_level(ctx: TrafficContext, n_bytes: float) -> int:
    """The smallest unmanaged level below main memory that holds ``n_bytes``, else 0."""
    best = 0
    for i, capacity in ctx.caches:
        if capacity >= n_bytes:
            best = i
    return best


def kernel_traffic(kernel: Kernel, plan: Plan, level_index: Mapping[str, int]) -> KernelTraffic:
    """Apply the reuse model of this module to one kernel under one schedule."""
    ctx, view = plan.ctx, plan.view
    memory = ctx.target.memory
    eb = ctx.element_bytes
    shapes = ctx.shapes
    loops = loop_nest(kernel, plan)
    trips_of = dict(loops)
    loop_pos = {r: i for i, (r, _) in enumerate(loops)}
    prefix = [1]
    for _, trips in loops:
        prefix.append(prefix[-1] * trips)

    def innermost(ts: frozenset[str] | set[str]) -> int:
        return max((loop_pos[r] for r in ts if r in loop_pos), default=-1)

    def distinct(ts: frozenset[str] | set[str]) -> int:
        return math.prod(trips_of[r] for r in ts if r in trips_of)

    operands, footprint = ctx.operands, plan.footprint
    steps = {i: distinct(ctx.rank_sets[i]) for i in kernel.einsums}
    fps = {i: [footprint(a) for a in operands[i]] for i in kernel.einsums}
    tile_elems: dict[str, int] = {}
    for i in kernel.einsums:
        for a, fp in zip(operands[i], fps[i]):
            if fp > tile_elems.get(a.tensor, 0):
                tile_elems[a.tensor] = fp

    # Carried state whose tile loop sits inside the carried loop keeps one tile per iteration.
    resident = tile_elems
    lr = kernel.loop_rank
    if lr is not None and lr in loop_pos:
        resident = dict(tile_elems)
        inside = loops[loop_pos[lr] + 1 :]
        for t in kernel.carried:
            rep = math.prod(trips for r, trips in inside if r in kernel.index_ranks[t])
            resident[t] = tile_elems[t] * rep

    # Tiles in flight at once share each level's instances.
    par = {r for r, axis in view.parallel.items() if axis is None}
    if not par and ctx.parallel_by_default:
        par = {r for r in kernel.ranks if r != lr and r not in kernel.reduced}
    in_flight = math.prod(trips for r, trips in loops if r in par)

    if ctx.parallel_by_default:  # a GPU tile is one thread block, on one SM
        caps = [lvl.capacity_bytes for lvl in memory]
    else:
        caps = [lvl.total_capacity_bytes / max(1, min(lvl.instances, in_flight)) for lvl in memory]
    capacity = caps.__getitem__

    zeros = {i: [0.0] * len(memory) for i in kernel.einsums}
    out = KernelTraffic(loops, steps, zeros, {i: list(row) for i, row in zeros.items()})
    out.in_flight = in_flight
    out.tiles = fps
    explicit = {t: level_index[view.placement[t]] for t in tile_elems if t in view.placement}
    level_of, spilled = place_tiles(kernel, resident, explicit, capacity, out, memory, eb)

    # Main-memory traffic: reads from outside, results written out, spilled intermediates.
    def charge(i: int, tensor: str, total: float, compulsory: float) -> None:
        for row in (out.bytes[i], out.moved[i]):
            if tensor in ctx.cascade_io:
                row[0] += compulsory
                row[plan.again(tensor)] += total - compulsory
            else:
                row[plan.again(tensor)] += total

    def moved_tiles(t: str, n: int) -> None:
        """``n`` slices or updates of ``t``'s tile; a part of a larger tensor is copied."""
        out.transfers += n
        if tile_elems[t] < plan.elements(t):
            out.sliced += n * tile_elems[t]

    for t in kernel.reads:
        fp = tile_elems[t] * eb
        ts = kernel.index_ranks[t]
        fetches = prefix[innermost(ts) + 1]
        moved_tiles(t, fetches)
        charge(kernel.first_user[t], t, fetches * fp, distinct(ts) * fp)
    for t in kernel.results:
        w = kernel.writer[t]
        fp = tile_elems[t] * eb
        ts = kernel.index_ranks[t]
        if t in kernel.final_only and lr is not None:
            writes = distinct(ts - {lr})
            moved_tiles(t, writes)
            charge(w, t, writes * fp, writes * fp)
            continue
        j = innermost(ts)
        n_distinct = distinct(ts)
        outer_reduction = any(loop_pos.get(r, j) < j for r in shapes[w].reduced)
        fetches = prefix[j + 1] if outer_reduction else n_distinct
        moved_tiles(t, 2 * fetches - n_distinct)
        charge(w, t, (2 * fetches - n_distinct) * fp, n_distinct * fp)
    for t in spilled:
        w = kernel.writer[t]
        n = steps[w] * (1 + ctx.consumers.get(t, 1)) * tile_elems[t] * eb
        out.bytes[w][cache_level(ctx, tile_elems[t] * eb)] += n
        out.moved[w][cache_level(ctx, tile_elems[t] * eb)] += n

    if not loops:
        out.transfers = out.sliced = 0  # one untiled operation: no slicing
    # Operand streaming from the level holding each tile, once per step of each Einsum. With
    # caches, operations run one at a time: the smallest cache holding the operation's own
    # tiles serves them (tiles placed explicitly stay where they were placed).
    caches = not any(lvl.managed for lvl in memory[1:])
    for i in kernel.einsums:
        row, n = out.bytes[i], steps[i] * eb
        own = out.staging
        if caches:
            work = sum(fps[i]) * eb
            own = max((j for j in range(1, len(memory)) if capacity(j) >= work), default=0)
        for a, fp in zip(operands[i], fps[i]):
            li = explicit.get(a.tensor, own) if caches else level_of.get(a.tensor, own)
            if li > 0 or a.tensor not in spilled:
                row[li] += n * fp
    return out
