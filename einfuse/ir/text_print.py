"""Print a Cascade in its text form (the grammar is in ``einfuse.ir.text_parse``).

``parse(format_cascade(c)) == c``: the printer emits the fewest parentheses that parse back to
the same tree, and parenthesizes a right side the parser would otherwise take for a reduction.
"""

from __future__ import annotations

import math

from einfuse.ir.cascade import Cascade, Einsum, SourceLoc, TensorDecl
from einfuse.ir.expr import INFIX, PRECEDENCE, Access, Const, Expr, Op, Size, Var
from einfuse.ir.text_lexer import tokenize
from einfuse.ir.text_line_parser import LineParser
from einfuse.ir.text_sizes import format_size


def format_expr(e: Expr, compact: bool = False) -> str:
    """Print with the fewest parentheses that parse back to the same tree."""
    return _fmt(e, 0, compact)


def _fmt(e: Expr, ctx: int, compact: bool) -> str:
    if isinstance(e, Var):
        return e.rank
    if isinstance(e, Size):
        return e.rank.upper()
    if isinstance(e, Const):
        return _fmt_number(e.value)
    if isinstance(e, Access):
        return f"{e.tensor}[{', '.join(_fmt(i, 0, True) for i in e.indices)}]"
    assert isinstance(e, Op)
    if e.op in INFIX:
        p = PRECEDENCE[e.op]
        sep = INFIX[e.op] if compact else f" {INFIX[e.op]} "
        # Left-associative: the right operand needs parentheses at equal precedence;
        # comparisons do not chain, so both sides do.
        left = _fmt(e.args[0], p + (1 if p == 1 else 0), compact)
        right = _fmt(e.args[1], p + 1, compact)
        text = f"{left}{sep}{right}"
        return f"({text})" if p < ctx else text
    if e.op == "neg":
        a = e.args[0]
        inner = _fmt(a, 4, compact)
        if isinstance(a, Const) or (isinstance(a, Op) and a.op == "neg"):
            inner = f"({inner})"
        return f"-{inner}"
    return f"{e.op}({', '.join(_fmt(a, 0, compact) for a in e.args)})"


def _fmt_number(v: int | float) -> str:
    if isinstance(v, bool):
        raise TypeError("boolean constants are not part of the IR; use 1 or 0")
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(float(v))


def format_einsum(e: Einsum) -> str:
    lines = []
    if e.init is not None and e.iterative_dim is not None:
        idx = list(e.indices)
        idx[e.iterative_dim] = Const(0)
        lines.append(f"{format_expr(Access(e.output, tuple(idx)))} = {format_expr(e.init)}")
    lhs = format_expr(Access(e.output, e.indices))
    red = f"{e.reduce}({', '.join(e.reduced_ranks)}) " if e.reduce != "sum" else ""
    rhs = format_expr(e.expr)
    if not red and _reads_as_reduction(rhs):
        rhs = f"({rhs})"  # ``max(i, j) - X[i]`` would read as ``max(i, j)`` of ``-X[i]``
    lines.append(f"{lhs} = {red}{rhs}")
    return "\n".join(lines)


def _reads_as_reduction(rhs: str) -> bool:
    """Whether the parser would take the start of ``rhs`` for a reduction like ``max(m)``."""
    loc = SourceLoc(0, 1, rhs)
    return LineParser(tokenize(rhs, loc), loc).reduce_spec() is not None


def _fmt_decl(t: TensorDecl) -> str:
    dt = "" if t.dtype == "float32" else f": {t.dtype}"
    return f"{t.name}[{', '.join(t.ranks)}]{dt}"


def format_cascade(c: Cascade) -> str:
    lines = []
    if c.sizes:
        lines.append("ranks " + ", ".join(f"{r}={format_size(s)}" for r, s in c.sizes))
    for p in c.partitions:
        lines.append(f"partition {p.rank} -> {p.outer}, {p.inner} by {format_size(p.tile)}")
    if c.devices:
        lines.append("device " + ", ".join(f"{r} on {axis}" for r, axis in c.devices))
    if c.inputs:
        lines.append("inputs " + ", ".join(_fmt_decl(t) for t in c.inputs))
    lines.extend(format_einsum(e) for e in c.einsums)
    lines.append("outputs " + ", ".join(c.outputs))
    return "\n".join(lines) + "\n"
