"""TokenWeave's token splitting: the token rank in two halves, each with its own collectives.

Every Einsum that keeps the token rank ``p`` on its left is written twice, once per half:
half 0 on rank ``pa`` (``PA = round_up(P, wave)/2 + offset`` tokens, wave-aware as in the
paper), half 1 on ``pb`` (the rest), reading the original token ``pa+0`` or
``PA+pb``. Reads of a split
tensor at its own token are the half's (``H1_b[pb, d]``); any other read (attention's keys
``XN1[m, d]``, a shifted token) reads both halves as one tensor, ``XN1_a[m-0, d] +
XN1_b[m-PA, d]`` (a read past a half gives 0). Outputs are put back together under their
names. So each half's all-reduce sums only that half's partials, and half 1's compute does
not wait for half 0's collective: on a GPU one overlaps the other. Legal when no Einsum
reduces over the token rank or steps along it (a half would miss the other's terms); the
report says also whether the halves came out independent (a later layer's attention reads
the other half's keys, so there each half waits for the other's previous collectives).
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.devices import collectives
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, rank_vars, rename_ranks
from einfuse.passes.manager import register_pass
from einfuse.passes.overlap_common import (
    Chooser,
    Decision,
    OverlapError,
    OverlapReport,
    chooser_for,
    fresh,
    int_option,
    int_size,
    not_paying,
    replace_reads,
    taken_names,
    unpack,
)

NAME = "split-tokens"
MIN_TOKENS = 1024  # TokenWeave splits only batches of at least this many tokens


@register_pass(NAME)
def split_tokens(
    c: Cascade,
    offset: int | str = 0,
    wave: int = 256,
    force: bool = False,
    rank: str = "",
    cost: str = "",
) -> Cascade:
    """Split the token rank in two halves carried through the whole cascade (``offset=auto``:
    the cost model's on the hardware target ``cost``, or ``cost_target``'s)."""
    return split_tokens_with_report(c, offset, wave, force, rank, cost=cost)[0]


def split_tokens_with_report(
    c: Cascade,
    offset: int | str = 0,
    wave: int = 256,
    force: bool = False,
    rank: str = "",
    chooser: Chooser | None = None,
    cost: str = "",
) -> tuple[Cascade, OverlapReport]:
    """``split-tokens`` and why. ``offset="auto"`` asks ``chooser(cascade, token_rank)``
    (default: the cost model's on ``cost``)."""
    int_option(NAME, "wave", wave, 1)
    if offset == "auto" and chooser is None:
        chooser = chooser_for(NAME, "offset", "offset", cost, wave=wave)
    if offset != "auto" and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise OverlapError(f"{NAME}: offset must be an int or auto, got {offset!r}")
    r = rank or _token_rank(c)
    if r is None or isinstance(r, list):
        found = ", ".join(r or []) or "none"
        why = f"no single token rank on every collective's output (candidates: {found}); name one"
        return c, OverlapReport(NAME, (Decision("tokens", False, why),))
    if r not in c.all_ranks():
        raise OverlapError(f"{NAME}: no rank {r!r}; ranks: {', '.join(c.all_ranks())}")
    why_not = _illegal(c, r, force)
    if why_not:
        return c, OverlapReport(NAME, (Decision(r, False, why_not),))
    tokens = int_size(c, r)
    assert tokens is not None
    extra, model = unpack(chooser(c, r)) if offset == "auto" and chooser else (offset, "")
    if extra is None:
        return c, OverlapReport(NAME, (Decision(r, False, not_paying(model)),))
    first = -(-tokens // wave) * wave // 2 + int(extra)
    if not 0 < first < tokens:
        why = f"first half round_up({tokens}, {wave})/2 + {extra} = {first} is not in (0, {tokens})"
        return c, OverlapReport(NAME, (Decision(r, False, why),))
    out, sides = _split(c, r, first, tokens - first)
    why = _describe(c, out, sides, f"{r} = {first} + {tokens - first} tokens")
    why += f"; cost model: {model}" if model else ""
    return out, OverlapReport(NAME, (Decision(r, True, why),))


def _token_rank(c: Cascade) -> str | list[str] | None:
    """The rank every collective's output keeps plainly and no Einsum reduces: the tokens."""
    comms = collectives(c)
    if not comms:
        return None
    common = None
    for m in comms:
        e = c.writer(m.einsum)
        assert e is not None
        plain = {i.rank for i in e.indices if isinstance(i, Var) and not c.device_axis(i.rank)}
        common = plain if common is None else common & plain
    reduced = {r for e in c.einsums for r in e.reduced_ranks}
    found = sorted((common or set()) - reduced)
    return found[0] if len(found) == 1 else found


def _illegal(c: Cascade, r: str, force: bool) -> str:
    tokens = int_size(c, r)
    if tokens is None:
        return f"the size of {r} must be a bound integer"
    if c.device_axis(r) is not None:
        return f"{r} is a device rank"
    if tokens < MIN_TOKENS and not force:
        return (
            f"{tokens} tokens < {MIN_TOKENS}: halves this small do not hide a collective "
            "(force=true splits anyway)"
        )
    for e in c.einsums:
        if r in e.reduced_ranks:
            return f"{e.output} reduces over {r}: a half would miss the other half's terms"
        if e.iterative_rank == r:
            return f"{e.output} steps along {r}"
        if any(r in rank_vars(i) and i != Var(r) for i in e.indices):
            return f"{e.output} writes {r} through an expression"
    return ""


def _split(c: Cascade, r: str, first: int, second: int) -> tuple[Cascade, dict[str, int]]:
    """The split cascade, and which half each new Einsum belongs to."""
    taken = taken_names(c)
    ra, rb = fresh(f"{r}a", taken), fresh(f"{r}b", taken)
    taken |= {ra, rb, ra.upper(), rb.upper()}
    dims = {
        e.output: next(i for i, x in enumerate(e.indices) if x == Var(r))
        for e in c.einsums
        if Var(r) in e.indices
    }
    halves: dict[str, tuple[str, str]] = {}
    for name in dims:
        halves[name] = (fresh(f"{name}_a", taken), fresh(f"{name}_b", taken))
        taken |= set(halves[name])
    # Half a reads token pa+0, not pa: a plain pa (size PA) may not index a P-long dim.
    starts = (Op("add", (Var(ra), Const(0))), Op("add", (Size(ra), Var(rb))))

    def read(a: Access, k: int | None) -> Expr | None:
        """A split tensor read by half ``k`` (None: by an unsplit Einsum)."""
        if a.tensor not in halves:
            return None
        d = dims[a.tensor]
        at = a.indices[d]
        if k is not None and at == starts[k]:
            return Access(halves[a.tensor][k], _at(a.indices, d, Var((ra, rb)[k])))
        low = Op("sub", (at, Const(0))) if isinstance(at, Var) else at
        high = Op("sub", (at, Size(ra)))
        return Op(
            "add",
            (
                Access(halves[a.tensor][0], _at(a.indices, d, low)),
                Access(halves[a.tensor][1], _at(a.indices, d, high)),
            ),
        )

    out: list[Einsum] = []
    for e in c.einsums:
        if e.output not in halves:
            out.append(Einsum(e.output, e.indices, replace_reads(e.expr, lambda a: read(a, None))))
            continue
        for k, half in enumerate((ra, rb)):
            expr = rename_ranks(e.expr, {r: starts[k]})
            expr = replace_reads(expr, lambda a, k=k: read(a, k))
            left = _at(e.indices, dims[e.output], Var(half))
            out.append(Einsum(halves[e.output][k], left, expr, e.reduce, loc=e.loc))
    for name in c.outputs:
        if name in halves:
            e = c.writer(name)
            assert e is not None
            whole = read(Access(name, e.indices), None)
            assert whole is not None
            out.append(Einsum(name, e.indices, whole, loc=e.loc))
    sides = {h: k for pair in halves.values() for k, h in enumerate(pair)}
    return c.with_einsums(out).with_sizes(**{ra: first, rb: second}), sides


def _at(indices: tuple[Expr, ...], dim: int, index: Expr) -> tuple[Expr, ...]:
    return (*indices[:dim], index, *indices[dim + 1 :])


def _describe(before: Cascade, after: Cascade, sides: dict[str, int], text: str) -> str:
    """Sizes, collective counts, and whether either half waits for the other's collective."""
    text += f"; {len(collectives(before))} -> {len(collectives(after))} collectives"
    waits = half_waits(after, sides)
    if waits:
        return f"{text}; but {waits[0][0]} waits for the other half's {waits[0][1]}"
    return f"{text}; each half's collectives independent of the other half's compute"


def half_waits(c: Cascade, sides: Mapping[str, int]) -> list[tuple[str, str]]:
    """(Einsum, collective) pairs where an Einsum of one half (``sides``: tensor -> 0 or 1)
    depends on a collective of the other half: what stops the two halves from overlapping."""
    g = c.graph()
    half = dict(sides)
    out = []
    for m in collectives(c):
        side = half.get(m.einsum)
        if side is None:
            continue
        for d in nx.descendants(g, m.einsum):
            if half.get(d, side) != side:
                out.append((d, m.einsum))
    return out
