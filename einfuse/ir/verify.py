"""The verifier: a cascade that passes it can be interpreted and emitted without surprises.

Passes are checked valid-in, valid-out in tests and debug mode. Every error names the
Einsum (and, for parsed text, its line and column).
"""

from __future__ import annotations

import re

import networkx as nx
import sympy

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.dtypes import DECLARABLE_DTYPES
from einfuse.ir.errors import VerifyError
from einfuse.ir.expr import (
    OPS,
    REDUCE_IDENTITY,
    Access,
    Const,
    Expr,
    Op,
    Var,
    accesses,
    arity,
    is_index_expr,
    rank_vars,
    shifted_rank,
    size_refs,
)
from einfuse.ir.text_lexer import RANK_RE
from einfuse.ir.text_print import format_expr

# Names the text form cannot give back: ``inf`` is a number, the others start statements.
_TENSOR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RESERVED = frozenset({"inf", "ranks", "inputs", "outputs", "partition", "device"})


def verify(c: Cascade) -> Cascade:
    """Raise VerifyError on the first problem; return the cascade so calls chain."""
    defined: dict[str, int] = {t.name: len(t.ranks) for t in c.inputs}
    if len(defined) != len(c.inputs):
        dup = next(t for t in c.inputs if sum(u.name == t.name for u in c.inputs) > 1)
        raise VerifyError(f"input {dup.name} declared twice", dup.loc, where=dup.name)
    for t in c.inputs:
        if t.dtype not in DECLARABLE_DTYPES:
            known = ", ".join(sorted(DECLARABLE_DTYPES))
            raise VerifyError(f"input {t.name}: unknown dtype {t.dtype!r}; known: {known}", t.loc)
    known_ranks = set(c.all_ranks())
    _check_names(c, known_ranks)
    for r, s in c.sizes:
        if isinstance(s, int) and s <= 0:
            raise VerifyError(f"rank {r} has size {s}; sizes must be positive", where="ranks")
    for e in c.einsums:
        _check_einsum(c, e, defined, known_ranks)
        defined[e.output] = len(e.indices)
    for p in c.partitions:
        if sympy.simplify(sympy.sympify(c.size(p.inner)) - sympy.sympify(p.tile)) != 0:
            raise VerifyError(
                f"partition {p.rank} -> {p.outer}, {p.inner}: {p.inner} has size "
                f"{c.size(p.inner)}, not the tile {p.tile}",
                where="partition",
            )
    for o in c.outputs:
        if o not in defined:
            raise VerifyError(f"output {o} is never written", where="outputs")
    if c.devices:
        from einfuse.ir.devices import check_devices

        check_devices(c)
    g = c.graph()
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise VerifyError(
            "cycle through " + " -> ".join(a for a, _ in cycle) + f" -> {cycle[0][0]}",
            where="cascade",
        )
    return c


def _fail(e: Einsum, msg: str) -> VerifyError:
    return VerifyError(msg, e.loc, where=f"einsum {e.output}")


def _check_einsum(c: Cascade, e: Einsum, defined: dict[str, int], known: set[str]) -> None:
    if e.output in defined:
        what = "an input" if c.input_decl(e.output) else "already written"
        raise _fail(e, f"tensor {e.output} written twice ({what}); each tensor has one writer")
    if e.reduce not in REDUCE_IDENTITY:
        raise _fail(e, f"unknown reduction {e.reduce!r}; known: {', '.join(REDUCE_IDENTITY)}")
    for s in {r for i in e.indices for r in size_refs(i)}:
        if s not in known:
            raise _fail(e, f"size {s.upper()} refers to no rank {s}")
    _check_expr(c, e, e.expr, defined, known)
    _check_lhs(e)
    if e.reduce != "sum" and not e.reduced_ranks:
        raise _fail(
            e, f"{e.reduce} reduction over no rank: every rank on the right is also on the left"
        )
    if e.is_recurrence:
        _check_recurrence(c, e)
        assert e.init is not None
        _check_expr(c, e, e.init, defined, known, role="initial value ")
    elif e.init is not None:
        raise _fail(e, "has an initial value but is not a recurrence")


def _check_expr(
    c: Cascade, e: Einsum, expr: Expr, defined: dict[str, int], known: set[str], role: str = ""
) -> None:
    """Operators, constants, sizes and reads of a map expression (or of an initial value)."""
    for node in expr.walk():
        if isinstance(node, Op):
            if node.op not in OPS:
                raise _fail(e, f"unknown operator {node.op!r}")
            if len(node.args) != arity(node.op):
                raise _fail(
                    e, f"{node.op} takes {arity(node.op)} argument(s), got {len(node.args)}"
                )
        elif isinstance(node, Const) and (
            isinstance(node.value, bool) or node.value != node.value  # NaN
        ):
            raise _fail(e, f"constant {node.value!r} is not a number (use an int, float or inf)")
    for s in size_refs(expr):
        if s not in known:
            raise _fail(e, f"size {s.upper()} refers to no rank {s}")
    for a in accesses(expr):
        if a.tensor == e.output and not role:
            continue  # a recurrence's read of its previous step, checked on its own
        if a.tensor not in defined:
            later = c.writer(a.tensor) is not None
            why = "it is written later (a cycle)" if later else "it is neither an input nor written"
            raise _fail(e, f"{role}reads undefined tensor {a.tensor}: {why}")
        _check_access(c, e, a, defined[a.tensor])


