"""The one text form of a Cascade: ``parse(text)`` and ``format_cascade(c)`` round-trip exactly.

Grammar, one statement a line (``#`` starts a comment)::

    ranks e=64, m=M, m0=256, m1=ceiling(M/256)     # sizes; undeclared rank r has size R
    partition m -> m1, m0 by 256                   # record of a rank split
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

import math
import re
from dataclasses import dataclass

import sympy
from sympy.parsing.sympy_parser import parse_expr

from einfuse.ir.cascade import Cascade, Einsum, Partition, SizeValue, SourceLoc, TensorDecl
from einfuse.ir.errors import ParseError
from einfuse.ir.expr import (
    INFIX,
    OPS,
    PRECEDENCE,
    REDUCE_IDENTITY,
    Access,
    Const,
    Expr,
    Op,
    Size,
    Var,
    arity,
    shifted_rank,
)

RANK_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op><=|>=|==|!=|->|[\[\](),=+\-*/<>:]))"
)
_INFIX_OPS = {v: k for k, v in INFIX.items()}
_COMPARE = {"<", "<=", ">", ">=", "==", "!="}
_SIZE_FUNCTIONS = {"ceiling", "floor", "Max", "Min"}


# --------------------------------------------------------------------------- printing
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


def format_size(s: SizeValue) -> str:
    return str(s)


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
    return _LineParser(_tokenize(rhs, loc), loc).reduce_spec() is not None


def _fmt_decl(t: TensorDecl) -> str:
    dt = "" if t.dtype == "float32" else f": {t.dtype}"
    return f"{t.name}[{', '.join(t.ranks)}]{dt}"


def format_cascade(c: Cascade) -> str:
    lines = []
    if c.sizes:
        lines.append("ranks " + ", ".join(f"{r}={format_size(s)}" for r, s in c.sizes))
    for p in c.partitions:
        lines.append(f"partition {p.rank} -> {p.outer}, {p.inner} by {format_size(p.tile)}")
    if c.inputs:
        lines.append("inputs " + ", ".join(_fmt_decl(t) for t in c.inputs))
    lines.extend(format_einsum(e) for e in c.einsums)
    lines.append("outputs " + ", ".join(c.outputs))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parsing
@dataclass
class _Tok:
    kind: str  # num | name | op | end
    text: str
    col: int  # 1-based


def _tokenize(line: str, loc: SourceLoc) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(line):
        if line[pos:].strip() == "":
            break
        m = _TOKEN.match(line, pos)
        if m is None or m.end() == pos:
            bad = len(line[pos:]) - len(line[pos:].lstrip()) + pos
            raise ParseError(
                f"unexpected character {line[bad]!r}", _at(loc, bad + 1), where="syntax"
            )
        kind = m.lastgroup or "op"
        toks.append(_Tok(kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    toks.append(_Tok("end", "", len(line.rstrip()) + 1))
    return toks


def _at(loc: SourceLoc, col: int) -> SourceLoc:
    return SourceLoc(loc.line, col, loc.text, loc.file)


class _LineParser:
    """Recursive descent over one line's tokens."""

    def __init__(self, toks: list[_Tok], loc: SourceLoc) -> None:
        self.toks, self.i, self.loc = toks, 0, loc

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def error(self, msg: str, tok: _Tok | None = None) -> ParseError:
        t = tok or self.tok
        return ParseError(msg, _at(self.loc, t.col), where="syntax")

    def take(self, text: str | None = None, kind: str | None = None) -> _Tok:
        t = self.tok
        if (text is not None and t.text != text) or (kind is not None and t.kind != kind):
            want = repr(text) if text is not None else kind
            got = repr(t.text) if t.kind != "end" else "end of line"
            raise self.error(f"expected {want}, found {got}")
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        if self.tok.text == text and self.tok.kind == "op":
            self.i += 1
            return True
        return False

    def done(self) -> None:
        if self.tok.kind != "end":
            raise self.error(f"unexpected {self.tok.text!r}")

    # -- declarations ----------------------------------------------------------
    def rank_name(self) -> str:
        t = self.take(kind="name")
        if not RANK_RE.match(t.text):
            raise self.error(f"rank name {t.text!r} must be lower case ([a-z_][a-z0-9_]*)", t)
        return t.text

    def decl(self) -> TensorDecl:
        name = self.take(kind="name")
        self.take("[")
        ranks: list[str] = []
        if not self.accept("]"):
            ranks.append(self.rank_name())
            while self.accept(","):
                ranks.append(self.rank_name())
            self.take("]")
        dtype = "float32"
        if self.accept(":"):
            dtype = self.take(kind="name").text
        return TensorDecl(name.text, tuple(ranks), dtype, loc=_at(self.loc, name.col))

    # -- expressions -----------------------------------------------------------
    def expr(self) -> Expr:
        left = self.additive()
        if self.tok.kind == "op" and self.tok.text in _COMPARE:
            op = _INFIX_OPS[self.take().text]
            left = Op(op, (left, self.additive()))
            if self.tok.kind == "op" and self.tok.text in _COMPARE:
                raise self.error("comparisons do not chain; add parentheses")
        return left

    def additive(self) -> Expr:
        left = self.term()
        while self.tok.kind == "op" and self.tok.text in ("+", "-"):
            op = _INFIX_OPS[self.take().text]
            left = Op(op, (left, self.term()))
        return left

    def term(self) -> Expr:
        left = self.unary()
        while self.tok.kind == "op" and self.tok.text in ("*", "/"):
            op = _INFIX_OPS[self.take().text]
            left = Op(op, (left, self.unary()))
        return left

    def unary(self) -> Expr:
        if self.tok.kind == "op" and self.tok.text == "-":
            self.take()
            nxt = self.tok
            if nxt.kind == "num" or (nxt.kind == "name" and nxt.text == "inf"):
                c = self.primary()
                assert isinstance(c, Const)
                return Const(-c.value)
            return Op("neg", (self.unary(),))
        return self.primary()

    def primary(self) -> Expr:
        t = self.tok
        if t.kind == "num":
            self.take()
            is_float = any(ch in t.text for ch in ".eE")
            return Const(float(t.text) if is_float else int(t.text))
        if t.kind == "op" and t.text == "(":
            self.take()
            e = self.expr()
            self.take(")")
            return e
        if t.kind != "name":
            got = repr(t.text) if t.kind != "end" else "end of line"
            raise self.error(f"expected an expression, found {got}")
        self.take()
        if t.text == "inf":
            return Const(math.inf)
        if self.tok.text == "[" and self.tok.kind == "op":
            return Access(t.text, self.index_list())
        if self.tok.text == "(" and self.tok.kind == "op":
            return self.call(t)
        if RANK_RE.match(t.text):
            return Var(t.text)
        if t.text.upper() == t.text and RANK_RE.match(t.text.lower()):
            return Size(t.text.lower())
        raise self.error(
            f"{t.text!r} is neither a rank (lower case), a size (upper case) nor a tensor "
            "(tensors take brackets, e.g. S[])",
            t,
        )

    def call(self, name: _Tok) -> Expr:
        if name.text not in OPS or name.text in INFIX:
            known = ", ".join(sorted(OPS - set(INFIX)))
            raise self.error(f"unknown operator {name.text!r}; known: {known}", name)
        self.take("(")
        args = [self.expr()]
        while self.accept(","):
            args.append(self.expr())
        self.take(")")
        if len(args) != arity(name.text):
            raise self.error(
                f"{name.text} takes {arity(name.text)} argument(s), got {len(args)}", name
            )
        return Op(name.text, tuple(args))

    def index_list(self) -> tuple[Expr, ...]:
        self.take("[")
        out: list[Expr] = []
        if not self.accept("]"):
            out.append(self.expr())
            while self.accept(","):
                out.append(self.expr())
            self.take("]")
        return tuple(out)

    def reduce_spec(self) -> tuple[str, list[str]] | None:
        """``max(m, n)`` at the start of a right side, when an operand follows the ``)``."""
        t = self.tok
        if t.kind != "name" or t.text not in REDUCE_IDENTITY or self.peek().text != "(":
            return None
        j = self.i + 2
        ranks: list[str] = []
        while True:
            tj = self.toks[j]
            if tj.kind != "name" or not RANK_RE.match(tj.text):
                return None
            ranks.append(tj.text)
            if self.toks[j + 1].text == ",":
                j += 2
                continue
            if self.toks[j + 1].text != ")":
                return None
            after = self.toks[j + 2]
            if after.kind in ("name", "num") or after.text in ("(", "-"):
                self.i = j + 2
                return t.text, ranks
            return None


