"""The cost model: time, work and data movement of a cascade under a schedule on a target.

``CostModel(cascade, target, sizes)`` precomputes everything that does not depend on the
schedule: each Einsum's work (``work``), its units (``units``), the loop nests (``kernels``).
Under a schedule, ``traffic`` derives each kernel's bytes per memory level from tile sizes and
loop order, ``fit`` whether its tiles fit, and ``kernel_time`` its time; ``report`` renders it.

``.report(schedule)`` computes the full ``CostReport``. ``.estimate(schedule)`` is the fast
path the autotuner calls thousands of times a second: the same arithmetic, but a kernel's time
is remembered under everything it depends on (the sizes and tiles of its ranks and of the
tensors it touches, and its part of the loop order, placements, units and parallel ranks), so a
search that changes one tile reprices only the kernels that tile touches. It returns seconds,
``inf`` when a tile does not fit.

Work is priced in the cascade's ``dtype``, except, with ``carry_dtype``, what the JAX backend's
blockwise loop runs wider: its carried state and everything computed from it (the loop keeps a
bfloat16 cascade's running max, sums and ``P V`` in float32; see ``jax_blockwise``). Float32
contractions run as JAX's matmul precision says on the target (``precision``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import itemgetter

from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.kernel_time import kernel_cost
from einfuse.cost_model.kernels import Kernel, build_kernels, einsum_shape
from einfuse.cost_model.overheads import Overheads
from einfuse.cost_model.precision import current_precision, precision_level
from einfuse.cost_model.report import CostReport, EinsumCost, KernelCost
from einfuse.cost_model.schedule_view import ScheduleView
from einfuse.cost_model.target import Target, canonical_dtype, get_target
from einfuse.cost_model.traffic import Plan, TrafficContext, ceil_div, kernel_traffic
from einfuse.cost_model.units import (
    ELEMENT_BYTES,
    Charge,
    default_dtype,
    einsum_charges,
)
from einfuse.cost_model.work import einsum_work
from einfuse.ir.cascade import Cascade, Einsum, bind_sizes

_MEMO_LIMIT = 1 << 16  # remembered times per kernel; cleared when full


def _nothing(_: Mapping[str, int]) -> tuple[()]:
    return ()


@dataclass(frozen=True, slots=True)
class _Depends:
    """What a kernel's time depends on besides the cascade: the sizes and tiles of ``pick``'s
    ranks (its own and those of every tensor it touches), the order of its loop ranks, and the
    placements, units and parallel ranks of its tensors, Einsums (by output) and loops."""

    pick: Callable[[Mapping[str, int]], object]
    loop_ranks: frozenset[str]
    tensors: frozenset[str]
    outputs: frozenset[str]


class CostModel:
    """A cascade's schedule-independent facts for one target and binding of sizes."""

    def __init__(
        self,
        cascade: Cascade,
        target: str | Target = "cpu",
        sizes: Mapping[str, int] | None = None,
        dtype: str | None = None,
        overheads: Overheads | None = None,
        carry_dtype: str | None = None,
        matmul_precision: str | None = None,
    ) -> None:
        self.cascade = cascade
        # How float32 dots run (``precision``): JAX's setting when the model is built.
        self.precision = precision_level(matmul_precision or current_precision())
        self.target = get_target(target) if isinstance(target, str) else target
        t = self.target
        self.dtype = canonical_dtype(dtype) if dtype is not None else default_dtype(t)
        if self.dtype not in ELEMENT_BYTES:
            raise CostModelError(f"cost model: no element size known for dtype {self.dtype}")
        self.overheads = overheads or t.overheads or Overheads.default_for(t.device_kind)
        try:
            self.sizes = bind_sizes(cascade, sizes)
        except ValueError as exc:
            raise CostModelError(f"cost model needs concrete sizes: {exc}") from None
        self.einsums = cascade.einsums
        self.work = tuple(einsum_work(e) for e in self.einsums)
        self.shapes = tuple(einsum_shape(e) for e in self.einsums)
        self.kernels: tuple[Kernel, ...] = build_kernels(cascade)
        self.level_index = {lvl.name: i for i, lvl in enumerate(t.memory)}
        self.bandwidth = [lvl.bandwidth_bytes_per_s for lvl in t.memory]
        tensors = [d.name for d in cascade.inputs] + [e.output for e in self.einsums]
        consumers: dict[str, int] = {}
        for e in self.einsums:
            for name in e.inputs:
                consumers[name] = consumers.get(name, 0) + 1
        tensor_dims = {n: cascade.tensor_ranks(n) for n in tensors}
        self.ctx = TrafficContext(
            target=t,
            shapes=self.shapes,
            tensor_dims=tensor_dims,
            iterative_dim={e.output: e.iterative_dim for e in self.einsums if e.is_recurrence},
            cascade_io=frozenset([d.name for d in cascade.inputs] + list(cascade.outputs)),
            consumers=consumers,
            element_bytes=ELEMENT_BYTES[self.dtype],
            parallel_by_default=t.device_kind == "gpu",
        )
        self.partitions = {p.inner: p for p in cascade.partitions}
        self.outer_ranks = {p.outer for p in cascade.partitions}
        self.iterative = {e.iterative_rank for e in self.einsums if e.iterative_rank}
        self.engine_of = {
            u.name: "cores" if t.device_kind == "cpu" else (u.emulated_on or u.name)
            for u in t.units
        }
        self.einsum_dtypes = _einsum_dtypes(cascade, self.dtype, carry_dtype)
        self.engines = tuple(dict.fromkeys(self.engine_of.values()))
        self._default: ScheduleView | None = None
        self.work_cache: dict[tuple, dict] = {}  # see ``kernel_time.einsum_work_s``
        self._charge_cache: dict[tuple[tuple[str, str], ...], tuple[tuple[Charge, ...], ...]] = {}
        fixed = self.outer_ranks | self.iterative
        self._untiled = [r for r in self.sizes if r in fixed]  # one at a time: tile 1
        self._whole = [r for r in self.sizes if r not in fixed and r in self.partitions]
        self._tileable = [r for r in self.sizes if r not in fixed and r not in self.partitions]
        self._depends = tuple(self._kernel_depends(k, tensor_dims) for k in self.kernels)
        self._memo: tuple[dict[tuple, float], ...] = tuple({} for _ in self.kernels)

    def _kernel_depends(self, k: Kernel, tensor_dims: Mapping[str, tuple[str, ...]]) -> _Depends:
        shapes = [self.shapes[i] for i in k.einsums]
        tensors = {a.tensor for sh in shapes for a in (sh.write, *sh.reads)}
        ranks = {r for i in k.einsums for r in self.einsums[i].ranks}
        ranks |= {r for t in tensors for r in tensor_dims[t] if r}
        outputs = frozenset(self.einsums[i].output for i in k.einsums)
        pick = itemgetter(*sorted(ranks)) if ranks else _nothing
        return _Depends(pick, frozenset(k.ranks), frozenset(tensors), outputs)

    def _charges(self, binding: Mapping[str, str]) -> tuple[tuple[Charge, ...], ...]:
        """Per Einsum, the units its work runs on (``units.einsum_charges``), cached per binding."""
        key = tuple(sorted(binding.items()))
        cached = self._charge_cache.get(key)
        if cached is None:
            cached = einsum_charges(
                self.target, self.einsum_dtypes, self.einsums, self.work, binding, self.precision
            )
            self._charge_cache[key] = cached
        return cached

    # ------------------------------------------------------------------ schedule -> sizes, tiles
    def _plan(self, view: ScheduleView) -> tuple[dict[str, int], dict[str, int]]:
        sizes = dict(self.sizes)
        known = set(sizes)
        for r, v in view.tiles.items():
            if r not in known:
                raise CostModelError(f"schedule tiles rank {r!r}, which the cascade does not have")
            if v < 1:
                raise CostModelError(f"schedule tile of {r} is {v}; tiles must be >= 1")
        for inner, p in self.partitions.items():
            tile = view.tiles.get(inner, view.tiles.get(p.rank, sizes[inner]))
            tile = min(tile, sizes[p.rank])
            sizes[inner], sizes[p.outer] = tile, ceil_div(sizes[p.rank], tile)
        for r, n in view.device_ranks().items():
            if r not in known:
                raise CostModelError(f"schedule binds rank {r!r} to a mesh axis; no such rank")
            sizes[r] = ceil_div(sizes[r], n)
        asked = view.tiles
        tiles = dict.fromkeys(self._untiled, 1)
        for r in self._whole:
            tiles[r] = sizes[r]
        for r in self._tileable:
            s = sizes[r]
            t = asked.get(r, s)
            tiles[r] = t if t < s else s
        return sizes, tiles

    # ------------------------------------------------------------------ evaluation
    def estimate(
        self, schedule: object | None = None, without: frozenset[str] = frozenset()
    ) -> float:
        """Predicted seconds (``inf`` for a schedule whose tiles do not fit): the fast path.

        ``None`` prices the default tiles (``default_tiles``). Equal to ``report(schedule)
        .total_s``: kernels priced before under the same inputs are not priced again.
        Kernels named in ``without`` (``loop m1``) are left out: the caller prices them
        (a backend that runs that loop as a kernel of its own, ``autotune.pallas_model``).
        """
        view = self.default_view() if schedule is None else ScheduleView.of(schedule)
        self._check_placement(view)
        charges = self._charges(view.units)
        sizes, tiles = self._plan(view)
        plan: Plan | None = None
        rare = bool(view.parallel or view.placement or view.units)
        order = view.loop_order
        total = 0.0
        for k, dep, memo in zip(self.kernels, self._depends, self._memo):
            if without and k.name in without:
                continue
            loop_ranks = dep.loop_ranks
            key: tuple = (
                dep.pick(sizes),
                dep.pick(tiles),
                tuple([r for r in order if r in loop_ranks]) if order else (),
            )
            if rare:
                key += (self._rare_key(view, dep),)
            seconds = memo.get(key)
            if seconds is None:
                if plan is None:
                    plan = Plan(self.ctx, sizes, tiles, view)
                tr = kernel_traffic(k, plan, self.level_index)
                seconds = math.inf
                if tr.fits:
                    seconds = kernel_cost(self, k, tr, plan, charges, None).time_s
                if len(memo) >= _MEMO_LIMIT:
                    memo.clear()
                memo[key] = seconds
            if seconds == math.inf:
                return math.inf
            total += seconds
        return total

    @staticmethod
    def _rare_key(view: ScheduleView, dep: _Depends) -> tuple:
        """The part of parallel ranks, placements and unit bindings one kernel depends on."""
        loop_ranks, tensors, outputs = dep.loop_ranks, dep.tensors, dep.outputs
        return (
            bool([a for a in view.parallel.values() if a is None]),
            tuple(sorted((r, a) for r, a in view.parallel.items() if r in loop_ranks)),
            tuple(sorted(view.mesh.items())) if view.parallel else (),
            view.overlap_chunks,
            tuple(sorted((t, lvl) for t, lvl in view.placement.items() if t in tensors)),
            tuple(sorted((o, u) for o, u in view.units.items() if o in outputs)),
        )

    def report(self, schedule: object | None = None) -> CostReport:
        """The full breakdown: per Einsum and kernel work, bytes, time and bound."""
        view = self.default_view() if schedule is None else ScheduleView.of(schedule)
        return self._evaluate(view)

    def default_view(self) -> ScheduleView:
        """No tiling where that fits; else tiles halved until they fit (see ``default_tiles``)."""
        if self._default is None:
            self._default = ScheduleView(tiles=self.default_tiles())
        return self._default

    def default_tiles(self) -> dict[str, int]:
        """Tiles for an unscheduled cascade: none on caches; on managed memory, greedy halving.

        Batch-like ranks (indexing every input) go to 1 first, then the largest tile of a rank
        some Einsum writes is halved, then of a rank only reduced, until every kernel's tiles
        fit with no intermediate spilled (or, where that never happens, the first that fit).
        """

        def verdict(tiles: dict[str, int]) -> tuple[bool, bool]:
            r = self._evaluate(ScheduleView(tiles=dict(tiles)))
            return r.fits, r.fits and not any(k.spilled for k in r.kernels)

        tiles: dict[str, int] = {}
        if verdict(tiles)[1]:
            return tiles
        fixed = self.outer_ranks | self.iterative | set(self.partitions)
        inputs = [set(self.cascade.tensor_ranks(d.name)) for d in self.cascade.inputs]
        batch = [r for r in set.intersection(*inputs) if r not in fixed] if inputs else []
        outputs = {r for e in self.einsums for r in e.output_ranks}
        for r in batch:
            tiles[r] = 1
        first_fit: dict[str, int] | None = None
        for _ in range(64):
            fits, clean = verdict(tiles)
            if clean:
                return tiles
            if fits and first_fit is None:
                first_fit = dict(tiles)
            open_ = [r for r in self.sizes if r not in fixed and tiles.get(r, self.sizes[r]) > 1]
            if not open_:
                break
            r = max(open_, key=lambda r: (r in outputs, tiles.get(r, self.sizes[r])))
            tiles[r] = ceil_div(tiles.get(r, self.sizes[r]), 2)
        return first_fit if first_fit is not None else tiles

    def _check_placement(self, view: ScheduleView) -> None:
        for tensor, level in view.placement.items():
            if level not in self.level_index:
                raise CostModelError(
                    f"schedule places {tensor} in {level!r}; target {self.target.name!r} has "
                    f"levels {', '.join(self.level_index)}"
                )

    def _evaluate(self, view: ScheduleView) -> CostReport:
        t = self.target
        self._check_placement(view)
        charges = self._charges(view.units)
        plan = Plan(self.ctx, *self._plan(view), view)
        rows: list[EinsumCost] = []
        kernels: list[KernelCost] = []
        total, reason = 0.0, ""
        for k in self.kernels:
            tr = kernel_traffic(k, plan, self.level_index)
            if not tr.fits:
                reason = reason or tr.reason
            kc = kernel_cost(self, k, tr, plan, charges, rows)
            kernels.append(kc)
            total += kc.time_s
        if reason:
            return CostReport.rejected(t.name, self.dtype, reason)
        by_bound: dict[str, float] = {}
        for kc in kernels:
            by_bound[kc.bound] = by_bound.get(kc.bound, 0.0) + kc.time_s
        bound = max(by_bound, key=by_bound.__getitem__) if by_bound else "compute"
        levels = tuple(self.level_index)
        return CostReport(
            t.name, self.dtype, total, bound, True, "", tuple(rows), tuple(kernels), levels
        )


