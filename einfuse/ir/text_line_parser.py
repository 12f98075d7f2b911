"""Recursive descent over one line's tokens: declarations, map expressions, reductions.

Precedence, loosest first: one comparison (they do not chain), then ``+ -``, ``* /``, unary
minus, and primaries (numbers, ``inf``, ``T[...]`` accesses, ``op(...)`` calls, ranks, sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from einfuse.ir.cascade import SourceLoc, TensorDecl
from einfuse.ir.errors import ParseError
from einfuse.ir.expr import (
    INFIX,
    OPS,
    REDUCE_IDENTITY,
    Access,
    Const,
    Expr,
    Op,
    Size,
    Var,
    arity,
)
from einfuse.ir.text_lexer import RANK_RE, Token, at_column

_INFIX_OPS = {v: k for k, v in INFIX.items()}
_COMPARE = {"<", "<=", ">", ">=", "==", "!="}
_Item = TypeVar("_Item")


class LineParser:
    """Recursive descent over one line's tokens."""

    def __init__(self, toks: list[Token], loc: SourceLoc) -> None:
        self.toks, self.i, self.loc = toks, 0, loc

    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def error(self, msg: str, tok: Token | None = None) -> ParseError:
        t = tok or self.tok
        return ParseError(msg, at_column(self.loc, t.col), where="syntax")

    def take(self, text: str | None = None, kind: str | None = None) -> Token:
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

    def comma_separated(self, item: Callable[[], _Item]) -> list[_Item]:
        """One or more things, each read by ``item``, separated by commas."""
        items = [item()]
        while self.accept(","):
            items.append(item())
        return items

    def bracketed(self, item: Callable[[], _Item]) -> list[_Item]:
        """``[a, b, ...]`` or ``[]``, each element read by ``item``."""
        self.take("[")
        if self.accept("]"):
            return []
        items = self.comma_separated(item)
        self.take("]")
        return items

    # -- declarations ----------------------------------------------------------
    def rank_name(self) -> str:
        t = self.take(kind="name")
        if not RANK_RE.match(t.text):
            raise self.error(f"rank name {t.text!r} must be lower case ([a-z_][a-z0-9_]*)", t)
        return t.text

    def device_binding(self) -> tuple[str, str]:
        """``x on tp``: rank ``x`` is the position along mesh axis ``tp``."""
        rank = self.rank_name()
        self.take("on", kind="name")
        return rank, self.take(kind="name").text

    def tensor_name(self) -> str:
        return self.take(kind="name").text

    def decl(self) -> TensorDecl:
        name = self.take(kind="name")
        ranks = self.bracketed(self.rank_name)
        dtype = "float32"
        if self.accept(":"):
            dtype = self.take(kind="name").text
        return TensorDecl(name.text, tuple(ranks), dtype, loc=at_column(self.loc, name.col))

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
        return self._left_associative(("+", "-"), self.term)

    def term(self) -> Expr:
        return self._left_associative(("*", "/"), self.unary)

    def _left_associative(self, ops: tuple[str, ...], operand: Callable[[], Expr]) -> Expr:
        """``a op b op c`` as ``(a op b) op c``, for one precedence level's operators."""
        left = operand()
        while self.tok.kind == "op" and self.tok.text in ops:
            op = _INFIX_OPS[self.take().text]
            left = Op(op, (left, operand()))
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

    def call(self, name: Token) -> Expr:
        if name.text not in OPS or name.text in INFIX:
            known = ", ".join(sorted(OPS - set(INFIX)))
            raise self.error(f"unknown operator {name.text!r}; known: {known}", name)
        self.take("(")
        args = self.comma_separated(self.expr)
        self.take(")")
        if len(args) != arity(name.text):
            raise self.error(
                f"{name.text} takes {arity(name.text)} argument(s), got {len(args)}", name
            )
        return Op(name.text, tuple(args))

    def index_list(self) -> tuple[Expr, ...]:
        return tuple(self.bracketed(self.expr))

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
