"""Rank sizes as text: ints or sympy expressions whose symbols are positive integers.

Sizes are parsed with sympy rather than the line parser because they may use ``ceiling``,
``floor``, ``Max`` and ``Min`` and must simplify (``ceiling(M/256)``) the way sympy does.
"""

from __future__ import annotations

import re

import sympy
from sympy.parsing.sympy_parser import parse_expr

from einfuse.ir.cascade import SizeValue, SourceLoc
from einfuse.ir.errors import ParseError

_SIZE_FUNCTIONS = {"ceiling", "floor", "Max", "Min"}


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
    """An int where the value is one, else the expression with positive-integer symbols.

    Symbols made elsewhere (``sympy.Symbol("M")``) carry no assumptions; replacing them keeps
    equal sizes equal and lets sympy simplify ``ceiling`` and ``Max`` of sizes.
    """
    if isinstance(value, int):
        return value
    value = sympy.sympify(value)
    if value.is_Integer:
        return int(value)
    return value.xreplace(
        {s: sympy.Symbol(s.name, integer=True, positive=True) for s in value.free_symbols}
    )


def format_size(s: SizeValue) -> str:
    """The text of a size; sympy prints expressions in a form ``parse_size`` reads back."""
    return str(s)