def _check_names(c: Cascade, ranks: set[str]) -> None:
    """Every name must print and parse back as itself."""
    for r in sorted(ranks):
        if not RANK_RE.match(r) or r == "inf":
            raise VerifyError(
                f"rank name {r!r} cannot be written in the text form "
                "(lower case [a-z_][a-z0-9_]*, not 'inf')",
                where="ranks",
            )
    names = [t.name for t in c.inputs] + [e.output for e in c.einsums]
    names += [a.tensor for e in c.einsums for a in accesses(e.expr)]
    for n in names:
        if not _TENSOR_RE.match(n) or n in _RESERVED:
            raise VerifyError(
                f"tensor name {n!r} cannot be written in the text form "
                f"(an identifier other than {', '.join(sorted(_RESERVED))})",
                where=n,
            )


def _check_lhs(e: Einsum) -> None:
    seen: set[str] = set()
    for i in e.indices:
        sr = shifted_rank(i)
        if sr is None or sr[1] not in (0, 1) or (sr[1] == 1 and not e.is_recurrence):
            raise _fail(
                e,
                f"left index {format_expr(i, compact=True)} must be a plain rank "
                "(or r+1 along a recurrence's iterative rank)",
            )
        if sr[0] in seen:
            raise _fail(e, f"rank {sr[0]} appears twice on the left")
        seen.add(sr[0])


def _check_access(c: Cascade, e: Einsum, a: Access, ndim: int) -> None:
    if len(a.indices) != ndim:
        raise _fail(e, f"{a} has {len(a.indices)} indices but {a.tensor} has {ndim} ranks")
    ranks = c.tensor_ranks(a.tensor)
    for d, i in enumerate(a.indices):
        if not is_index_expr(i):
            raise _fail(
                e,
                f"index {format_expr(i, compact=True)} of {a.tensor} is not affine "
                "in ranks, sizes and integers",
            )
        if isinstance(i, Var) and ranks[d] and i.rank != ranks[d]:
            mine, theirs = c.size(i.rank), c.size(ranks[d])
            if sympy.simplify(sympy.sympify(mine) - sympy.sympify(theirs)) != 0:
                raise _fail(
                    e,
                    f"rank {i.rank} (size {mine}) indexes rank {ranks[d]} of {a.tensor} "
                    f"(size {theirs}): a rank used with two sizes",
                )


def recurrence_parts(e: Einsum) -> tuple[str, int, Expr]:
    """A recurrence's iterative rank, its left dimension and its initial value.

    Emitters call this rather than assert: a cascade built by a pass or by hand that lost
    a recurrence's initial value is then a located VerifyError, not a bare AssertionError.
    """
    r, dim = e.iterative_rank, e.iterative_dim
    if r is None or dim is None:
        raise _fail(
            e,
            f"reads its own output but no left index is r+1; write "
            f"{e.output}[r+1, ...] = f({e.output}[r, ...], ...)",
        )
    if e.init is None:
        idx = list(e.indices)
        idx[dim] = Const(0)
        raise _fail(e, f"recurrence has no initial value: add {Access(e.output, tuple(idx))} = ...")
    return r, dim, e.init


def _check_recurrence(c: Cascade, e: Einsum) -> None:
    r, dim, init = recurrence_parts(e)
    if r in rank_vars(init) or any(a.tensor == e.output for a in accesses(init)):
        raise _fail(e, f"initial value may not depend on the iterative rank {r} or on itself")
    stray = [v for v in rank_vars(init) if v not in e.output_ranks]
    if stray:
        raise _fail(
            e,
            f"initial value uses rank(s) {', '.join(stray)} that are not on the left; "
            "it is one value per step-0 element and cannot reduce",
        )
    if e.reduced_ranks:
        raise _fail(
            e,
            f"a recurrence may not also reduce (over {', '.join(e.reduced_ranks)}); "
            "reduce in a separate Einsum first",
        )
    for a in accesses(e.expr):
        if a.tensor != e.output:
            continue
        expect = list(e.indices)
        expect[dim] = Var(r)
        if a.indices != tuple(expect):
            raise _fail(
                e,
                f"a recurrence reads itself one step back, as {Access(e.output, tuple(expect))}; "
                f"found {a}",
            )
