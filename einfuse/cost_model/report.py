"""What a schedule costs and why: per Einsum and per kernel rows, the bound, text renderings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


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
