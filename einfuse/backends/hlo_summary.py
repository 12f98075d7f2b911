"""What an optimized HLO module does, in counts, plus XLA's own cost and memory figures.

A frozen value with a JSON form (`as_dict`) and a readable table (`table`), so a summary can be
printed by the CLI, compared in tests and stored next to tuning results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CollectiveCount:
    """How often one collective kind occurs: blocking, and as async start/done halves;
    ``bytes`` summed over them (per device, see ``CollectiveOp``); ``marked_sync``: async
    pairs that XLA marked to run blocking (``"is_sync":true``, nothing to overlap)."""

    sync: int = 0
    async_start: int = 0
    async_done: int = 0
    bytes: int = 0
    marked_sync: int = 0

    @property
    def total(self) -> int:
        """Collectives issued: each async pair counts once, by its start."""
        return self.sync + self.async_start

    @property
    def asynchronous(self) -> int:
        """Collectives that can run while compute does on this target."""
        return self.async_start - self.marked_sync


@dataclass(frozen=True, slots=True)
class CollectiveOp:
    """One issued collective: its kind, the instruction that starts it, the larger of its
    operand and result bytes per device, whether it runs asynchronously, and the collectives
    (by name) whose results it depends on through data in its computation: an overlap pass
    promises that one half's (or chunk's) collectives do not depend on the other's."""

    kind: str
    name: str
    bytes: int
    asynchronous: bool
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class XlaCost:
    """XLA's `cost_analysis()` figures for the whole executable (summed over its modules)."""

    flops: float | None
    transcendentals: float | None
    bytes_accessed: float | None


@dataclass(frozen=True, slots=True)
class XlaMemory:
    """XLA's `memory_analysis()` figures, in bytes; None where this jax/backend omits one."""

    argument_bytes: int | None
    output_bytes: int | None
    alias_bytes: int | None
    temp_bytes: int | None
    generated_code_bytes: int | None
    peak_bytes: int | None


@dataclass(frozen=True, slots=True)
class HloSummary:
    """What an optimized HLO module does, in counts; `cost`/`memory` need a Compiled.

    `op_counts` counts instructions by opcode in every computation that does work (entry,
    fused bodies, loop bodies), leaving out parameters and scalar combiners (`to_apply=`).
    """

    module_names: tuple[str, ...]
    op_counts: Mapping[str, int]
    fusion_kinds: Mapping[str, int]
    custom_call_targets: Mapping[str, int]
    collectives: Mapping[str, CollectiveCount]
    cost: XlaCost | None = None
    memory: XlaMemory | None = None
    collective_ops: tuple[CollectiveOp, ...] = ()
    # Per matmul (a dot, or a fusion that computes one): the collectives it waits on through
    # data. T3's promise: no chunk's matmul waits on a ring step's collective-permute.
    matmul_deps: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def num_fusions(self) -> int:
        return sum(self.fusion_kinds.values())

    @property
    def num_collectives(self) -> int:
        return sum(count.total for count in self.collectives.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (dicts, lists, numbers, strings, None)."""
        return {
            "module_names": list(self.module_names),
            "op_counts": dict(self.op_counts),
            "num_fusions": self.num_fusions,
            "fusion_kinds": dict(self.fusion_kinds),
            "custom_call_targets": dict(self.custom_call_targets),
            "collectives": {kind: asdict(c) for kind, c in self.collectives.items()},
            "collective_ops": [asdict(op) for op in self.collective_ops],
            "matmul_deps": [[name, list(deps)] for name, deps in self.matmul_deps],
            "cost": None if self.cost is None else asdict(self.cost),
            "memory": None if self.memory is None else asdict(self.memory),
        }

    def table(self) -> str:
        """A readable, aligned two-column text table of the summary."""
        rows: list[tuple[str, str]] = [("module", ", ".join(self.module_names) or "?")]
        rows.append(("fusions", str(self.num_fusions)))
        rows += [(f"  {kind}", str(n)) for kind, n in self.fusion_kinds.items()]
        asynchronous = sum(c.asynchronous for c in self.collectives.values())
        rows.append(("collectives", f"{self.num_collectives} ({asynchronous} asynchronous)"))
        for kind, c in self.collectives.items():
            how = f"{c.total} x, {_size(c.bytes)}: {c.sync} sync, "
            how += f"{c.async_start}/{c.async_done} start/done"
            how += f" ({c.marked_sync} marked sync)" if c.marked_sync else ""
            rows.append((f"  {kind}", how))
        if self.custom_call_targets:
            rows.append(("custom calls", str(sum(self.custom_call_targets.values()))))
            rows += [(f"  {target}", str(n)) for target, n in self.custom_call_targets.items()]
        rows.append(("ops", str(sum(self.op_counts.values()))))
        rows += [(f"  {op}", str(n)) for op, n in self.op_counts.items()]
        rows.append(("xla cost analysis", "" if self.cost else "unavailable"))
        if self.cost:
            rows.append(("  flops", _number(self.cost.flops)))
            rows.append(("  transcendentals", _number(self.cost.transcendentals)))
            rows.append(("  bytes accessed", _number(self.cost.bytes_accessed)))
        rows.append(("xla memory analysis", "" if self.memory else "unavailable"))
        if self.memory:
            for name, value in asdict(self.memory).items():
                label = name.removesuffix("_bytes").replace("_", " ")
                rows.append((f"  {label}", "-" if value is None else f"{value:,} B"))
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in rows)


def _size(n_bytes: int) -> str:
    """Bytes in binary units: `512 B`, `64.0 KiB`, `1.5 MiB`."""
    value, unit = float(n_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"
