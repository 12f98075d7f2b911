"""Parse the one text form of a Cascade; ``text_print.format_cascade`` writes it back exactly.

Grammar, one statement a line (``#`` starts a comment)::

    ranks e=64, m=M, m0=256, m1=ceiling(M/256)     # sizes; undeclared rank r has size R
    partition m -> m1, m0 by 256                   # record of a rank split
    device x on tp, y on tp                        # device ranks: bound to mesh axis tp
    inputs Q[e, p], K[e, m], V[f, m]: bfloat16     # declarations (dtype optional)
    QK[m, p] = Q[e, p] * K[e, m]                   # sum over e (Einstein convention)
    GM[p] = max(m) QK[m, p]                        # explicit reduction operator
    RM[0, p] = -inf                                # initial value of the recurrence below
    RM[m1+1, p] = max(RM[m1, p], LM[m1, p])        # recurrence along m1
    outputs AV

Rank names are lower case; an upper-case name is the size of the rank it lower-cases
to (``M0`` is the size of ``m0``), as in the FuseMax paper. Bare names in a map
expression are rank values (for masks); tensors always take brackets (``S[]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.ir.cascade import Cascade, Einsum, Partition, SizeValue, SourceLoc, TensorDecl
from einfuse.ir.errors import ParseError
from einfuse.ir.expr import Access, Const, Expr, shifted_rank
from einfuse.ir.text_lexer import RANK_RE, at_column, tokenize
from einfuse.ir.text_line_parser import LineParser
from einfuse.ir.text_print import format_expr
from einfuse.ir.text_sizes import parse_size


@dataclass(frozen=True, slots=True)
class _Stmt:
    tensor: str
    indices: tuple[Expr, ...]
    expr: Expr
    reduce: str
    listed: list[str] | None
    loc: SourceLoc


def _split_top(text: str) -> list[tuple[str, int]]:
    """Split on commas outside parentheses; returns (piece, 0-based offset)."""
    out, depth, start = [], 0, 0
    for k, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append((text[start:k], start))
            start = k + 1
    out.append((text[start:], start))
    return out


def parse(text: str, file: str = "") -> Cascade:
    """Parse the text form; errors name the line and column."""
    inputs: list[TensorDecl] = []
    outputs: list[str] = []
    sizes: list[tuple[str, SizeValue]] = []
    partitions: list[Partition] = []
    devices: list[tuple[str, str]] = []
    stmts: list[_Stmt] = []
    outputs_loc: SourceLoc | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        loc = SourceLoc(lineno, len(line) - len(line.lstrip()) + 1, raw.rstrip(), file)
        head = line.split(None, 1)[0]
        rest_col = line.index(head) + len(head)
        if head == "ranks":
            for piece, off in _split_top(line[rest_col:]):
                col = rest_col + off + len(piece) - len(piece.lstrip()) + 1
                if "=" not in piece:
                    raise ParseError("expected rank=size", at_column(loc, col), where="syntax")
                name, size = piece.split("=", 1)
                if not RANK_RE.match(name.strip()):
                    raise ParseError(
                        f"rank name {name.strip()!r} must be lower case",
                        at_column(loc, col),
                        where="syntax",
                    )
                size_col = rest_col + off + len(name) + 2 + len(size) - len(size.lstrip())
                sizes.append((name.strip(), parse_size(size, at_column(loc, size_col))))
            continue
        p = LineParser(tokenize(line, loc), loc)
        if head == "inputs":
            p.take("inputs")
            inputs.extend(p.comma_separated(p.decl))
            p.done()
        elif head == "outputs":
            p.take("outputs")
            outputs_loc = loc
            outputs.extend(p.comma_separated(p.tensor_name))
            p.done()
        elif head == "device":
            p.take("device")
            devices.extend(p.comma_separated(p.device_binding))
            p.done()
        elif head == "partition":
            p.take("partition")
            rank = p.rank_name()
            p.take("->")
            outer = p.rank_name()
            p.take(",")
            inner = p.rank_name()
            by = p.take("by", kind="name")
            partitions.append(
                Partition(
                    rank, outer, inner, parse_size(line[by.col + 1 :], at_column(loc, by.col))
                )
            )
        else:
            stmts.append(_parse_stmt(p, loc))
    einsums = _attach_inits(stmts)
    if not outputs:
        raise ParseError("no 'outputs' line: name the tensors the cascade returns", where="syntax")
    del outputs_loc
    return Cascade(
        tuple(inputs), tuple(einsums), tuple(outputs), tuple(sizes), tuple(partitions), devices
    )


def _parse_stmt(p: LineParser, loc: SourceLoc) -> _Stmt:
    name = p.take(kind="name")
    indices = p.index_list() if p.tok.text == "[" else ()
    p.take("=")
    spec = p.reduce_spec()
    expr = p.expr()
    p.done()
    reduce, listed = spec if spec else ("sum", None)
    return _Stmt(name.text, indices, expr, reduce, listed, at_column(loc, name.col))


def _attach_inits(stmts: list[_Stmt]) -> list[Einsum]:
    """Turn ``T[0, p] = v`` lines into the ``init`` of the recurrence that writes ``T``."""
    inits: dict[str, _Stmt] = {}
    einsums: list[Einsum] = []
    for s in stmts:
        is_init = any(isinstance(i, Const) for i in s.indices) and not any(
            shifted_rank(i) is not None and shifted_rank(i)[1] != 0 for i in s.indices
        )
        if is_init:
            if s.tensor in inits:
                raise ParseError(f"initial value of {s.tensor} given twice", s.loc, where="verify")
            inits[s.tensor] = s
            continue
        e = Einsum(s.tensor, s.indices, s.expr, s.reduce, None, loc=s.loc)
        if s.listed is not None and sorted(s.listed) != sorted(e.reduced_ranks):
            raise ParseError(
                f"{s.reduce}({', '.join(s.listed)}) does not match the ranks reduced away "
                f"({', '.join(e.reduced_ranks) or 'none'}): a reduction names exactly the ranks on "
                "the right that are not on the left",
                s.loc,
                where="verify",
            )
        if s.tensor in inits:
            init = inits.pop(s.tensor)
            dim = e.iterative_dim
            if dim is None:
                raise ParseError(
                    f"{s.tensor} has an initial value but is not a recurrence "
                    f"(write {s.tensor}[r+1, ...] = f({s.tensor}[r, ...], ...))",
                    init.loc,
                    where="verify",
                )
            expect = list(e.indices)
            expect[dim] = Const(0)
            if tuple(expect) != init.indices:
                raise ParseError(
                    f"initial value of {s.tensor} must be written "
                    f"{format_expr(Access(s.tensor, tuple(expect)))}",
                    init.loc,
                    where="verify",
                )
            e = Einsum(e.output, e.indices, e.expr, e.reduce, init.expr, loc=e.loc)
        einsums.append(e)
    for s in inits.values():
        raise ParseError(
            f"{s.tensor}[...] = ... with a constant index must precede the recurrence it starts",
            s.loc,
            where="verify",
        )
    return einsums
