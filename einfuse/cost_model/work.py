"""Counting an Einsum's work: MACs of a contraction, vector ops and transcendentals.

* **matrix**: a sum of products with at least two factors that read tensors is a contraction;
  its MACs are the product of all its iteration ranks. Constant factors (``* 0.125``) are
  applied once, to the smallest of its operands and output, as a compiler folds them;
* **vector**: every other operator, once per point of the ranks it depends on (loop-invariant
  code is hoisted: a mask ``where(m0 < M, SN, 0)`` inside ``SN * V`` is not redone for every
  ``f``), plus one combine per iteration point of a reduction; constant subexpressions fold;
* **transcendental**: ``exp log tanh erf rsqrt sqrt logistic sin cos pow``, counted likewise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from einfuse.ir.cascade import Einsum
from einfuse.ir.expr import Access, Expr, Op, Var, rank_vars

TRANSCENDENTAL_OPS = frozenset(
    {"exp", "log", "tanh", "erf", "rsqrt", "sqrt", "logistic", "sin", "cos", "pow"}
)
OpTerm = tuple[tuple[str, ...], int, int]  # (ranks it depends on, vector ops, transcendentals)


@dataclass(frozen=True, slots=True)
class Work:
    """An Einsum's work: a contraction's MACs cover its whole iteration space; every other
    operator runs once per point of the ranks it depends on (``terms``), as a compiler hoists
    loop-invariant code; ``scale_ops`` counts constant factors of a contraction."""

    macs: int
    terms: tuple[OpTerm, ...]
    scale_ops: int = 0

    def counts(self, sizes: Mapping[str, int]) -> tuple[float, float]:
        """(vector ops, transcendentals) under concrete sizes."""
        vec = trans = 0.0
        for ranks, v, t in self.terms:
            n = math.prod(sizes[r] for r in ranks)
            vec += v * n
            trans += t * n
        return vec, trans


def _is_constant(x: Expr) -> bool:
    return not any(isinstance(n, Access | Var) for n in x.walk())


def _op_terms(x: Expr, out: dict[tuple[str, ...], list[int]]) -> None:
    """Add each operator of ``x`` to ``out`` under the ranks it depends on; constants fold."""
    if not isinstance(x, Op) or _is_constant(x):
        return
    ranks = tuple(sorted(rank_vars(x)))
    slot = out.setdefault(ranks, [0, 0])
    slot[1 if x.op in TRANSCENDENTAL_OPS else 0] += 1
    for a in x.args:
        _op_terms(a, out)


def _factors(x: Expr) -> list[Expr]:
    if isinstance(x, Op) and x.op == "mul":
        return [f for a in x.args for f in _factors(a)]
    return [x]


def _reads_tensor(x: Expr) -> bool:
    return any(isinstance(n, Access) for n in x.walk())


def einsum_work(e: Einsum) -> Work:
    """Count the work of ``e`` by the rules in this module's docstring.

    A sum of products is a contraction when at least two factors read tensors; a factor that
    is an expression (a masked operand, ``where(m < M, SN, 0)``) is prepared once per point of
    its own ranks, and factors beyond two cost a multiply per point.
    """
    terms: dict[tuple[str, ...], list[int]] = {}
    space = tuple(sorted(e.ranks))
    if e.reduce == "sum" and e.reduced_ranks and not e.is_recurrence:
        factors = _factors(e.expr)
        operands = [f for f in factors if _reads_tensor(f)]
        if len(operands) >= 2:
            consts = [f for f in factors if _is_constant(f)]
            for f in factors:
                if f not in consts:
                    _op_terms(f, terms)
            extra = len(factors) - len(consts) - 2
            if extra:
                terms.setdefault(space, [0, 0])[0] += extra
            return Work(1, _freeze(terms), len(consts))
    _op_terms(e.expr, terms)
    if e.reduced_ranks and not e.is_recurrence:
        terms.setdefault(space, [0, 0])[0] += 1
    return Work(0, _freeze(terms))


def _freeze(terms: dict[tuple[str, ...], list[int]]) -> tuple[OpTerm, ...]:
    return tuple((ranks, v, t) for ranks, (v, t) in terms.items() if v or t)