@dataclass
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


def parse_size(text: str, loc: SourceLoc | None = None) -> SizeValue:
    """Parse a size: an int or a sympy expression whose symbols are positive integers."""
    # Every bare name is a size symbol: sympy would otherwise read E as Euler's number,
    # I as the imaginary unit, and N, S, Q or O as functions.
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)) - _SIZE_FUNCTIONS
    local = {n: sympy.Symbol(n, integer=True, positive=True) for n in names}
    try:
        value = parse_expr(text.strip(), local_dict=local, evaluate=True)
    except Exception as exc:  # sympy raises many kinds of errors for bad text
        raise ParseError(
            f"bad size expression {text.strip()!r} ({exc})", loc, where="syntax"
        ) from None
    return normalize_size(value)


def normalize_size(value: object) -> SizeValue:
    if isinstance(value, int):
        return value
    value = sympy.sympify(value)
    if value.is_Integer:
        return int(value)
    return value.xreplace(
        {s: sympy.Symbol(s.name, integer=True, positive=True) for s in value.free_symbols}
    )


def parse(text: str, file: str = "") -> Cascade:
    """Parse the text form; errors name the line and column."""
    inputs: list[TensorDecl] = []
    outputs: list[str] = []
    sizes: list[tuple[str, SizeValue]] = []
    partitions: list[Partition] = []
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
                    raise ParseError("expected rank=size", _at(loc, col), where="syntax")
                name, size = piece.split("=", 1)
                if not RANK_RE.match(name.strip()):
                    raise ParseError(
                        f"rank name {name.strip()!r} must be lower case",
                        _at(loc, col),
                        where="syntax",
                    )
                size_col = rest_col + off + len(name) + 2 + len(size) - len(size.lstrip())
                sizes.append((name.strip(), parse_size(size, _at(loc, size_col))))
            continue
        p = _LineParser(_tokenize(line, loc), loc)
        if head == "inputs":
            p.take("inputs")
            inputs.append(p.decl())
            while p.accept(","):
                inputs.append(p.decl())
            p.done()
        elif head == "outputs":
            p.take("outputs")
            outputs_loc = loc
            outputs.append(p.take(kind="name").text)
            while p.accept(","):
                outputs.append(p.take(kind="name").text)
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
                Partition(rank, outer, inner, parse_size(line[by.col + 1 :], _at(loc, by.col)))
            )
        else:
            stmts.append(_parse_stmt(p, loc))
    einsums = _attach_inits(stmts)
    if not outputs:
        raise ParseError("no 'outputs' line: name the tensors the cascade returns", where="syntax")
    del outputs_loc
    return Cascade(tuple(inputs), tuple(einsums), tuple(outputs), tuple(sizes), tuple(partitions))


def _parse_stmt(p: _LineParser, loc: SourceLoc) -> _Stmt:
    name = p.take(kind="name")
    indices = p.index_list() if p.tok.text == "[" else ()
    p.take("=")
    spec = p.reduce_spec()
    expr = p.expr()
    p.done()
    reduce, listed = spec if spec else ("sum", None)
    return _Stmt(name.text, indices, expr, reduce, listed, _at(loc, name.col))


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
