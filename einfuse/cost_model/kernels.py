"""The loop nests of a cascade: which Einsums run together, and what they read and write.

A *kernel* is what runs as one loop nest: a fused group (the Einsums sharing the loop over a
partitioned rank ``m1``, plus the epilogue that finishes each tile from the group's results) or
one unfused Einsum. These facts do not depend on the schedule; ``traffic`` prices them under one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import Access, accesses, rank_vars


@dataclass(frozen=True, slots=True)
class AccessShape:
    """A tensor access reduced to what footprints need: the ranks of each index."""

    tensor: str
    dims: tuple[tuple[str, ...], ...]  # ranks in each index; () for a constant index (``M1``)


@dataclass(frozen=True, slots=True)
class EinsumShape:
    name: str
    ranks: tuple[str, ...]
    reduced: tuple[str, ...]
    write: AccessShape
    reads: tuple[AccessShape, ...]


@dataclass(frozen=True, slots=True)
class Kernel:
    """One loop nest: ``members`` run per step of ``loop_rank``; ``epilogue`` after it."""

    name: str
    loop_rank: str | None
    members: tuple[int, ...]  # indices into the cascade's Einsums
    epilogue: tuple[int, ...]
    ranks: tuple[str, ...]  # default loop order: output ranks, the carried rank, the rest
    reads: tuple[str, ...]  # tensors that come from outside the kernel
    results: tuple[str, ...]  # tensors read after the kernel or cascade outputs
    internal: tuple[str, ...]  # written and consumed inside the kernel
    carried: frozenset[str]
    final_only: frozenset[str]  # carried results read afterwards only at their last step
    einsums: tuple[int, ...] = ()  # members then epilogue
    index_ranks: Mapping[str, frozenset[str]] = field(default_factory=dict)  # ranks indexing T
    first_user: Mapping[str, int] = field(default_factory=dict)  # first Einsum touching T
    writer: Mapping[str, int] = field(default_factory=dict)
    reduced: frozenset[str] = frozenset()  # ranks some Einsum of the kernel reduces


def access_shape(a: Access) -> AccessShape:
    return AccessShape(a.tensor, tuple(tuple(rank_vars(i)) for i in a.indices))


def einsum_shape(e: Einsum) -> EinsumShape:
    reads = dict.fromkeys(access_shape(a) for a in accesses(e.expr))
    write = AccessShape(e.output, tuple(tuple(rank_vars(i)) for i in e.indices))
    return EinsumShape(e.output, e.ranks, e.reduced_ranks, write, tuple(reads))


def build_kernels(cascade: Cascade) -> tuple[Kernel, ...]:
    """Fused groups (``einfuse.passes.fuse.fused_groups``) with their epilogues, then the rest.

    An epilogue Einsum follows the group, does not iterate over its loop rank, has only ranks
    of the group, and reads nothing computed outside the group: it finishes each tile in the
    same kernel (``AV = RNV[M1] / RD[M1]``) instead of sending the state through memory.
    """
    from einfuse.passes.fuse import fused_groups

    einsums = cascade.einsums
    index = {e.output: i for i, e in enumerate(einsums)}
    inputs = {t.name for t in cascade.inputs}
    owner: dict[int, int] = {}
    plans: list[tuple[str | None, list[int], list[int]]] = []
    for g in fused_groups(cascade):
        members = [index[n] for n in g.einsums]
        if any(i in owner for i in members):
            continue
        ranks = {r for i in members for r in einsums[i].ranks}
        inside = {einsums[i].output for i in members}
        epilogue: list[int] = []
        for i in range(min(members), len(einsums)):
            e = einsums[i]
            if i in members:
                continue
            outside = [t for t in e.inputs if t not in inside and t not in inputs]
            if (
                i not in owner
                and g.rank not in e.ranks
                and set(e.ranks) <= ranks
                and not outside
                and any(t in inside for t in e.inputs)
            ):
                epilogue.append(i)
                inside.add(e.output)
        for i in (*members, *epilogue):
            owner[i] = len(plans)
        plans.append((g.rank, members, epilogue))
    for i in range(len(einsums)):
        if i not in owner:  # alone: a recurrence still loops over its iterative rank
            owner[i] = len(plans)
            plans.append((einsums[i].iterative_rank, [i], []))
    plans.sort(key=lambda p: min(p[1]))
    facts = _Facts(tuple(e.inputs for e in einsums), tuple(einsum_shape(e) for e in einsums))
    return tuple(_kernel(cascade, facts, rank, members, epi) for rank, members, epi in plans)


@dataclass(frozen=True, slots=True)
class _Facts:
    """Per Einsum, computed once for all kernels (the IR derives them on every access)."""

    inputs: tuple[tuple[str, ...], ...]
    shapes: tuple[EinsumShape, ...]


def _kernel(
    cascade: Cascade, facts: _Facts, rank: str | None, members: list[int], epilogue: list[int]
) -> Kernel:
    einsums = cascade.einsums
    mine = [einsums[i] for i in (*members, *epilogue)]
    written = {e.output for e in mine}
    reads = dict.fromkeys(
        t for i in (*members, *epilogue) for t in facts.inputs[i] if t not in written
    )
    later = [e for e in einsums if e.output not in written]
    read_later = {
        t for j, e in enumerate(einsums) if e.output not in written for t in facts.inputs[j]
    }
    results = [e.output for e in mine if e.output in read_later or e.output in cascade.outputs]
    internal = [e.output for e in mine if e.output not in results]
    carried = {e.output for e in mine if e.is_recurrence}
    final_only = set()
    for t in carried & set(results):
        dim = cascade.writer(t).iterative_dim  # type: ignore[union-attr]
        uses = [a for e in later for a in accesses(e.expr) if a.tensor == t]
        if t not in cascade.outputs and all(not rank_vars(a.indices[dim]) for a in uses):
            final_only.add(t)
    everything = (*members, *epilogue)
    index_ranks: dict[str, set[str]] = {}
    first_user: dict[str, int] = {}
    for i in everything:
        sh = facts.shapes[i]
        for a in (sh.write, *sh.reads):
            index_ranks.setdefault(a.tensor, set()).update(r for d in a.dims for r in d)
            first_user.setdefault(a.tensor, i)
    outs = [r for e in mine for r in e.output_ranks if r != rank]
    order = dict.fromkeys([*outs, *([rank] if rank else []), *(r for e in mine for r in e.ranks)])
    name = f"loop {rank}" if len(mine) > 1 and rank else mine[0].output
    return Kernel(
        name,
        rank,
        tuple(members),
        tuple(epilogue),
        tuple(order),
        tuple(reads),
        tuple(results),
        tuple(internal),
        frozenset(carried),
        frozenset(final_only),
        everything,
        {t: frozenset(rs) for t, rs in index_ranks.items()},
        first_user,
        {einsums[i].output: i for i in everything},
        frozenset(r for e in mine for r in e.reduced_ranks),
    )
