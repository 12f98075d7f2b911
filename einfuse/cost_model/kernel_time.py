"""A kernel's time from its Einsums' work and traffic: serial on a CPU, pipelined elsewhere.

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
  then runs at memory speed. Fixed costs (``Overheads``: the while-loop and op dispatch of
  XLA:CPU, a small matrix multiply's cost per operand element, and the copy of each tile sliced
  out of or updated into a larger tensor) come on top.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from einfuse.cost_model.collectives import collective_latency_s, collective_time, overlapped_time
from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.kernels import Kernel
from einfuse.cost_model.report import EinsumCost, KernelCost, name_bound
from einfuse.cost_model.traffic import KernelTraffic, Plan
from einfuse.cost_model.units import Charge
from einfuse.ir.cascade import Einsum

if TYPE_CHECKING:
    from einfuse.cost_model.model import CostModel


def kernel_cost(
    model: CostModel,
    k: Kernel,
    tr: KernelTraffic,
    plan: Plan,
    charges: tuple[tuple[Charge, ...], ...],
    rows: list[EinsumCost] | None,
) -> KernelCost:
    """Combine a kernel's Einsums (see the module docstring); ``rows`` collects per-Einsum rows
    for a report, and None skips them (the fast path)."""
    cpu = model.target.device_kind == "cpu"
    view = plan.view
    devices = view.device_ranks()
    levels = tuple(model.level_index)
    bandwidth = model.bandwidth
    oh = model.overheads
    unit_sum: dict[str, float] = {}
    eng_sum = dict.fromkeys(model.engines, 0.0)
    lvl_sum = [0.0] * len(levels)
    serial = comm_sum = alpha_sum = 0.0
    n_ops = 0
    work_s = einsum_work_s(model, plan, charges)
    for i in k.einsums:
        e = model.einsums[i]
        macs, vec, trans, unit_s, eng = work_s(i)
        for u, busy in unit_s.items():
            unit_sum[u] = unit_sum.get(u, 0.0) + busy
        level_s = [b / bw for b, bw in zip(tr.bytes[i], bandwidth)]
        moved_s = sum(b / bw for b, bw in zip(tr.moved[i], bandwidth))
        comm = all_reduce_s(model, e, plan, devices) if devices else 0.0
        if comm:
            alpha_sum += all_reduce_s(model, e, plan, devices, latency=True)
        compute = max(eng.values(), default=0.0)
        if cpu:  # boundary traffic adds; operand streaming hides under the compute
            stream = [(b - m) / bw for b, m, bw in zip(tr.bytes[i], tr.moved[i], bandwidth)]
            alone = max(compute, max(stream)) + moved_s
            if macs:  # a dot's result and operand tiles, per step (``Overheads``)
                result, *operands = tr.tiles[i]
                per_step = oh.dot_result_element_s * result
                alone += tr.steps[i] * (per_step + oh.dot_operand_element_s * sum(operands))
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
    overhead = oh.kernel_s + oh.loop_step_s * steps * (steps > 1)
    overhead += oh.op_s * (n_ops + tr.transfers) + oh.slice_element_s * tr.sliced
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
    names = tuple(model.einsums[i].output for i in k.einsums)
    staging = model.target.memory[tr.staging].name
    return KernelCost(k.name, names, steps, tr.in_flight, time, fill, overhead, comm_sum,
                      bound, staging, tr.spilled, tuple(unit_sum.items()))  # fmt: skip


WorkSeconds = tuple[float, float, float, dict[str, float], dict[str, float]]


def einsum_work_s(
    model: CostModel, plan: Plan, charges: tuple[tuple[Charge, ...], ...]
) -> Callable[[int], WorkSeconds]:
    """Einsum index -> (MACs, vector ops, transcendentals, busy seconds per unit, per engine).

    They depend only on the rank sizes and the unit binding, so they are remembered per both
    in ``model.work_cache`` (a search over tiles of one pipeline reuses them throughout).
    """
    key = (plan.sizes_key, id(charges))
    cache = model.work_cache.get(key)
    if cache is None:
        if len(model.work_cache) >= 256:
            model.work_cache.clear()
        cache = model.work_cache[key] = {}
    sizes = plan.sizes

    def lookup(i: int) -> WorkSeconds:
        found = cache.get(i)
        if found is not None:
            return found
        w, sh = model.work[i], model.shapes[i]
        points = math.prod(sizes[r] for r in sh.ranks)
        vec, trans = w.counts(sizes)
        macs = points * w.macs
        if w.scale_ops:
            vec += w.scale_ops * min(plan.elements(a.tensor) for a in (sh.write, *sh.reads))
        unit_s: dict[str, float] = {}
        eng: dict[str, float] = {}
        for u, cm, cv, ct, rate in charges[i]:
            busy = (macs * cm + vec * cv + trans * ct) / rate
            if busy:
                unit_s[u] = busy
                engine = model.engine_of[u]
                eng[engine] = eng.get(engine, 0.0) + busy
        found = cache[i] = (macs, vec, trans, unit_s, eng)
        return found

    return lookup


def all_reduce_s(
    model: CostModel, e: Einsum, plan: Plan, devices: Mapping[str, int], latency: bool = False
) -> float:
    """Seconds of the all-reduce a sum over device ranks needs (0 when there is none)."""
    over = [r for r in e.reduced_ranks if r in devices]
    if not over:
        return 0.0
    if e.reduce != "sum":
        raise CostModelError(f"{e.output}: a {e.reduce} over device rank(s) {over} is not modeled")
    ic = model.target.interconnect
    if ic is None:
        raise CostModelError(f"target {model.target.name!r} has no interconnect for {over}")
    n = math.prod(devices[r] for r in over)
    if latency:
        return collective_latency_s("all_reduce", n, ic)
    nbytes = plan.elements(e.output) * plan.ctx.element_bytes
    return collective_time("all_reduce", nbytes, n, ic)
