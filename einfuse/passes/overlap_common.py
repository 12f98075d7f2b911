"""What the three overlap passes share: their reports, fresh names, and token-rank facts.

``reorder-norm``, ``split-tokens`` and ``chunk-collective`` each decide per collective (or per
cascade) whether they apply; a decision records why, as ``fuse``'s report does, so ``explain``
and the tests can say which legality condition failed rather than "no match".
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import sympy

from einfuse.ir.cascade import Cascade
from einfuse.ir.errors import EinfuseError
from einfuse.ir.expr import Access, Expr, Op, Size, Var, substitute
from einfuse.passes.defer import unique_name


class OverlapError(EinfuseError):
    """An overlap pass was given an option it cannot honour (as opposed to a refusal)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One pass's verdict on one target (a collective, or the cascade's token rank)."""

    target: str
    applied: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.target}: {'applied' if self.applied else 'not applied'}: {self.reason}"


@dataclass(frozen=True, slots=True)
class OverlapReport:
    pass_name: str
    decisions: tuple[Decision, ...]

    @property
    def applied(self) -> bool:
        return any(d.applied for d in self.decisions)

    def explain(self) -> str:
        lines = [f"{self.pass_name}: {d}" for d in self.decisions]
        return "\n".join(lines) or f"{self.pass_name}: no collective to consider"


# A chooser fills an option the caller left as "auto" (chunks, offset) from the cost model;
# it gets the cascade and the target's name and returns the value, or None for "does not pay".
Chooser = Callable[[Cascade, str], int | None]


def needs_cost_model(pass_name: str, option: str) -> OverlapError:
    return OverlapError(
        f"{pass_name}: {option}=auto needs the cost model (einfuse.cost_model.overlap); "
        f"give {option}=N, or call the pass's *_with_report with a chooser"
    )


def int_option(pass_name: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OverlapError(f"{pass_name}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def int_size(c: Cascade, rank: str) -> int | None:
    """A rank's size when it is a bound integer (the rewrites need concrete counts)."""
    size = c.size(rank)
    return int(size) if isinstance(size, int | sympy.Integer) else None


def fresh(base: str, taken: Collection[str]) -> str:
    return unique_name(base, set(taken))


def taken_names(c: Cascade) -> set[str]:
    """Every tensor and rank name (upper-cased too: a rank's size is its upper-case name)."""
    names = {t.name for t in c.inputs} | {e.output for e in c.einsums}
    ranks = set(c.all_ranks()) | {r for r, _ in c.devices}
    return names | ranks | {r.upper() for r in ranks}


def flat(outer: Expr, inner: str, inner_size: str) -> Expr:
    """``outer*T0 + t0``: the global index of shard row ``t0`` of block ``outer``."""
    return Op("add", (Op("mul", (outer, Size(inner_size))), Var(inner)))


def replace_reads(expr: Expr, fn: Callable[[Access], Expr | None]) -> Expr:
    """Rewrite tensor reads (``fn`` returns the new expression, or None to keep a read)."""
    return substitute(expr, lambda x: fn(x) if isinstance(x, Access) else None)
