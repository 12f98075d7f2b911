"""Hardware targets as data: compute units, a memory hierarchy and an interconnect.

The cost model never hard-codes a machine. A `Target` says how fast each kind of unit computes
(per dtype), how big and how fast each memory level is, and how devices talk to each other. The
built-in targets live in `targets/*.toml`, one file per machine, each figure commented with its
source; `get_target` loads them (and calibrates the host CPU on first use).

Units of measure, used everywhere in the cost model:

* compute rates are *ops per second*, where one op is one MAC on a matrix unit, one element-wise
  lane operation on a vector unit (a fused multiply-add counts once) and one result on a
  transcendental unit. Datasheet FLOP/s count a MAC as two FLOPs, so they are halved on load;
* capacities are bytes per instance (one SM's shared memory, one core's L1), `math.inf` for a
  level the model does not bound; bandwidths are bytes per second summed over all instances.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from einfuse.cost_model.overheads import Overheads
from einfuse.cost_model.precision import DotRoute, parse_routes, route_problem
from einfuse.errors import EinfuseError

UnitKind = Literal["matrix", "vector", "transcendental"]
Topology = Literal["switch", "ring", "torus_2d", "shared_memory"]
RateTable = tuple[tuple[str, float], ...]

# Short spellings people write for dtypes, mapped to the NumPy/JAX names the tables use.
_DTYPE_ALIASES = {
    "f64": "float64",
    "fp64": "float64",
    "f32": "float32",
    "fp32": "float32",
    "tf32": "tensorfloat32",
    "bf16": "bfloat16",
    "f16": "float16",
    "fp16": "float16",
    "fp8": "float8_e4m3fn",
    "i8": "int8",
}


class UnknownTargetError(EinfuseError, ValueError):
    """Raised for a target name that is neither built in nor a readable file."""


class TargetSpecError(EinfuseError, ValueError):
    """Raised when a target description is inconsistent or a target file is malformed."""


def canonical_dtype(dtype: object) -> str:
    """The table name of `dtype`: a string ("bf16", "float32") or a NumPy/JAX dtype or type."""
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(getattr(dtype, "name", None), str):
        name = dtype.name  # type: ignore[attr-defined]
    elif isinstance(getattr(getattr(dtype, "dtype", None), "name", None), str):
        name = dtype.dtype.name  # type: ignore[attr-defined]
    else:
        import numpy as np  # scalar types such as np.float32

        try:
            name = np.dtype(dtype).name  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(f"cannot read a dtype name from {dtype!r}") from None
    name = name.lower()
    return _DTYPE_ALIASES.get(name, name)


def _rate_table(rates: Mapping[str, float] | RateTable) -> RateTable:
    items = rates.items() if isinstance(rates, Mapping) else rates
    return tuple(sorted((canonical_dtype(k), float(v)) for k, v in items))


@dataclass(frozen=True, slots=True)
class ComputeUnit:
    """One kind of functional unit, with its whole-device rate per dtype.

    `emulated_on` names the unit that actually runs these ops (an exp computed as a polynomial
    on the vector unit or on a PE array); its rate is then that unit's rate divided by the
    target's `exp_cost_in_macs`, which `Target` checks.
    """

    name: str
    kind: UnitKind
    ops_per_s: RateTable  # a Mapping is accepted and normalised to sorted (dtype, rate) pairs
    clock_hz: float | None = None
    lanes: int | None = None
    emulated_on: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops_per_s", _rate_table(self.ops_per_s))
        if self.kind not in get_args(UnitKind):
            raise TargetSpecError(
                f"unit {self.name!r}: kind {self.kind!r} is not one of {get_args(UnitKind)}"
            )
        if not self.ops_per_s:
            raise TargetSpecError(f"unit {self.name!r} lists no dtype rates")
        for dtype, rate in self.ops_per_s:
            if not (rate > 0 and math.isfinite(rate)):
                raise TargetSpecError(f"unit {self.name!r}: rate for {dtype} is {rate}")

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(dtype for dtype, _ in self.ops_per_s)

    def rate(self, dtype: object) -> float:
        """Ops per second for `dtype`; raises naming the dtypes this unit does support."""
        wanted = canonical_dtype(dtype)
        for name, rate in self.ops_per_s:
            if name == wanted:
                return rate
        raise KeyError(
            f"unit {self.name!r} ({self.kind}) has no rate for {wanted}; "
            f"it supports: {', '.join(self.dtypes)}"
        )


@dataclass(frozen=True, slots=True)
class MemoryLevel:
    """One level of the memory hierarchy; `managed` levels are software-placed scratchpads.

    ``per_kernel_bytes`` is what one kernel program (a GPU thread block, a TPU kernel) may
    hold at this level, where the compiler enforces less than the hardware has: 227 KiB of
    an H100 SM's 228 KiB of shared memory, the 16 MiB scoped VMEM of a v5e's 128 MiB. A
    kernel that needs more fails to compile (see ``kernel_footprint``).
    """

    name: str
    capacity_bytes: float  # per instance; math.inf where the model does not bound it
    bandwidth_bytes_per_s: float  # summed over all instances
    instances: int = 1
    managed: bool = False
    per_kernel_bytes: float | None = None  # None: the whole capacity

    def __post_init__(self) -> None:
        if not self.capacity_bytes > 0:
            raise TargetSpecError(f"memory {self.name!r}: capacity {self.capacity_bytes}")
        if not self.bandwidth_bytes_per_s > 0:
            raise TargetSpecError(f"memory {self.name!r}: bandwidth {self.bandwidth_bytes_per_s}")
        if self.instances < 1:
            raise TargetSpecError(f"memory {self.name!r}: {self.instances} instances")
        if self.per_kernel_bytes is not None and not (
            0 < self.per_kernel_bytes <= self.capacity_bytes
        ):
            raise TargetSpecError(
                f"memory {self.name!r}: per_kernel_bytes {self.per_kernel_bytes} is not in "
                f"(0, capacity_bytes = {self.capacity_bytes}]"
            )

    @property
    def kernel_capacity_bytes(self) -> float:
        """What one kernel program may hold here."""
        return self.capacity_bytes if self.per_kernel_bytes is None else self.per_kernel_bytes

    @property
    def total_capacity_bytes(self) -> float:
        return self.capacity_bytes * self.instances


@dataclass(frozen=True, slots=True)
class Interconnect:
    """Device-to-device links for the alpha-beta model.

    `bandwidth_bytes_per_s` is what one device pushes into one ring step (per direction on a
    switch; both directions of a torus axis for a bidirectional ring); `latency_s` is the fixed
    cost (alpha) of one step. What overlap needs beyond alpha-beta (``overlap``):
    `bus_efficiency`, the fraction of the line rate a ring collective reaches (NCCL's protocol
    overhead); `collective_cores`, the compute cores (SMs) a collective's kernel holds while it
    runs, taken from the compute it overlaps; `max_devices`, how many devices the links join
    at this bandwidth (0: unbounded); `asynchronous`, whether a collective can run while
    compute does (not on XLA:CPU).
    """

    latency_s: float
    bandwidth_bytes_per_s: float
    topology: Topology
    bus_efficiency: float = 1.0
    collective_cores: int = 0
    max_devices: int = 0
    asynchronous: bool = True

    def __post_init__(self) -> None:
        if self.topology not in get_args(Topology):
            raise TargetSpecError(
                f"interconnect topology {self.topology!r} is not one of {get_args(Topology)}"
            )
        if not (self.latency_s >= 0 and self.bandwidth_bytes_per_s > 0):
            raise TargetSpecError(
                f"interconnect needs latency >= 0 and bandwidth > 0, got "
                f"{self.latency_s} s and {self.bandwidth_bytes_per_s} B/s"
            )
        if not 0 < self.bus_efficiency <= 1:
            raise TargetSpecError(
                f"interconnect bus_efficiency {self.bus_efficiency} is not in (0, 1]"
            )
        if self.collective_cores < 0 or self.max_devices < 0:
            raise TargetSpecError(
                f"interconnect needs collective_cores >= 0 and max_devices >= 0, got "
                f"{self.collective_cores} and {self.max_devices}"
            )


@dataclass(frozen=True, slots=True)
class Target:
    """A whole machine. `memory` runs from the largest, slowest level to the smallest."""

    name: str
    device_kind: str
    units: tuple[ComputeUnit, ...]
    memory: tuple[MemoryLevel, ...]
    interconnect: Interconnect | None
    word_bytes: int
    exp_cost_in_macs: float | None = None
    notes: str = field(default="", compare=False)
    overheads: Overheads | None = None  # None: ``Overheads.default_for(device_kind)``
    float32_dots: tuple[DotRoute, ...] = ()  # how XLA runs f32 dots per precision (``precision``)

    def __post_init__(self) -> None:
        _check_target(self)

    def units_of(self, kind: UnitKind) -> tuple[ComputeUnit, ...]:
        return tuple(unit for unit in self.units if unit.kind == kind)

    def unit(self, kind_or_name: str) -> ComputeUnit:
        """The unit with this name, else the first unit of this kind."""
        for unit in self.units:
            if unit.name == kind_or_name:
                return unit
        for unit in self.units:
            if unit.kind == kind_or_name:
                return unit
        raise KeyError(
            f"target {self.name!r} has no unit named or of kind {kind_or_name!r}; "
            f"units: {', '.join(f'{u.name} ({u.kind})' for u in self.units)}"
        )

    def level(self, name: str) -> MemoryLevel:
        for level in self.memory:
            if level.name == name:
                return level
        raise KeyError(
            f"target {self.name!r} has no memory level {name!r}; "
            f"levels: {', '.join(level.name for level in self.memory)}"
        )

    @property
    def main_memory(self) -> MemoryLevel:
        """The largest, slowest level: DRAM or HBM."""
        return self.memory[0]


def _check_target(target: Target) -> None:
    where = f"target {target.name!r}"
    if not target.units or not target.memory:
        raise TargetSpecError(f"{where} needs at least one compute unit and one memory level")
    for what, names in (
        ("unit", [u.name for u in target.units]),
        ("memory level", [m.name for m in target.memory]),
    ):
        if len(set(names)) != len(names):
            raise TargetSpecError(f"{where} repeats a {what} name: {names}")
    for upper, lower in zip(target.memory, target.memory[1:]):
        if not lower.capacity_bytes < upper.capacity_bytes:
            raise TargetSpecError(
                f"{where}: memory must run from largest to smallest, but {lower.name!r} "
                f"({lower.capacity_bytes} B) follows {upper.name!r} ({upper.capacity_bytes} B)"
            )
    if target.word_bytes < 1:
        raise TargetSpecError(f"{where}: word_bytes is {target.word_bytes}")
    if target.exp_cost_in_macs is not None and not target.exp_cost_in_macs > 0:
        raise TargetSpecError(f"{where}: exp_cost_in_macs is {target.exp_cost_in_macs}")
    by_name = {unit.name: unit for unit in target.units}
    wrong = route_problem(target.float32_dots, {u.name: u.dtypes for u in target.units})
    if wrong:
        raise TargetSpecError(f"{where}: {wrong}")
    for unit in target.units:
        if unit.emulated_on is None:
            continue
        base = by_name.get(unit.emulated_on)
        if base is None or base is unit or target.exp_cost_in_macs is None:
            raise TargetSpecError(
                f"{where}: unit {unit.name!r} is emulated on {unit.emulated_on!r}, which needs "
                f"that unit to exist and exp_cost_in_macs to be set"
            )
        for dtype, rate in unit.ops_per_s:
            expected = base.rate(dtype) / target.exp_cost_in_macs
            if not math.isclose(rate, expected, rel_tol=1e-9):
                raise TargetSpecError(
                    f"{where}: unit {unit.name!r} claims {rate:.4g} ops/s for {dtype} but "
                    f"{base.name!r} / exp_cost_in_macs gives {expected:.4g}"
                )


# ---------------------------------------------------------------------------------------------
# Loading targets from TOML.

_TARGET_KEYS = {"name", "device_kind", "word_bytes", "exp_cost_in_macs", "notes"}
_TABLE_KEYS = {"units", "memory", "interconnect", "float32_dots"}
_UNIT_KEYS = {"name", "kind", "clock_hz", "lanes", "ops_per_s", "flops_per_s", "dtypes"}
_UNIT_KEYS |= {"ops_per_lane_per_cycle", "emulated_on"}
_MEMORY_KEYS = {"name", "capacity_bytes", "bandwidth_bytes_per_s", "instances", "managed"}
_MEMORY_KEYS |= {"per_kernel_bytes"}
_INTERCONNECT_KEYS = {"latency_s", "bandwidth_bytes_per_s", "topology"}
_INTERCONNECT_KEYS |= {"bus_efficiency", "collective_cores", "max_devices", "asynchronous"}


def _reject_unknown_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TargetSpecError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _unit_rates(spec: Mapping[str, Any], where: str) -> dict[str, float] | None:
    """Rates from exactly one of: ops_per_s, flops_per_s (halved), or lanes x clock x dtypes."""
    given = [key for key in ("ops_per_s", "flops_per_s", "lanes") if key in spec]
    if "emulated_on" in spec:
        if given:
            raise TargetSpecError(f"{where}: an emulated unit takes its rate from its base unit")
        return None
    if len(given) != 1:
        raise TargetSpecError(f"{where}: give exactly one of ops_per_s, flops_per_s, lanes")
    if "ops_per_s" in spec:
        return dict(spec["ops_per_s"])
    if "flops_per_s" in spec:
        return {dtype: flops / 2 for dtype, flops in spec["flops_per_s"].items()}
    if "clock_hz" not in spec or "dtypes" not in spec:
        raise TargetSpecError(f"{where}: a unit given by lanes also needs clock_hz and dtypes")
    per_lane = float(spec.get("ops_per_lane_per_cycle", 1))
    return {dtype: spec["lanes"] * spec["clock_hz"] * per_lane for dtype in spec["dtypes"]}


def parse_target(data: Mapping[str, Any], source: str = "<dict>") -> Target:
    """Build a `Target` from the TOML layout documented in `targets/README` (see any file)."""
    _reject_unknown_keys(data, _TARGET_KEYS | _TABLE_KEYS, source)
    exp_cost = data.get("exp_cost_in_macs")
    units: list[ComputeUnit] = []
    pending: list[tuple[dict[str, Any], str]] = []
    for index, spec in enumerate(data.get("units", [])):
        where = f"{source}: units[{index}] ({spec.get('name', '?')})"
        _reject_unknown_keys(spec, _UNIT_KEYS, where)
        rates = _unit_rates(spec, where)
        if rates is None:
            pending.append((spec, where))
            continue
        units.append(_make_unit(spec, rates, where))
    for spec, where in pending:  # emulated units: rate = base rate / exp_cost_in_macs
        base = next((u for u in units if u.name == spec["emulated_on"]), None)
        if base is None or exp_cost is None:
            raise TargetSpecError(
                f"{where}: emulated_on={spec['emulated_on']!r} needs that (non-emulated) unit "
                f"and a target-level exp_cost_in_macs"
            )
        rates = {dtype: rate / exp_cost for dtype, rate in base.ops_per_s}
        units.append(_make_unit(spec, rates, where))
    memory = []
    for index, spec in enumerate(data.get("memory", [])):
        _reject_unknown_keys(spec, _MEMORY_KEYS, f"{source}: memory[{index}]")
        memory.append(MemoryLevel(**spec))
    interconnect = None
    if "interconnect" in data:
        _reject_unknown_keys(data["interconnect"], _INTERCONNECT_KEYS, f"{source}: interconnect")
        interconnect = Interconnect(**data["interconnect"])
    try:
        routes = parse_routes(data.get("float32_dots", {}), source)
    except ValueError as error:
        raise TargetSpecError(str(error)) from None
    try:
        return Target(
            name=data["name"],
            device_kind=data["device_kind"],
            units=tuple(units),
            memory=tuple(memory),
            interconnect=interconnect,
            word_bytes=data["word_bytes"],
            exp_cost_in_macs=exp_cost,
            notes=data.get("notes", ""),
            float32_dots=routes,
        )
    except KeyError as missing:
        raise TargetSpecError(f"{source}: missing required key {missing}") from None
    except TargetSpecError as error:
        raise TargetSpecError(f"{source}: {error}") from None


def _make_unit(spec: Mapping[str, Any], rates: dict[str, float], where: str) -> ComputeUnit:
    try:
        return ComputeUnit(
            name=spec["name"],
            kind=spec["kind"],
            ops_per_s=_rate_table(rates),
            clock_hz=spec.get("clock_hz"),
            lanes=spec.get("lanes"),
            emulated_on=spec.get("emulated_on"),
        )
    except KeyError as missing:
        raise TargetSpecError(f"{where}: missing required key {missing}") from None


def load_target(path: str | Path) -> Target:
    """Load a target from a TOML file (the built-in ones, or a user's own machine)."""
    path = Path(path)
    with path.open("rb") as handle:
        try:
            data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise TargetSpecError(f"{path}: not valid TOML: {error}") from None
    return parse_target(data, source=str(path))


def _builtin_dir() -> Any:
    return resources.files("einfuse.cost_model").joinpath("targets")


def known_targets() -> tuple[str, ...]:
    """Names of the built-in targets, sorted."""
    return tuple(
        sorted(
            entry.name.removesuffix(".toml")
            for entry in _builtin_dir().iterdir()
            if entry.name.endswith(".toml")
        )
    )


@cache
def _builtin_target(name: str) -> Target:
    entry = _builtin_dir().joinpath(f"{name}.toml")
    data = tomllib.loads(entry.read_text(encoding="utf-8"))
    return parse_target(data, source=f"einfuse/cost_model/targets/{name}.toml")


def get_target(name: str, *, calibrate: bool = True, cache_dir: str | Path | None = None) -> Target:
    """A built-in target by name (``einfuse.targets``; ``gpu``/``tpu``: the device here).

    `"cpu"` is the host: measured once and cached per machine (see `calibrate.calibrate_host`,
    which `cache_dir` is passed to) unless `calibrate=False`, which gives the nominal figures
    from `targets/cpu.toml` without running anything.
    """
    from einfuse.targets import ALIASES, resolve_target

    if name in ALIASES:  # gpu, tpu: the device JAX runs on here
        name = resolve_target(name)
    known = known_targets()
    if name not in known:
        raise UnknownTargetError(
            f"unknown target {name!r}; known targets: {', '.join((*known, *ALIASES))}"
        )
    if name == "cpu" and calibrate:
        from einfuse.cost_model.calibrate import calibrate_host  # jax is heavy: import lazily

        return calibrate_host(cache_dir=cache_dir)
    return _builtin_target(name)
