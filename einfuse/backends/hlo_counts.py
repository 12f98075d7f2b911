"""Count what optimized HLO text does: ops, fusions by kind, custom calls, and collectives.

Collectives are counted by kind, blocking or as async start/done halves, including those a
generic `async-start` wraps in a called computation. Scalar combiners (`to_apply=`) and
async-wrapped bodies do no work of their own, so their instructions stay out of the op counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

from einfuse.backends.hlo_module_text import (
    Computation,
    Instruction,
    computation_refs,
    computations,
    module_names,
    shape_bytes,
)
from einfuse.backends.hlo_summary import (
    CollectiveCount,
    CollectiveOp,
    HloSummary,
    XlaCost,
    XlaMemory,
)

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

_KIND_RE = re.compile(r"(?:^|[,\s])kind=(\w+)")
_CUSTOM_KIND_RE = re.compile(r'"kind"\s*:\s*"([^"]+)"')
_TARGET_RE = re.compile(r'(?:^|[,\s])custom_call_target="([^"]*)"')


def summarize_hlo_text(text: str, cost: XlaCost | None, memory: XlaMemory | None) -> HloSummary:
    """The summary of HLO module `text`; XLA's `cost`/`memory` come from an executable, if any."""
    modules = module_names(text)
    all_computations = list(computations(text))
    scalar_appliers, async_wrapped = _callee_roles(all_computations)
    by_name = {c.name: c for c in all_computations}
    op_counts: Counter[str] = Counter()
    fusions: Counter[str] = Counter()
    targets: Counter[str] = Counter()
    collectives: dict[str, Counter[str]] = {}
    ops: list[CollectiveOp] = []
    matmuls: list[tuple[str, tuple[str, ...]]] = []
    fused = {name for c in all_computations for i in c.instructions if i.opcode == "fusion"
             for attr, names in computation_refs(i.attributes) if attr == "calls"
             for name in names}  # fmt: skip
    for computation in all_computations:
        if computation.name in scalar_appliers or computation.name in async_wrapped:
            continue
        scope = {inst.name: inst for inst in computation.instructions}
        upstream = _upstream_collectives(computation, by_name)
        for inst in computation.instructions:
            if inst.opcode != "parameter":
                op_counts[inst.opcode] += 1
            if computation.name not in fused and _computes_matmul(inst, by_name):
                matmuls.append((inst.name, tuple(sorted(upstream.get(inst.name, ())))))
            if inst.opcode == "fusion":
                fusions[_fusion_kind(inst.attributes)] += 1
            elif inst.opcode == "custom-call":
                match = _TARGET_RE.search(inst.attributes)
                targets[match.group(1) if match else "?"] += 1
            kind, role = _collective_role(inst, by_name, computation)
            if kind is None:
                continue
            counts = collectives.setdefault(kind, Counter())
            counts[role] += 1
            if role != "async_start":
                op = _collective_op(kind, inst, scope, role == "async_done", upstream)
                ops.append(op)
                counts["bytes"] += op.bytes
                counts["marked_sync"] += role == "async_done" and not op.asynchronous
    return HloSummary(
        module_names=modules,
        op_counts=_frozen_counts(op_counts),
        fusion_kinds=_frozen_counts(fusions),
        custom_call_targets=_frozen_counts(targets),
        collectives=MappingProxyType(
            {
                kind: CollectiveCount(
                    c["sync"], c["async_start"], c["async_done"], c["bytes"], c["marked_sync"]
                )
                for kind, c in sorted(collectives.items())
            }
        ),
        collective_ops=tuple(ops),
        matmul_deps=tuple(matmuls),
        cost=cost,
        memory=memory,
    )


_MATMULS = ("dot", "convolution")


def _computes_matmul(inst: Instruction, by_name: Mapping[str, Computation]) -> bool:
    """A dot or convolution, or a fusion whose body (at any depth) holds one."""
    if inst.opcode in _MATMULS:
        return True
    if inst.opcode != "fusion":
        return False
    bodies = [c for attr, names in computation_refs(inst.attributes) if attr == "calls"
              for c in names if c in by_name]  # fmt: skip
    return any(_computes_matmul(i, by_name) for name in bodies for i in by_name[name].instructions)


