"""The cost model: time, work and data movement of a cascade under a schedule on a target.

Per Einsum the model counts work on each kind of unit:

* **matrix**: a sum of products with at least two factors that read tensors is a contraction;
  its MACs are the product of all its iteration ranks. Constant factors (``* 0.125``) are
  applied once, to the smallest of its operands and output, as a compiler folds them;
* **vector**: every other operator, once per point of the ranks it depends on (loop-invariant
  code is hoisted: a mask ``where(m0 < M, SN, 0)`` inside ``SN * V`` is not redone for every
  ``f``), plus one combine per iteration point of a reduction; constant subexpressions fold;
* **transcendental**: ``exp log tanh erf rsqrt sqrt logistic sin cos pow``, counted likewise.
  Where the target emulates them (``emulated_on``, ``exp_cost_in_macs``) they cost that many
  ops of the emulating unit. A schedule option ``unit.<Einsum>=<unit>`` runs all of an Einsum's
  work on that unit, a transcendental costing ``exp_cost_in_macs`` ops on a non-SFU unit.

Bytes per memory level come from ``traffic`` (reuse from tile sizes and loop order). Times:

* an Einsum alone takes ``max(compute on each engine, bytes / bandwidth at each level)`` plus an
  all-reduce (alpha-beta ring, ``collectives``) when it sums over a rank bound to a mesh axis;
* units that are separate hardware (tensor cores, CUDA cores, SFUs; FuseMax's 2D and 1D arrays)
  are separate *engines*: in a kernel (a fused group) they work on different steps at once, so
  the kernel takes the largest per-engine sum or per-level sum, plus the pipeline fill (one step
  of the other engines). What cannot overlap is what adds to the busiest engine: under the
  FuseMax mapping, the epilogue division on the 1D array (see ``fusemax``);
* on a CPU (``device_kind == "cpu"``) all units are the same cores and XLA runs one operation at
  a time, so a kernel's Einsums add up, each at its own roofline. Operand tiles stream under the
  compute, but data crossing the kernel boundary (tiles of inputs re-read, results written)
  does not overlap it: XLA:CPU copies it in an operation of its own, or reads it inside one that
  then runs at memory speed. Fixed costs per loop step and per operation (``Overheads``: the
  while-loop and op dispatch of XLA:CPU) come on top.

``CostModel(cascade, target, sizes)`` precomputes everything that does not depend on the
schedule; ``.estimate(schedule)`` is the fast path (seconds, ``inf`` when a tile does not fit)
and ``.report(schedule)`` the full ``CostReport``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from einfuse.cost_model.collectives import collective_latency_s, collective_time, overlapped_time
from einfuse.cost_model.target import ComputeUnit, Target, canonical_dtype, get_target
from einfuse.cost_model.traffic import (
    CostModelError,
    Kernel,
    KernelTraffic,
    Plan,
    ScheduleView,
    TrafficContext,
    build_kernels,
    ceil_div,
    einsum_shape,
    kernel_traffic,
)
from einfuse.ir.cascade import Cascade, Einsum, bind_sizes
from einfuse.ir.expr import Access, Expr, Op, Var, rank_vars

TRANSCENDENTAL_OPS = frozenset(
    {"exp", "log", "tanh", "erf", "rsqrt", "sqrt", "logistic", "sin", "cos", "pow"}
)
_ELEMENT_BYTES = {"float64": 8, "float32": 4, "tensorfloat32": 4, "bfloat16": 2, "float16": 2}
_ELEMENT_BYTES |= {"float8_e4m3fn": 1, "int8": 1}


@dataclass(frozen=True, slots=True)
class Overheads:
    """Fixed costs the roofline misses: per kernel, per loop step, per operation in a loop.

    Operations are the Einsums, each counted once per step it runs (hoisted ones less often),
    plus one slice or update per tile moved across the kernel boundary. The CPU figures were
    measured on the 2-core development host with XLA:CPU (jax 0.10.2): a ``fori_loop`` costs
    0.5-1 us per iteration and each dot, reduction or fusion in its body 1.1 us of CPU time
    (about 3 us of wall time under load). A GPU kernel runs its steps as a grid, but each kernel
    launch costs a few microseconds (an assumed 2 us, not measured here); other accelerators
    run one pipelined program and default to zero.
    """

    kernel_s: float = 0.0
    loop_step_s: float = 0.0
    op_s: float = 0.0

    @staticmethod
    def for_target(target: Target) -> Overheads:
        if target.device_kind == "cpu":
            return Overheads(loop_step_s=1.0e-6, op_s=1.5e-6)
        if target.device_kind == "gpu":
            return Overheads(kernel_s=2.0e-6)
        return Overheads()


OpTerm = tuple[tuple[str, ...], int, int]  # (ranks it depends on, vector ops, transcendentals)
Charge = tuple[str, float, float, float, float]  # (unit, per MAC, per vector, per transc., rate)


@dataclass(frozen=True, slots=True)
class Work:
    """An Einsum's work: a contraction's MACs cover its whole iteration space; every other
    operator runs once per point of the ranks it depends on (``terms``), as a compiler hoists
    loop-invariant code; ``scale_ops`` counts constant factors of a contraction."""

    macs: int
    terms: tuple[OpTerm, ...]
    scale_ops: int = 0

    def counts(self, sizes: Mapping[str, int]) -> tuple[float, float]:
        """(vector ops, transcendentals) under concrete sizes."""
        vec = trans = 0.0
        for ranks, v, t in self.terms:
            n = math.prod(sizes[r] for r in ranks)
            vec += v * n
            trans += t * n
        return vec, trans


def _is_constant(x: Expr) -> bool:
    return not any(isinstance(n, Access | Var) for n in x.walk())


def _op_terms(x: Expr, out: dict[tuple[str, ...], list[int]]) -> None:
    """Add each operator of ``x`` to ``out`` under the ranks it depends on; constants fold."""
    if not isinstance(x, Op) or _is_constant(x):
        return
    ranks = tuple(sorted(rank_vars(x)))
    slot = out.setdefault(ranks, [0, 0])
    slot[1 if x.op in TRANSCENDENTAL_OPS else 0] += 1
    for a in x.args:
        _op_terms(a, out)


def _factors(x: Expr) -> list[Expr]:
    if isinstance(x, Op) and x.op == "mul":
        return [f for a in x.args for f in _factors(a)]
    return [x]


def _reads_tensor(x: Expr) -> bool:
    return any(isinstance(n, Access) for n in x.walk())


def einsum_work(e: Einsum) -> Work:
    """Count the work of ``e`` by the rules in this module's docstring.

    A sum of products is a contraction when at least two factors read tensors; a factor that
    is an expression (a masked operand, ``where(m < M, SN, 0)``) is prepared once per point of
    its own ranks, and factors beyond two cost a multiply per point.
    """
    terms: dict[tuple[str, ...], list[int]] = {}
    space = tuple(sorted(e.ranks))
    if e.reduce == "sum" and e.reduced_ranks and not e.is_recurrence:
        factors = _factors(e.expr)
        operands = [f for f in factors if _reads_tensor(f)]
        if len(operands) >= 2:
            consts = [f for f in factors if _is_constant(f)]
            for f in factors:
                if f not in consts:
                    _op_terms(f, terms)
            extra = len(factors) - len(consts) - 2
            if extra:
                terms.setdefault(space, [0, 0])[0] += extra
            return Work(1, _freeze(terms), len(consts))
    _op_terms(e.expr, terms)
    if e.reduced_ranks and not e.is_recurrence:
        terms.setdefault(space, [0, 0])[0] += 1
    return Work(0, _freeze(terms))


def _freeze(terms: dict[tuple[str, ...], list[int]]) -> tuple[OpTerm, ...]:
    return tuple((ranks, v, t) for ranks, (v, t) in terms.items() if v or t)


def default_dtype(target: Target) -> str:
    """float32 where every unit runs it, else the first 16-bit type they all run."""
    for dtype in ("float32", "bfloat16", "float16"):
        if all(dtype in u.dtypes for u in target.units):
            return dtype
    raise CostModelError(f"target {target.name!r}: no dtype that all units support; pass dtype=")


# ---------------------------------------------------------------------------------- the report
@dataclass(frozen=True, slots=True)
class EinsumCost:
    """One Einsum priced alone (its own roofline); its kernel may overlap it with others."""

    name: str
    kernel: str
    macs: float
    vector_ops: float
    transcendentals: float
    unit_seconds: tuple[tuple[str, float], ...]
    bytes_per_level: tuple[tuple[str, float], ...]
    comm_s: float
    time_s: float
    bound: str


@dataclass(frozen=True, slots=True)
class KernelCost:
    """One loop nest: a fused group with its epilogue, or a single Einsum."""

    name: str
    einsums: tuple[str, ...]
    steps: int
    in_flight: int
    time_s: float
    fill_s: float
    overhead_s: float
    comm_s: float
    bound: str
    staging: str
    spilled: tuple[str, ...]
    unit_seconds: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class CostReport:
    """What a schedule costs and why; ``fits`` False (time ``inf``) names the tile that failed."""

    target: str
    dtype: str
    total_s: float
    bound: str = ""
    fits: bool = True
    reason: str = ""
    einsums: tuple[EinsumCost, ...] = ()
    kernels: tuple[KernelCost, ...] = ()
    levels: tuple[str, ...] = ()

    @staticmethod
    def rejected(target: str, dtype: str, reason: str) -> CostReport:
        return CostReport(target, dtype, math.inf, "does not fit", False, reason)

    def unit_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.kernels:
            for u, s in k.unit_seconds:
                out[u] = out.get(u, 0.0) + s
        return out

    def utilization(self, unit: str) -> float:
        """Fraction of the total time ``unit`` (a unit's name) is busy."""
        busy = self.unit_seconds()
        if unit not in busy:
            raise KeyError(f"no work ran on unit {unit!r}; busy units: {', '.join(busy)}")
        return busy[unit] / self.total_s if self.total_s > 0 else 0.0

    def bytes_per_level(self) -> dict[str, float]:
        out = dict.fromkeys(self.levels, 0.0)
        for e in self.einsums:
            for name, b in e.bytes_per_level:
                out[name] += b
        return out

    def table(self) -> str:
        """Aligned text: one row per Einsum, then one per kernel, then the total."""
        if not self.fits:
            return f"rejected: {self.reason}"
        head = ["Einsum", "kernel", "MACs", "vector", "transc.", *self.levels, "time", "bound"]
        rows = [head]
        for e in self.einsums:
            b = dict(e.bytes_per_level)
            rows.append(
                [e.name, e.kernel, _si(e.macs), _si(e.vector_ops), _si(e.transcendentals)]
                + [_si(b[lvl], "B") for lvl in self.levels]
                + [_secs(e.time_s), e.bound]
            )
        out = _align(rows)
        krows = [["kernel", "Einsums", "steps", "staged in", "overhead", "time", "bound"]]
        for k in self.kernels:
            n = f"{len(k.einsums)}" + (f" (spills {', '.join(k.spilled)})" if k.spilled else "")
            krows.append([k.name, n, str(k.steps), k.staging, _secs(k.overhead_s),
                          _secs(k.time_s), k.bound])  # fmt: skip
        total = f"total {_secs(self.total_s)} on {self.target} ({self.dtype}), {self.bound}"
        return f"{out}\n\n{_align(krows)}\n\n{total}"

    def why(self) -> str:
        """One paragraph naming the bottleneck and what it would take to move it."""
        if not self.fits:
            return (
                f"This schedule is rejected: {self.reason}. Use smaller tiles or place them lower."
            )
        k = max(self.kernels, key=lambda k: k.time_s)
        share = k.time_s / self.total_s if self.total_s else 0.0
        busy = self.unit_seconds()
        unit = max(busy, key=busy.__getitem__) if busy else None
        text = (
            f"Predicted {_secs(self.total_s)} on {self.target} ({self.dtype}), bound by "
            f"{self.bound}. The heaviest kernel is {k.name} ({', '.join(k.einsums[:6])}"
            f"{', ...' if len(k.einsums) > 6 else ''}): {share:.0%} of the time, {k.bound}-bound"
        )
        if unit is not None:
            text += f"; unit {unit} is busy {busy[unit] / self.total_s:.0%} of the time"
        level_b = self.bytes_per_level()
        if level_b:
            main = self.levels[0]
            text += f"; {_si(level_b[main], 'B')} cross {main}"
        hint = {
            "compute": "only less work (pruning, a cheaper form) or a faster unit helps",
            "memory": "larger tiles, or a loop order that keeps the re-fetched tensor resident, "
            "cut the traffic",
            "overhead": "fewer, larger steps (bigger tiles) cut the per-step dispatch cost",
            "communication": "overlapping the collective with compute (chunks) hides it",
        }[self.bound.split(" ")[0]]
        return f"{text}. As it is {self.bound.split(' ')[0]}-bound, {hint}."


def name_bound(
    units: Mapping[str, float],
    levels: Mapping[str, float],
    comm: float,
    overhead: float = 0.0,
) -> str:
    """The largest of compute (per unit), memory (per level), communication and overhead."""
    best, what = -1.0, "compute"
    for u, s in units.items():
        if s > best:
            best, what = s, f"compute ({u})"
    for lvl, s in levels.items():
        if s > best:
            best, what = s, f"memory ({lvl})"
    if comm > best:
        best, what = comm, "communication"
    if overhead > best:
        what = "overhead"
    return what


def _si(x: float, unit: str = "") -> str:
    if x == 0:
        return "0"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _secs(s: float) -> str:
    if not math.isfinite(s):
        return "inf"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _align(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if j < 2 or j == len(r) - 1 else c.rjust(w)
                 for j, (c, w) in enumerate(zip(r, widths))]  # fmt: skip
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


class CostModel:
    """A cascade's schedule-independent facts for one target and binding of sizes."""

    def __init__(
        self,
        cascade: Cascade,
        target: str | Target = "cpu",
        sizes: Mapping[str, int] | None = None,
        dtype: str | None = None,
        overheads: Overheads | None = None,
    ) -> None:
        self.cascade = cascade
        self.target = get_target(target) if isinstance(target, str) else target
        t = self.target
        self.dtype = canonical_dtype(dtype) if dtype is not None else default_dtype(t)
        if self.dtype not in _ELEMENT_BYTES:
            raise CostModelError(f"cost model: no element size known for dtype {self.dtype}")
        self.overheads = overheads or Overheads.for_target(t)
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
        self.ctx = TrafficContext(
            target=t,
            shapes=self.shapes,
            tensor_dims={n: cascade.tensor_ranks(n) for n in tensors},
            iterative_dim={e.output: e.iterative_dim for e in self.einsums if e.is_recurrence},
            cascade_io=frozenset([d.name for d in cascade.inputs] + list(cascade.outputs)),
            consumers=consumers,
            element_bytes=_ELEMENT_BYTES[self.dtype],
            parallel_by_default=t.device_kind == "gpu",
        )
        self.partitions = {p.inner: p for p in cascade.partitions}
        self.outer_ranks = {p.outer for p in cascade.partitions}
        self.iterative = {e.iterative_rank for e in self.einsums if e.iterative_rank}
        self.engine_of = {
            u.name: "cores" if t.device_kind == "cpu" else (u.emulated_on or u.name)
            for u in t.units
        }
        self.rates = {u.name: self._rate(u) for u in t.units}
        self.engines = tuple(dict.fromkeys(self.engine_of.values()))
        self._default: ScheduleView | None = None
        self._charge_cache: dict[tuple[tuple[str, str], ...], tuple[tuple[Charge, ...], ...]] = {}

    # ------------------------------------------------------------------ units
    def _charges(self, binding: Mapping[str, str]) -> tuple[tuple[Charge, ...], ...]:
        """Per Einsum, the units its work runs on (see the module docstring), cached per binding.

        A charge ``(unit, per MAC, per vector op, per transcendental, rate)`` turns counts into
        busy seconds with a few multiplications, which keeps the fast path fast.
        """
        key = tuple(sorted(binding.items()))
        cached = self._charge_cache.get(key)
        if cached is not None:
            return cached
        t = self.target
        units = {u.name: u for u in t.units}
        for name, unit in binding.items():
            if unit not in units:
                raise CostModelError(
                    f"schedule binds {name} to unit {unit!r}; target {t.name!r} has units "
                    f"{', '.join(units)}"
                )
        exp_cost = t.exp_cost_in_macs
        out = []
        for e, w in zip(self.einsums, self.work):
            coef: dict[str, list[float]] = {}
            bound = binding.get(e.output)
            has_trans = any(tr for _, _, tr in w.terms)
            if bound is not None:
                unit = units[bound]
                if has_trans and unit.kind != "transcendental" and exp_cost is None:
                    raise CostModelError(
                        f"{e.output} is bound to {unit.name}, which cannot evaluate "
                        f"transcendentals: target {t.name!r} gives no exp_cost_in_macs"
                    )
                k = 1.0 if unit.kind == "transcendental" else (exp_cost or 1.0)
                coef[unit.name] = [1.0, 1.0, k]
            else:
                matrix = self._unit("matrix") or self._unit("vector")
                vector = self._unit("vector") or self._unit("matrix")
                sfu = self._unit("transcendental")
                coef.setdefault(matrix.name, [0.0, 0.0, 0.0])[0] += 1.0
                coef.setdefault(vector.name, [0.0, 0.0, 0.0])[1] += 1.0
                if sfu is not None:
                    coef.setdefault(sfu.name, [0.0, 0.0, 0.0])[2] += 1.0
                else:
                    coef[vector.name][2] += exp_cost or 1.0
            needs = (bool(w.macs), bool(w.terms) or bool(w.scale_ops), has_trans)
            charges = []
            for name, (cm, cv, ct) in coef.items():
                used = (cm and needs[0]) or (cv and needs[1]) or (ct and needs[2])
                if used and math.isnan(self.rates[name]):
                    raise CostModelError(
                        f"target {t.name!r}: unit {name} has no rate for {self.dtype}; it "
                        f"supports {', '.join(units[name].dtypes)} (pass dtype=)"
                    )
                if used:
                    charges.append((name, cm, cv, ct, self.rates[name]))
            out.append(tuple(charges))
        self._charge_cache[key] = result = tuple(out)
        return result

    def _rate(self, unit: ComputeUnit) -> float:
        try:
            return unit.rate(self.dtype)
        except KeyError:
            return math.nan  # only an error if work lands on this unit

    def _unit(self, kind: str) -> ComputeUnit:
        try:
            return self.target.unit(kind)
        except KeyError:
            return None  # type: ignore[return-value]

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
        tiles = {}
        for r, s in sizes.items():
            if r in self.outer_ranks or r in self.iterative:
                tiles[r] = 1
            elif r in self.partitions:
                tiles[r] = s
            else:
                tiles[r] = min(view.tiles.get(r, s), s)
        return sizes, tiles

    # ------------------------------------------------------------------ evaluation
    def estimate(self, schedule: object | None = None) -> float:
        """Predicted seconds (``inf`` for a schedule whose tiles do not fit): the fast path.

        ``None`` prices the default tiles (``default_tiles``).
        """
        view = self.default_view() if schedule is None else ScheduleView.of(schedule)
        return self._evaluate(view, full=False).total_s

    def report(self, schedule: object | None = None) -> CostReport:
        """The full breakdown: per Einsum and kernel work, bytes, time and bound."""
        view = self.default_view() if schedule is None else ScheduleView.of(schedule)
        return self._evaluate(view, full=True)

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
            r = self._evaluate(ScheduleView(tiles=dict(tiles)), full=True)
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

    def _evaluate(self, view: ScheduleView, full: bool) -> CostReport:
        t = self.target
        for tensor, level in view.placement.items():
            if level not in self.level_index:
                raise CostModelError(
                    f"schedule places {tensor} in {level!r}; target {t.name!r} has levels "
                    f"{', '.join(self.level_index)}"
                )
        charges = self._charges(view.units)
        plan = Plan(self.ctx, *self._plan(view), view)
        rows: list[EinsumCost] = []
        kernels: list[KernelCost] = []
        total, reason = 0.0, ""
        for k in self.kernels:
            tr = kernel_traffic(k, plan, self.level_index)
            if not tr.fits:
                if not full:
                    return CostReport.rejected(t.name, self.dtype, tr.reason)
                reason = reason or tr.reason
            kc = self._kernel_cost(k, tr, plan, charges, rows if full else None)
            kernels.append(kc)
            total += kc.time_s
        if reason:
            return CostReport.rejected(t.name, self.dtype, reason)
        if not full:
            return CostReport(t.name, self.dtype, total)
        by_bound: dict[str, float] = {}
        for kc in kernels:
            by_bound[kc.bound] = by_bound.get(kc.bound, 0.0) + kc.time_s
        bound = max(by_bound, key=by_bound.__getitem__) if by_bound else "compute"
        levels = tuple(self.level_index)
        return CostReport(
            t.name, self.dtype, total, bound, True, "", tuple(rows), tuple(kernels), levels
        )

    def _kernel_cost(
        self,
        k: Kernel,
        tr: KernelTraffic,
        plan: Plan,
        charges: tuple[tuple[Charge, ...], ...],
        rows: list[EinsumCost] | None,
    ) -> KernelCost:
        """Combine a kernel's Einsums: serial on a CPU, pipelined across engines elsewhere."""
        cpu = self.target.device_kind == "cpu"
        view, sizes = plan.view, plan.sizes
        devices = view.device_ranks()
        levels = tuple(self.level_index)
        unit_sum: dict[str, float] = {}
        eng_sum = dict.fromkeys(self.engines, 0.0)
        lvl_sum = [0.0] * len(levels)
        serial = comm_sum = alpha_sum = 0.0
        n_ops = 0
        for i in k.einsums:
            e, w, sh = self.einsums[i], self.work[i], self.shapes[i]
            points = math.prod(sizes[r] for r in sh.ranks)
            vec, trans = w.counts(sizes)
            macs = points * w.macs
            if w.scale_ops:
                vec += w.scale_ops * min(plan.elements[a.tensor] for a in (sh.write, *sh.reads))
            unit_s: dict[str, float] = {}
            eng: dict[str, float] = {}
            for u, cm, cv, ct, rate in charges[i]:
                busy = (macs * cm + vec * cv + trans * ct) / rate
                if busy:
                    unit_s[u] = busy
                    engine = self.engine_of[u]
                    eng[engine] = eng.get(engine, 0.0) + busy
                    unit_sum[u] = unit_sum.get(u, 0.0) + busy
            level_s = [b / bw for b, bw in zip(tr.bytes[i], self.bandwidth)]
            moved_s = sum(b / bw for b, bw in zip(tr.moved[i], self.bandwidth))
            comm = self._all_reduce(e, plan, devices) if devices else 0.0
            if comm:
                alpha_sum += self._all_reduce(e, plan, devices, latency=True)
            compute = max(eng.values(), default=0.0)
            if cpu:  # boundary traffic adds; operand streaming hides under the compute
                stream = [
                    (b - m) / bw for b, m, bw in zip(tr.bytes[i], tr.moved[i], self.bandwidth)
                ]
                alone = max(compute, max(stream)) + moved_s
            else:
                alone = max(compute, max(level_s))
            for name, s in eng.items():
                eng_sum[name] += s
            for j, s in enumerate(level_s):
                lvl_sum[j] += s
            serial += alone
            comm_sum += comm
            n_ops += tr.steps[i] if (cpu or macs or vec or trans) else 0
            if rows is not None:
                bound = name_bound(unit_s, dict(zip(levels, level_s)), comm)
                rows.append(
                    EinsumCost(e.output, k.name, macs, vec, trans, tuple(unit_s.items()),
                               tuple(zip(levels, tr.bytes[i])), comm, alone + comm, bound)
                )  # fmt: skip
        steps = math.prod(trips for _, trips in tr.loops)
        oh = self.overheads
        overhead = oh.kernel_s + oh.loop_step_s * steps * (steps > 1)
        overhead += oh.op_s * (n_ops + tr.transfers)
        if cpu:
            body, fill = serial, 0.0
        else:
            busiest = max(eng_sum.values(), default=0.0)
            fill = (sum(eng_sum.values()) - busiest) / steps
            body = max(busiest, max(lvl_sum))
        time = body + fill + overhead
        if comm_sum and view.overlap_chunks > 1:
            time = overlapped_time(time, comm_sum, view.overlap_chunks, min(alpha_sum, comm_sum))
        else:
            time += comm_sum
        bound = ""
        if rows is not None:
            named = unit_sum if cpu else {name: s for name, s in eng_sum.items() if s > 0}
            bound = name_bound(named, dict(zip(levels, lvl_sum)), comm_sum, overhead)
        names = tuple(self.einsums[i].output for i in k.einsums)
        staging = self.target.memory[tr.staging].name
        return KernelCost(k.name, names, steps, tr.in_flight, time, fill, overhead, comm_sum,
                          bound, staging, tr.spilled, tuple(unit_sum.items()))  # fmt: skip

    def _all_reduce(
        self, e: Einsum, plan: Plan, devices: Mapping[str, int], latency: bool = False
    ) -> float:
        """Seconds of the all-reduce a sum over device ranks needs (0 when there is none)."""
        over = [r for r in e.reduced_ranks if r in devices]
        if not over:
            return 0.0
        if e.reduce != "sum":
            raise CostModelError(
                f"{e.output}: a {e.reduce} over device rank(s) {over} is not modeled"
            )
        ic = self.target.interconnect
        if ic is None:
            raise CostModelError(f"target {self.target.name!r} has no interconnect for {over}")
        n = math.prod(devices[r] for r in over)
        if latency:
            return collective_latency_s("all_reduce", n, ic)
        nbytes = plan.elements[e.output] * self.ctx.element_bytes
        return collective_time("all_reduce", nbytes, n, ic)


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
