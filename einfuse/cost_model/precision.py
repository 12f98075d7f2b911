"""How XLA runs a float32 dot, per ``jax_default_matmul_precision``: a target's dot routes.

A matrix unit often has no float32 rate: H100 tensor cores take TF32, bf16 and narrower;
TPU MXUs take bf16. XLA still runs float32 dots there, as JAX's default precision says:
on an NVIDIA GPU, ``default`` and ``high`` run TF32 on the tensor cores and ``highest``
(``float32``) runs FP32 on the CUDA cores; on a TPU, 1, 3 or 6 bf16 MXU passes. A target
describes this as data (``[float32_dots]`` in its TOML), and the cost model prices float32
contractions by it: the float32 carry of a bfloat16 blockwise loop (its ``P V``) included.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# jax_default_matmul_precision's spellings, grouped into the three levels targets describe.
_LEVELS = {
    "default": ("default", "fastest", "bfloat16", "bf16_bf16_f32"),
    "high": ("high", "tensorfloat32", "bf16_bf16_f32_x3", "tf32_tf32_f32"),
    "highest": ("highest", "float32", "f32_f32_f32", "bf16_bf16_f32_x6", "tf32_tf32_f32_x3"),
}
LEVELS = tuple(_LEVELS)


@dataclass(frozen=True, slots=True)
class DotRoute:
    """A float32 dot at one precision level: on ``unit`` at its ``dtype`` rate, ``passes``
    times over (a TPU's 3- and 6-pass bf16 emulation)."""

    level: str
    unit: str
    dtype: str
    passes: int = 1


def precision_level(value: str | None) -> str:
    """``default``, ``high`` or ``highest`` for a ``jax_default_matmul_precision`` value
    (None and names this model does not know mean ``default``)."""
    name = (value or "default").lower()
    return next((level for level, names in _LEVELS.items() if name in names), "default")


def current_precision() -> str:
    """The level JAX's matmul precision is at now: its config (contexts included) when jax is
    imported, else ``JAX_DEFAULT_MATMUL_PRECISION``; the cost model does not import jax."""
    jax = sys.modules.get("jax")
    value = jax.config.jax_default_matmul_precision if jax is not None else None
    return precision_level(value or os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"))


def parse_routes(table: Mapping[str, Any], where: str) -> tuple[DotRoute, ...]:
    """``[float32_dots]`` of a target TOML -> routes; a ValueError names what is wrong."""
    routes = []
    for level, spec in table.items():
        if level not in _LEVELS:
            raise ValueError(f"{where}: float32_dots.{level}: levels are {', '.join(LEVELS)}")
        unknown = sorted(set(spec) - {"unit", "dtype", "passes"})
        if unknown or "unit" not in spec or "dtype" not in spec:
            raise ValueError(f"{where}: float32_dots.{level} takes unit, dtype and passes")
        routes.append(DotRoute(level, spec["unit"], spec["dtype"], int(spec.get("passes", 1))))
    return tuple(routes)


def route_problem(routes: tuple[DotRoute, ...], unit_dtypes: Mapping[str, tuple[str, ...]]) -> str:
    """What is wrong with ``routes`` on units with these dtypes ("" when nothing is)."""
    for route in routes:
        if route.dtype not in unit_dtypes.get(route.unit, ()) or route.passes < 1:
            return (
                f"float32_dots.{route.level} needs a unit with a {route.dtype} rate and "
                f"passes >= 1, got unit {route.unit!r}, passes {route.passes}"
            )
    return ""


def route_for(routes: tuple[DotRoute, ...], level: str) -> DotRoute | None:
    """The route of ``level``, else of the nearest lower level described (high -> default)."""
    by_level = {r.level: r for r in routes}
    for candidate in LEVELS[: LEVELS.index(level) + 1][::-1]:
        if candidate in by_level:
            return by_level[candidate]
    return None


def dot_rate(target: Any, level: str) -> tuple[str, float] | None:
    """``(unit name, MACs per second)`` of a float32 dot on ``target`` at ``level``, or None
    where the target describes no route (its matrix unit's own float32 rate applies)."""
    route = route_for(target.float32_dots, level)
    if route is None:
        return None
    rate = target.unit(route.unit).rate(route.dtype) / route.passes
    assert math.isfinite(rate)
    return route.unit, rate
