"""Tokens of one line of the IR's text form, with 1-based columns for error carets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from einfuse.ir.cascade import SourceLoc
from einfuse.ir.errors import ParseError

RANK_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op><=|>=|==|!=|->|[\[\](),=+\-*/<>:]))"
)


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # num | name | op | end
    text: str
    col: int  # 1-based


def tokenize(line: str, loc: SourceLoc) -> list[Token]:
    """The tokens of ``line``, ending in an ``end`` token placed just past its last character."""
    toks: list[Token] = []
    pos = 0
    while pos < len(line):
        if line[pos:].strip() == "":
            break
        m = _TOKEN.match(line, pos)
        if m is None or m.end() == pos:
            bad = len(line[pos:]) - len(line[pos:].lstrip()) + pos
            raise ParseError(
                f"unexpected character {line[bad]!r}", at_column(loc, bad + 1), where="syntax"
            )
        kind = m.lastgroup or "op"
        toks.append(Token(kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    toks.append(Token("end", "", len(line.rstrip()) + 1))
    return toks


def at_column(loc: SourceLoc, col: int) -> SourceLoc:
    """``loc`` moved to column ``col`` of the same line, so an error's caret points there."""
    return SourceLoc(loc.line, col, loc.text, loc.file)
