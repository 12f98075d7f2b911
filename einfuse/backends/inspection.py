"""Look inside what XLA made of a function: StableHLO, optimized HLO and a summary of it.

Seeing the optimized HLO is harder than it should be (jax#22270, jax#21990), so this module makes
it one call: `hlo_text` for the text of either stage, `inspect_hlo` for a summary (op counts,
fusions, collectives with their async start/done pairs, and XLA's own cost and memory analyses),
and `xla_dump_flags` for XLA's full pass-by-pass dump.

The summary is read from the optimized HLO *text*, not from XLA's C++ objects, because the text
is the one interface that stays stable across jax versions and that users can paste in.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

import jax

Stage = Literal["stablehlo", "optimized"]
STAGES: tuple[Stage, ...] = ("stablehlo", "optimized")

# The collectives we report, by their HLO opcode. Async forms are `<kind>-start`/`-done`
# (and `-update`), or a generic `async-start` whose called computation holds the collective.
COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-reduce",
    "reduce-scatter",
    "all-gather",
    "all-to-all",
    "collective-permute",
    "ragged-all-to-all",
    "collective-broadcast",
)


@dataclass(frozen=True, slots=True)
class CollectiveCount:
    """How often one collective kind occurs: blocking, and as async start/done halves."""

    sync: int = 0
    async_start: int = 0
    async_done: int = 0

    @property
    def total(self) -> int:
        """Collectives issued: each async pair counts once, by its start."""
        return self.sync + self.async_start


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
            "cost": None if self.cost is None else asdict(self.cost),
            "memory": None if self.memory is None else asdict(self.memory),
        }

    def table(self) -> str:
        """A readable, aligned two-column text table of the summary."""
        rows: list[tuple[str, str]] = [("module", ", ".join(self.module_names) or "?")]
        rows.append(("fusions", str(self.num_fusions)))
        rows += [(f"  {kind}", str(n)) for kind, n in self.fusion_kinds.items()]
        rows.append(("collectives", str(self.num_collectives)))
        for kind, c in self.collectives.items():
            rows.append((f"  {kind}", f"{c.sync} sync, {c.async_start}/{c.async_done} start/done"))
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


def hlo_text(obj: jax.stages.Lowered | jax.stages.Compiled, stage: Stage = "optimized") -> str:
    """The StableHLO of a Lowered (`.as_text()`) or the optimized HLO (`.compile().as_text()`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown HLO stage {stage!r}; expected one of {', '.join(STAGES)}")
    if stage == "stablehlo":
        if not isinstance(obj, jax.stages.Lowered):
            raise TypeError(
                f"StableHLO needs a jax.stages.Lowered (from jit(f).lower(...)), "
                f"got {type(obj).__name__}; a Compiled has only optimized HLO"
            )
        return obj.as_text()
    compiled = _compiled(obj)
    text = compiled.as_text()
    if text is None:
        raise RuntimeError("this XLA backend does not provide the optimized HLO text")
    return text


def inspect_hlo(obj: jax.stages.Lowered | jax.stages.Compiled | str) -> HloSummary:
    """Summarize optimized HLO: from a Lowered (compiled here), a Compiled, or HLO module text.

    XLA's cost and memory analyses need an executable, so they are None for plain text.
    """
    if isinstance(obj, str):
        return _summarize_text(obj, cost=None, memory=None)
    compiled = _compiled(obj)
    return _summarize_text(
        hlo_text(compiled, "optimized"),
        cost=_xla_cost(compiled.cost_analysis()),
        memory=_xla_memory(compiled.memory_analysis()),
    )


def xla_dump_flags(directory: str) -> str:
    """XLA_FLAGS for XLA's pass-by-pass HLO dump into `directory`.

    XLA reads XLA_FLAGS once, when jax initializes its backend, so these only take effect in a
    process that has them in its environment before its first computation: run a subprocess.
    """
    if not directory or any(ch.isspace() for ch in directory):
        raise ValueError(f"XLA_FLAGS cannot carry a dump directory with spaces: {directory!r}")
    return f"--xla_dump_to={directory} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=.*"


# --- reading the compiled executable -----------------------------------------------------------


def _compiled(obj: object) -> jax.stages.Compiled:
    if isinstance(obj, jax.stages.Compiled):
        return obj
    if isinstance(obj, jax.stages.Lowered):
        return obj.compile()
    raise TypeError(
        f"expected a jax.stages.Lowered or jax.stages.Compiled (or HLO text), "
        f"got {type(obj).__name__}"
    )


def _xla_cost(raw: Any) -> XlaCost | None:
    """Older jax returns a list with one dict per module, newer a dict: accept both."""
    if raw is None:
        return None
    per_module = [raw] if isinstance(raw, Mapping) else list(raw)
    if not per_module:
        return None

    def total(key: str) -> float | None:
        values = [float(m[key]) for m in per_module if m and key in m]
        return sum(values) if values else None

    return XlaCost(total("flops"), total("transcendentals"), total("bytes accessed"))


def _xla_memory(raw: Any) -> XlaMemory | None:
    """`CompiledMemoryStats` has attributes; accept a mapping too, for other jax versions."""
    if raw is None:
        return None

    def get(name: str) -> int | None:
        value = raw.get(name) if isinstance(raw, Mapping) else getattr(raw, name, None)
        return None if value is None else int(value)

    return XlaMemory(
        argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"),
        generated_code_bytes=get("generated_code_size_in_bytes"),
        peak_bytes=get("peak_memory_in_bytes"),
    )


# --- parsing HLO text --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Instruction:
    name: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str


@dataclass(frozen=True, slots=True)
class _Computation:
    name: str
    instructions: tuple[_Instruction, ...]


_MODULE_RE = re.compile(r"^\s*HloModule\s+([^\s,]+)")
_HEADER_RE = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{\s*$")
_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_ARRAY_SHAPE_RE = re.compile(r"[a-z][a-z0-9]*\[[^\]]*\](?:\{[^}]*\})?")
_OPCODE_RE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
_COMPUTATION_REF_RE = re.compile(r"(?:^|[,\s])(to_apply|calls)=(\{[^}]*\}|%?[\w.\-]+)")
_KIND_RE = re.compile(r"(?:^|[,\s])kind=(\w+)")
_CUSTOM_KIND_RE = re.compile(r'"kind"\s*:\s*"([^"]+)"')
_TARGET_RE = re.compile(r'(?:^|[,\s])custom_call_target="([^"]*)"')


def _summarize_text(text: str, cost: XlaCost | None, memory: XlaMemory | None) -> HloSummary:
    modules = tuple(m.group(1) for line in text.splitlines() if (m := _MODULE_RE.match(line)))
    computations = list(_computations(text))
    scalar_appliers, async_wrapped = _callee_roles(computations)
    by_name = {c.name: c for c in computations}
    op_counts: Counter[str] = Counter()
    fusions: Counter[str] = Counter()
    targets: Counter[str] = Counter()
    collectives: dict[str, Counter[str]] = {}
    for computation in computations:
        if computation.name in scalar_appliers or computation.name in async_wrapped:
            continue
        for inst in computation.instructions:
            if inst.opcode != "parameter":
                op_counts[inst.opcode] += 1
            if inst.opcode == "fusion":
                fusions[_fusion_kind(inst.attributes)] += 1
            elif inst.opcode == "custom-call":
                match = _TARGET_RE.search(inst.attributes)
                targets[match.group(1) if match else "?"] += 1
            kind, role = _collective_role(inst, by_name, computation)
            if kind is not None:
                collectives.setdefault(kind, Counter())[role] += 1
    return HloSummary(
        module_names=modules,
        op_counts=_frozen_counts(op_counts),
        fusion_kinds=_frozen_counts(fusions),
        custom_call_targets=_frozen_counts(targets),
        collectives=MappingProxyType(
            {
                kind: CollectiveCount(c["sync"], c["async_start"], c["async_done"])
                for kind, c in sorted(collectives.items())
            }
        ),
        cost=cost,
        memory=memory,
    )


def _computations(text: str) -> Iterator[_Computation]:
    """Computations in module text; a wrapped line's attributes join the instruction above."""
    name: str | None = None
    body: list[_Instruction] = []
    for line in text.splitlines():
        if name is None:
            header = _HEADER_RE.match(line)
            if header and not _MODULE_RE.match(line):
                name, body = header.group(1), []
        elif line.lstrip().startswith("}"):
            yield _Computation(name, tuple(body))
            name = None
        elif (inst := _parse_instruction(line)) is not None:
            body.append(inst)
        elif body and line.strip():
            body[-1] = replace(body[-1], attributes=f"{body[-1].attributes} {line.strip()}")


def _parse_instruction(line: str) -> _Instruction | None:
    """`[ROOT] %name = SHAPE opcode(operands), attributes`, or None if `line` is not one."""
    definition = _DEF_RE.match(line)
    if not definition:
        return None
    pos = definition.end()
    if line.startswith("(", pos):
        pos = _matching_paren(line, pos)
        if pos < 0:
            return None
    else:
        shape = _ARRAY_SHAPE_RE.match(line, pos)
        if not shape:
            return None
        pos = shape.end()
    opcode = _OPCODE_RE.match(line, pos)
    if not opcode:
        return None
    close = _matching_paren(line, opcode.end() - 1)
    if close < 0:
        return None
    operand_text = line[opcode.end() : close - 1]
    operands = tuple(
        part.split()[-1].lstrip("%") for part in _split_top_level(operand_text) if part.split()
    )
    return _Instruction(definition.group(1), opcode.group(1), operands, line[close:])


def _matching_paren(text: str, open_at: int) -> int:
    """Index just past the `)` matching the `(` at `open_at`, or -1 if it is not closed."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _callee_roles(computations: list[_Computation]) -> tuple[set[str], set[str]]:
    """Names of scalar combiners (`to_apply=` of reduce, sort, ...) and async-wrapped bodies.

    A combiner's add/max/compare is no work of its own; an async-wrapped collective is counted
    through its async-start/-done, so both stay out of the op counts.
    """
    scalar_appliers: set[str] = set()
    async_wrapped: set[str] = set()
    for computation in computations:
        for inst in computation.instructions:
            for attribute, callees in _computation_refs(inst.attributes):
                if attribute == "to_apply" and inst.opcode != "call":
                    scalar_appliers.update(callees)
                elif attribute == "calls" and inst.opcode.startswith("async-"):
                    async_wrapped.update(callees)
    return scalar_appliers, async_wrapped


def _computation_refs(attributes: str) -> Iterator[tuple[str, list[str]]]:
    for match in _COMPUTATION_REF_RE.finditer(attributes):
        names = match.group(2).strip("{}").split(",")
        yield match.group(1), [n.strip().lstrip("%") for n in names if n.strip()]


def _fusion_kind(attributes: str) -> str:
    """`kLoop`, `kInput`, `kOutput`, or `kCustom:<name>` with the backend's custom fusion name."""
    match = _KIND_RE.search(attributes)
    kind = match.group(1) if match else "unknown"
    if kind == "kCustom" and (custom := _CUSTOM_KIND_RE.search(attributes)):
        return f"kCustom:{custom.group(1)}"
    return kind


def _collective_role(
    inst: _Instruction, by_name: Mapping[str, _Computation], scope: _Computation
) -> tuple[str | None, str]:
    """(collective kind, "sync" | "async_start" | "async_done"), or (None, "") for other ops."""
    opcode = inst.opcode
    if opcode in COLLECTIVE_KINDS:
        return opcode, "sync"
    for suffix, role in (("-start", "async_start"), ("-done", "async_done")):
        if opcode.endswith(suffix):
            base = opcode.removesuffix(suffix)
            if base in COLLECTIVE_KINDS:
                return base, role
            if base == "async":
                kind = _wrapped_collective(inst, by_name, scope)
                return (kind, role) if kind else (None, "")
    return None, ""


def _wrapped_collective(
    inst: _Instruction, by_name: Mapping[str, _Computation], scope: _Computation
) -> str | None:
    """The collective inside a generic async-start/-done: via `calls=`, else via its start."""
    for attribute, callees in _computation_refs(inst.attributes):
        if attribute == "calls":
            for callee in callees:
                body = by_name.get(callee)
                for wrapped in body.instructions if body else ():
                    if wrapped.opcode in COLLECTIVE_KINDS:
                        return wrapped.opcode
    producers = {i.name: i for i in scope.instructions}
    for operand in inst.operands:
        start = producers.get(operand)
        if start is not None and start.opcode.startswith("async-") and start is not inst:
            return _wrapped_collective(start, by_name, scope)
    return None


def _frozen_counts(counts: Counter[str]) -> Mapping[str, int]:
    """Most frequent first, ties by name, read-only: the summary is a value, not a workspace."""
    return MappingProxyType(dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"