def _collective_op(
    kind: str,
    inst: Instruction,
    scope: Mapping[str, Instruction],
    asynchronous: bool,
    upstream: Mapping[str, frozenset[str]],
) -> CollectiveOp:
    """One issued collective, from its blocking instruction or its async `-done`: its bytes
    are the larger of its operands and its result (the buffer a ring moves, per device).

    An async pair that XLA marked `"is_sync":true` (nothing to overlap it with) runs blocking.
    """
    start = _start_of(inst, scope) if asynchronous else inst
    operand_bytes = sum(shape_bytes(scope[o].shape) for o in start.operands if o in scope)
    nbytes = max(shape_bytes(inst.shape), operand_bytes)
    marked_sync = _IS_SYNC_RE.search(start.attributes) is not None
    after = tuple(sorted(upstream.get(start.name, frozenset())))
    return CollectiveOp(kind, start.name, nbytes, asynchronous and not marked_sync, after)


def _start_of(inst: Instruction, scope: Mapping[str, Instruction]) -> Instruction:
    """The `-start` an async `-done` (or `-update`) finishes, through any updates."""
    start = inst
    while start.operands and start.opcode.endswith(("-done", "-update")):
        start = scope.get(start.operands[0], start)
        if start.opcode.endswith("-start") or start is inst:
            break
    return start


def _upstream_collectives(
    computation: Computation, by_name: Mapping[str, Computation]
) -> dict[str, frozenset[str]]:
    """Per instruction, the collectives (by the name of the instruction that issues them) whose
    results reach it through data, within this computation (XLA prints operands first)."""
    scope = {inst.name: inst for inst in computation.instructions}
    upstream: dict[str, frozenset[str]] = {}
    for inst in computation.instructions:
        reached: set[str] = set()
        for operand in inst.operands:
            reached |= upstream.get(operand, frozenset())
            producer = scope.get(operand)
            if producer is None:
                continue
            kind, role = _collective_role(producer, by_name, computation)
            if kind is not None and role == "sync":
                reached.add(producer.name)
            elif kind is not None and role == "async_done":
                reached.add(_start_of(producer, scope).name)
        upstream[inst.name] = frozenset(reached)
    return upstream


_IS_SYNC_RE = re.compile(r'"is_sync"\s*:\s*true')


def _callee_roles(all_computations: list[Computation]) -> tuple[set[str], set[str]]:
    """Names of scalar combiners (`to_apply=` of reduce, sort, ...) and async-wrapped bodies.

    A combiner's add/max/compare is no work of its own; an async-wrapped collective is counted
    through its async-start/-done, so both stay out of the op counts.
    """
    scalar_appliers: set[str] = set()
    async_wrapped: set[str] = set()
    for computation in all_computations:
        for inst in computation.instructions:
            for attribute, callees in computation_refs(inst.attributes):
                if attribute == "to_apply" and inst.opcode != "call":
                    scalar_appliers.update(callees)
                elif attribute == "calls" and inst.opcode.startswith("async-"):
                    async_wrapped.update(callees)
    return scalar_appliers, async_wrapped


def _fusion_kind(attributes: str) -> str:
    """`kLoop`, `kInput`, `kOutput`, or `kCustom:<name>` with the backend's custom fusion name."""
    match = _KIND_RE.search(attributes)
    kind = match.group(1) if match else "unknown"
    if kind == "kCustom" and (custom := _CUSTOM_KIND_RE.search(attributes)):
        return f"kCustom:{custom.group(1)}"
    return kind


def _collective_role(
    inst: Instruction, by_name: Mapping[str, Computation], scope: Computation
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
    inst: Instruction, by_name: Mapping[str, Computation], scope: Computation
) -> str | None:
    """The collective inside a generic async-start/-done: via `calls=`, else via its start."""
    for attribute, callees in computation_refs(inst.attributes):
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
