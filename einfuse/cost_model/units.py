"""Which compute unit runs which work, and at what rate: an Einsum's *charges*.

By default a contraction's MACs go to the matrix unit, other operators to the vector unit and
transcendentals to the transcendental unit (or, where it is missing, to the vector unit at
``exp_cost_in_macs`` ops each). A float32 contraction runs where the target's float32 dot
route for JAX's matmul precision says (``precision``: TF32 tensor cores on a GPU by default).
A schedule option ``unit.<Einsum>=<unit>`` runs all of an Einsum's work on that unit, a
transcendental costing ``exp_cost_in_macs`` ops on a non-SFU unit.
A charge ``(unit, per MAC, per vector op, per transcendental, rate)`` turns counts into busy
seconds with a few multiplications, which keeps the model's fast path fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.precision import current_precision, dot_rate
from einfuse.cost_model.target import ComputeUnit, Target
from einfuse.cost_model.work import Work
from einfuse.ir.cascade import Einsum
from einfuse.ir.dtypes import FLOAT_DTYPES, ITEMSIZE

Charge = tuple[str, float, float, float, float]  # (unit, per MAC, per vector, per transc., rate)

# The float dtypes' sizes, and TF32's (a float32 dot's compute type on NVIDIA tensor cores).
ELEMENT_BYTES = {d: ITEMSIZE[d] for d in FLOAT_DTYPES} | {"tensorfloat32": 4}
ELEMENT_BYTES |= {"float8_e4m3fn": 1, "int8": 1}


def default_dtype(target: Target) -> str:
    """float32 where every unit runs it, else the first 16-bit type they all run."""
    for dtype in ("float32", "bfloat16", "float16"):
        if all(dtype in u.dtypes for u in target.units):
            return dtype
    raise CostModelError(f"target {target.name!r}: no dtype that all units support; pass dtype=")


def unit_rates(target: Target, dtype: str) -> dict[str, float]:
    """Ops per second of each unit for ``dtype``; NaN where the unit lacks it (an error only if
    work lands there)."""
    rates = {}
    for u in target.units:
        try:
            rates[u.name] = u.rate(dtype)
        except KeyError:
            rates[u.name] = math.nan
    return rates


def _unit(target: Target, kind: str) -> ComputeUnit | None:
    try:
        return target.unit(kind)
    except KeyError:
        return None


def einsum_charges(
    target: Target,
    dtypes: Sequence[str],
    einsums: Sequence[Einsum],
    work: Sequence[Work],
    binding: Mapping[str, str],
    precision: str | None = None,
) -> tuple[tuple[Charge, ...], ...]:
    """Per Einsum, the units its work runs on under ``binding`` (Einsum output -> unit name),
    at the rates of the Einsum's dtype (``dtypes``, one per Einsum); float32 MACs of an
    unbound Einsum at the target's float32 dot route for ``precision`` (default: JAX's now)."""
    units = {u.name: u for u in target.units}
    for name, unit in binding.items():
        if unit not in units:
            raise CostModelError(
                f"schedule binds {name} to unit {unit!r}; target {target.name!r} has units "
                f"{', '.join(units)}"
            )
    exp_cost = target.exp_cost_in_macs
    by_dtype = {dtype: unit_rates(target, dtype) for dtype in set(dtypes)}
    route = dot_rate(target, precision or current_precision()) if "float32" in dtypes else None
    out = []
    for e, w, dtype in zip(einsums, work, dtypes, strict=True):
        rates = by_dtype[dtype]
        coef: dict[str, list[float]] = {}
        mac_rates: dict[str, float] = {}  # a unit whose MACs run at another rate than its dtype's
        bound = binding.get(e.output)
        has_trans = any(tr for _, _, tr in w.terms)
        if bound is not None:
            unit = units[bound]
            if has_trans and unit.kind != "transcendental" and exp_cost is None:
                raise CostModelError(
                    f"{e.output} is bound to {unit.name}, which cannot evaluate "
                    f"transcendentals: target {target.name!r} gives no exp_cost_in_macs"
                )
            k = 1.0 if unit.kind == "transcendental" else (exp_cost or 1.0)
            coef[unit.name] = [1.0, 1.0, k]
        else:
            matrix = _unit(target, "matrix") or _unit(target, "vector")
            vector = _unit(target, "vector") or _unit(target, "matrix")
            assert matrix is not None and vector is not None  # a target has at least one unit
            sfu = _unit(target, "transcendental")
            mac_unit = matrix.name
            if route is not None and dtype == "float32":
                mac_unit, mac_rates[mac_unit] = route[0], route[1]
            coef.setdefault(mac_unit, [0.0, 0.0, 0.0])[0] += 1.0
            coef.setdefault(vector.name, [0.0, 0.0, 0.0])[1] += 1.0
            if sfu is not None:
                coef.setdefault(sfu.name, [0.0, 0.0, 0.0])[2] += 1.0
            else:
                coef[vector.name][2] += exp_cost or 1.0
        needs = (bool(w.macs), bool(w.terms) or bool(w.scale_ops), has_trans)
        charges = []
        for name, (cm, cv, ct) in coef.items():
            rate = rates[name]
            mac_rate = mac_rates.get(name, rate)
            macs, other = bool(cm and needs[0]), bool((cv and needs[1]) or (ct and needs[2]))
            if (macs and math.isnan(mac_rate)) or (other and math.isnan(rate)):
                raise CostModelError(
                    f"target {target.name!r}: unit {name} has no rate for {dtype}"
                    f"{' and no float32_dots route' if dtype == 'float32' and macs else ''}; it "
                    f"supports {', '.join(units[name].dtypes)} (pass dtype=)"
                )
            if macs or other:
                rate = mac_rate if math.isnan(rate) else rate
                charges.append((name, cm * rate / mac_rate if macs else cm, cv, ct, rate))
        out.append(tuple(charges))
    return tuple(out)
