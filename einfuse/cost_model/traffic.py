"""Data movement of one kernel's loop nest: a simplified, Timeloop-like reuse analysis.

A *kernel* is what runs as one loop nest: a fused group (the Einsums sharing the loop over a
partitioned rank ``m1``, plus the epilogue that finishes each tile from the group's results) or
one unfused Einsum. For a schedule the kernel's loops are the ranks whose tile is smaller than
the rank (trip count ``ceil(size / tile)``), ordered outer to inner by ``loop_order`` and then
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from einfuse.cost_model.target import MemoryLevel, Target
from einfuse.errors import EinfuseError
from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import Access, accesses, rank_vars


class CostModelError(EinfuseError, ValueError):
    """A schedule or request the cost model cannot price (unknown level, unit, rank, ...)."""


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """What the cost model reads from an ``einfuse.ir.schedule.Schedule``, as dicts.

    ``parallel`` maps a rank to a mesh axis (a device rank: its size is divided among
    ``mesh[axis]`` devices) or to None (plain parallelism: its tiles run at the same time on one
    device and share the instances of each memory level). Options the model reads:
    ``unit.<Einsum>=<unit>`` binds an Einsum (by output tensor) to a compute unit by name,
    ``mesh.<axis>=<devices>`` gives a mesh axis its device count, and ``chunks=<k>`` overlaps a
    kernel's collectives with its compute in ``k`` pieces.
    """

    tiles: Mapping[str, int] = field(default_factory=dict)
    loop_order: tuple[str, ...] = ()
    parallel: Mapping[str, str | None] = field(default_factory=dict)
    placement: Mapping[str, str] = field(default_factory=dict)
    units: Mapping[str, str] = field(default_factory=dict)
    mesh: Mapping[str, int] = field(default_factory=dict)
    overlap_chunks: int = 1

    @staticmethod
    def of(schedule: object | None) -> ScheduleView:
        if schedule is None:
            return ScheduleView()
        if isinstance(schedule, ScheduleView):
            return schedule
        options = dict(getattr(schedule, "options", ()) or ())
        units = {k[5:]: str(v) for k, v in options.items() if k.startswith("unit.")}
        mesh: dict[str, int] = {}
        for k, v in options.items():
            if k.startswith("mesh."):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise CostModelError(
                        f"schedule option {k}={v!r}: a device count is an int >= 1"
                    )
                mesh[k[5:]] = v
        chunks = options.get("chunks", 1)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise CostModelError(f"schedule option chunks={chunks!r}: an int >= 1")
        return ScheduleView(
            tiles=dict(getattr(schedule, "tiles", ()) or ()),
            loop_order=tuple(getattr(schedule, "loop_order", ()) or ()),
            parallel=dict(getattr(schedule, "parallel", ()) or ()),
            placement=dict(getattr(schedule, "placement", ()) or ()),
            units=units,
            mesh=mesh,
            overlap_chunks=chunks,
        )

    def device_ranks(self) -> dict[str, int]:
        """Ranks bound to a mesh axis, with the number of devices along it."""
        out = {}
        for r, axis in self.parallel.items():
            if axis is None:
                continue
            if axis not in self.mesh:
                raise CostModelError(
                    f"schedule binds {r} to mesh axis {axis!r}; give its device count with "
                    f"option mesh.{axis}=N"
                )
            out[r] = self.mesh[axis]
        return out


# ------------------------------------------------------------------------------ static facts
@dataclass(frozen=True, slots=True)
class AccessShape:
    """A tensor access reduced to what footprints need: the ranks of each index."""

    tensor: str
    dims: tuple[tuple[str, ...], ...]  # ranks in each index; () for a constant index (``M1``)


@dataclass(frozen=True, slots=True)
class EinsumShape:
    name: str
    ranks: tuple[str, ...]
    reduced: tuple[str, ...]
    write: AccessShape
    reads: tuple[AccessShape, ...]


@dataclass(frozen=True, slots=True)
class Kernel:
    """One loop nest: ``members`` run per step of ``loop_rank``; ``epilogue`` after it."""

    name: str
    loop_rank: str | None
    members: tuple[int, ...]  # indices into the cascade's Einsums
    epilogue: tuple[int, ...]
    ranks: tuple[str, ...]  # default loop order: output ranks, the carried rank, the rest
    reads: tuple[str, ...]  # tensors that come from outside the kernel
    results: tuple[str, ...]  # tensors read after the kernel or cascade outputs
    internal: tuple[str, ...]  # written and consumed inside the kernel
    carried: frozenset[str]
    final_only: frozenset[str]  # carried results read afterwards only at their last step
    einsums: tuple[int, ...] = ()  # members then epilogue
    index_ranks: Mapping[str, frozenset[str]] = field(default_factory=dict)  # ranks indexing T
    first_user: Mapping[str, int] = field(default_factory=dict)  # first Einsum touching T
    writer: Mapping[str, int] = field(default_factory=dict)
    reduced: frozenset[str] = frozenset()  # ranks some Einsum of the kernel reduces


def access_shape(a: Access) -> AccessShape:
    return AccessShape(a.tensor, tuple(tuple(rank_vars(i)) for i in a.indices))


def einsum_shape(e: Einsum) -> EinsumShape:
    reads = dict.fromkeys(access_shape(a) for a in accesses(e.expr))
    write = AccessShape(e.output, tuple(tuple(rank_vars(i)) for i in e.indices))
    return EinsumShape(e.output, e.ranks, e.reduced_ranks, write, tuple(reads))


def build_kernels(cascade: Cascade) -> tuple[Kernel, ...]:
    """Fused groups (``einfuse.passes.fuse.fused_groups``) with their epilogues, then the rest.

    An epilogue Einsum follows the group, does not iterate over its loop rank, has only ranks
    of the group, and reads nothing computed outside the group: it finishes each tile in the
    same kernel (``AV = RNV[M1] / RD[M1]``) instead of sending the state through memory.
    """
    from einfuse.passes.fuse import fused_groups

    einsums = cascade.einsums
    index = {e.output: i for i, e in enumerate(einsums)}
    inputs = {t.name for t in cascade.inputs}
    owner: dict[int, int] = {}
    plans: list[tuple[str | None, list[int], list[int]]] = []
    for g in fused_groups(cascade):
        members = [index[n] for n in g.einsums]
        if any(i in owner for i in members):
            continue
        ranks = {r for i in members for r in einsums[i].ranks}
        inside = {einsums[i].output for i in members}
        epilogue: list[int] = []
        for i in range(min(members), len(einsums)):
            e = einsums[i]
            if i in members:
                continue
            outside = [t for t in e.inputs if t not in inside and t not in inputs]
            if (
                i not in owner
                and g.rank not in e.ranks
                and set(e.ranks) <= ranks
                and not outside
                and any(t in inside for t in e.inputs)
            ):
                epilogue.append(i)
                inside.add(e.output)
        for i in (*members, *epilogue):
            owner[i] = len(plans)
        plans.append((g.rank, members, epilogue))
    for i in range(len(einsums)):
        if i not in owner:  # alone: a recurrence still loops over its iterative rank
            owner[i] = len(plans)
            plans.append((einsums[i].iterative_rank, [i], []))
    plans.sort(key=lambda p: min(p[1]))
    return tuple(_kernel(cascade, rank, members, epi) for rank, members, epi in plans)


def _kernel(cascade: Cascade, rank: str | None, members: list[int], epilogue: list[int]) -> Kernel:
    einsums = cascade.einsums
    mine = [einsums[i] for i in (*members, *epilogue)]
    written = {e.output for e in mine}
    reads = dict.fromkeys(t for e in mine for t in e.inputs if t not in written)
    later = [e for e in einsums if e.output not in written]
    read_later = {t for e in later for t in e.inputs}
    results = [e.output for e in mine if e.output in read_later or e.output in cascade.outputs]
    internal = [e.output for e in mine if e.output not in results]
    carried = {e.output for e in mine if e.is_recurrence}
    final_only = set()
    for t in carried & set(results):
        dim = cascade.writer(t).iterative_dim  # type: ignore[union-attr]
        uses = [a for e in later for a in accesses(e.expr) if a.tensor == t]
        if t not in cascade.outputs and all(not rank_vars(a.indices[dim]) for a in uses):
            final_only.add(t)
    everything = (*members, *epilogue)
    index_ranks: dict[str, set[str]] = {}
    first_user: dict[str, int] = {}
    for i in everything:
        sh = einsum_shape(einsums[i])
        for a in (sh.write, *sh.reads):
            index_ranks.setdefault(a.tensor, set()).update(r for d in a.dims for r in d)
            first_user.setdefault(a.tensor, i)
    outs = [r for e in mine for r in e.output_ranks if r != rank]
    order = dict.fromkeys([*outs, *([rank] if rank else []), *(r for e in mine for r in e.ranks)])
    name = f"loop {rank}" if len(mine) > 1 and rank else mine[0].output
    return Kernel(
        name,
        rank,
        tuple(members),
        tuple(epilogue),
        tuple(order),
        tuple(reads),
        tuple(results),
        tuple(internal),
        frozenset(carried),
        frozenset(final_only),
        everything,
        {t: frozenset(rs) for t, rs in index_ranks.items()},
        first_user,
        {einsums[i].output: i for i in everything},
        frozenset(r for e in mine for r in e.reduced_ranks),
    )


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

    def __post_init__(self) -> None:
        levels = enumerate(self.target.memory[1:], start=1)
        caches = tuple((i, lvl.total_capacity_bytes) for i, lvl in levels if not lvl.managed)
        object.__setattr__(self, "caches", caches)


class Plan:
    """One schedule's rank sizes and tiles, with per-tensor facts computed once for all kernels."""

    __slots__ = ("again", "ctx", "dims", "elements", "fp", "sizes", "tiles", "view")

    def __init__(
        self,
        ctx: TrafficContext,
        sizes: dict[str, int],
        tiles: dict[str, int],
        view: ScheduleView,
    ) -> None:
        self.ctx, self.sizes, self.tiles, self.view = ctx, sizes, tiles, view
        self.dims: dict[str, list[int]] = {}
        self.elements: dict[str, int] = {}
        self.again: dict[str, int] = {}  # level serving re-fetches of the whole tensor
        for t, ranks in ctx.tensor_dims.items():
            d = [sizes[r] if r else 1 for r in ranks]
            k = ctx.iterative_dim.get(t)
            if k is not None:
                d[k] += 1
            self.dims[t] = d
            self.elements[t] = n = math.prod(d)
            self.again[t] = cache_level(ctx, n * ctx.element_bytes)
        self.fp: dict[int, int] = {}  # id(access) -> elements (accesses live in ``ctx.shapes``)

    def footprint(self, a: AccessShape) -> int:
        """Elements of ``a``'s tile: per dimension the product of its ranks' tiles, capped."""
        n = self.fp.get(id(a))
        if n is None:
            n = 1
            tiles = self.tiles
            for ranks, size in zip(a.dims, self.dims[a.tensor]):
                extent = 1
                for r in ranks:
                    extent *= tiles[r]
                n *= extent if extent < size else size
            self.fp[id(a)] = n
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

    steps = {i: distinct(frozenset(shapes[i].ranks)) for i in kernel.einsums}
    tile_elems: dict[str, int] = {}
    for i in kernel.einsums:
        sh = shapes[i]
        for a in (sh.write, *sh.reads):
            fp = plan.footprint(a)
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
    explicit = {t: level_index[view.placement[t]] for t in tile_elems if t in view.placement}
    level_of, spilled = _place(kernel, resident, explicit, capacity, out, memory, eb)

    # Main-memory traffic: reads from outside, results written out, spilled intermediates.
    def charge(i: int, tensor: str, total: float, compulsory: float) -> None:
        for row in (out.bytes[i], out.moved[i]):
            if tensor in ctx.cascade_io:
                row[0] += compulsory
                row[plan.again[tensor]] += total - compulsory
            else:
                row[plan.again[tensor]] += total

    for t in kernel.reads:
        fp = tile_elems[t] * eb
        ts = kernel.index_ranks[t]
        fetches = prefix[innermost(ts) + 1]
        out.transfers += fetches
        charge(kernel.first_user[t], t, fetches * fp, distinct(ts) * fp)
    for t in kernel.results:
        w = kernel.writer[t]
        fp = tile_elems[t] * eb
        ts = kernel.index_ranks[t]
        if t in kernel.final_only and lr is not None:
            writes = distinct(ts - {lr})
            out.transfers += writes
            charge(w, t, writes * fp, writes * fp)
            continue
        j = innermost(ts)
        n_distinct = distinct(ts)
        outer_reduction = any(loop_pos.get(r, j) < j for r in shapes[w].reduced)
        fetches = prefix[j + 1] if outer_reduction else n_distinct
        out.transfers += 2 * fetches - n_distinct
        charge(w, t, (2 * fetches - n_distinct) * fp, n_distinct * fp)
    for t in spilled:
        w = kernel.writer[t]
        n = steps[w] * (1 + ctx.consumers.get(t, 1)) * tile_elems[t] * eb
        out.bytes[w][cache_level(ctx, tile_elems[t] * eb)] += n
        out.moved[w][cache_level(ctx, tile_elems[t] * eb)] += n

    if not loops:
        out.transfers = 0  # one untiled operation: no slicing
    # Operand streaming from the level holding each tile, once per step of each Einsum. With
    # caches, operations run one at a time: the smallest cache holding the operation's own
    # tiles serves them (tiles placed explicitly stay where they were placed).
    caches = not any(lvl.managed for lvl in memory[1:])
    for i in kernel.einsums:
        row, n = out.bytes[i], steps[i] * eb
        sh = shapes[i]
        own = out.staging
        if caches:
            work = sum(plan.footprint(a) for a in (sh.write, *sh.reads)) * eb
            own = max((j for j in range(1, len(memory)) if capacity(j) >= work), default=0)
        for a in (sh.write, *sh.reads):
            li = explicit.get(a.tensor, own) if caches else level_of.get(a.tensor, own)
            if li > 0 or a.tensor not in spilled:
                row[li] += n * plan.footprint(a)
    return out