def _einsum_dtypes(cascade: Cascade, dtype: str, carry_dtype: str | None) -> tuple[str, ...]:
    """Per Einsum, the dtype its work runs in: its dtype in the IR with the inputs declared
    ``dtype`` (a float32 softmax inside a bfloat16 program is priced in float32; a
    contraction of operands cast up runs on the narrow operands), at least ``carry_dtype``
    for a fused group's carried state and every Einsum that reads such a value."""
    from einfuse.ir.dtypes import tensor_dtypes, with_input_dtype

    ir = tensor_dtypes(with_input_dtype(cascade, dtype), dtype)
    out = [work_dtype(e, ir, dtype) for e in cascade.einsums]
    carry = dtype if carry_dtype is None else canonical_dtype(carry_dtype)
    if carry == dtype:
        return tuple(out)
    from einfuse.passes.fuse import fused_groups

    wide = {t for g in fused_groups(cascade) for t in g.carried}
    for k, e in enumerate(cascade.einsums):
        if e.output in wide or wide & set(e.inputs):
            wide.add(e.output)
            out[k] = carry
    return tuple(out)


def work_dtype(e: Einsum, ir: Mapping[str, str], dtype: str) -> str:
    """The dtype of ``e``'s arithmetic: a sum of products cast up runs on the narrow ones."""
    from einfuse.ir.dtypes import expr_dtype
    from einfuse.ir.expr import CAST_OPS, Op

    if e.reduced_ranks and e.reduce == "sum" and isinstance(e.expr, Op) and e.expr.op == "mul":
        bare = [a.args[0] if isinstance(a, Op) and a.op in CAST_OPS else a for a in e.expr.args]
        narrow = {expr_dtype(a, ir.get) for a in bare} - {None}
        if len(narrow) == 1:
            return canonical_dtype(narrow.pop())
    return canonical_dtype(ir.get(e.output, dtype))


def estimate(
    cascade: Cascade,
    schedule: object | None = None,
    target: str | Target = "cpu",
    sizes: Mapping[str, int] | None = None,
    dtype: str | None = None,
) -> CostReport:
    """One-shot ``CostModel(cascade, target, sizes, dtype).report(schedule)``."""
    return CostModel(cascade, target, sizes, dtype).report(schedule)


def utilization(report: CostReport, unit: str) -> float:
    """Fraction of the total time the unit named ``unit`` is busy (``pe_2d``, ``tensor_core``)."""
    return report.utilization(unit)