def _place(
    kernel: Kernel,
    resident: Mapping[str, int],
    explicit: Mapping[str, int],
    capacity: Callable[[int], float],  # bytes one tile may use of a level
    out: KernelTraffic,
    memory: Sequence[MemoryLevel],
    eb: int,
) -> tuple[dict[str, int], list[str]]:
    """Which level holds each tile; sets ``out.staging``, and ``out.fits``/``reason``."""
    level_of: dict[str, int] = {}
    spilled: list[str] = []
    managed = [i for i, lvl in enumerate(memory) if i > 0 and lvl.managed]
    if not managed:  # caches: the smallest that holds the whole working set serves the tiles
        work = sum(resident.values()) * eb
        out.staging = max((i for i in range(1, len(memory)) if capacity(i) >= work), default=0)
        for t in resident:
            level_of[t] = explicit.get(t, out.staging)
        return level_of, spilled
    staging = out.staging = managed[0]
    used = [0.0] * len(memory)
    for t in (*kernel.reads, *kernel.results, *explicit):
        li = level_of[t] = explicit.get(t, staging)
        if li > 0:
            used[li] += resident[t] * eb
    for li in range(1, len(memory)):
        if used[li] > capacity(li) and out.fits:
            here = sorted((t for t in level_of if level_of[t] == li), key=lambda t: -resident[t])
            parts = ", ".join(f"{t} {_kib(resident[t] * eb)}" for t in here[:3])
            out.fits = False
            out.reason = (
                f"{kernel.name}: tiles need {_kib(used[li])} of {memory[li].name} ({parts}), "
                f"but a tile gets {_kib(capacity(li))}"
            )
    for t in kernel.internal:  # intermediates stay on chip while they fit, else spill
        if t in level_of:
            continue
        if used[staging] + resident[t] * eb <= capacity(staging):
            level_of[t] = staging
            used[staging] += resident[t] * eb
        else:
            level_of[t] = 0
            spilled.append(t)
    out.spilled = tuple(spilled)
    return level_of, spilled


def _kib(n_bytes: float) -> str:
    if n_bytes >= 1 << 20:
        return f"{n_bytes / (1 << 20):.1f} MiB"
    return f"{n_bytes / 1024:.1f} KiB"
