"""What the three overlap passes share: their reports, fresh names, and token-rank facts.

``reorder-norm``, ``split-tokens`` and ``chunk-collective`` each decide per collective (or per
cascade) whether they apply; a decision records why, as ``fuse``'s report does, so ``explain``
and the tests can say which legality condition failed rather than "no match".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

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
# it gets the cascade and the target's name and returns the value, or None for "does not pay",
# alone or with the cost model's why: ``(4, "4 chunks: 521.0 us -> 430.5 us ...")``.
Chosen = int | None | tuple[int | None, str]
Chooser = Callable[[Cascade, str], Chosen]
Verdict = bool | tuple[bool, str]  # what a ``pays(cascade, collective)`` veto returns

# Choosers by kind ("chunks", "offset", "pays"): factory(target, **options) -> chooser. The
# cost model's side (``einfuse.cost_model.overlap_choice``) fills it when first asked, so the
# passes import nothing of the cost model.
_CHOOSERS: dict[str, Callable[..., Callable[[Cascade, str], Any]]] = {}
_CHOOSER_MODULE = "einfuse.cost_model.overlap_choice"
# The target `auto` options price against when a pass has no ``cost=`` option of its own
# (``einfuse explain --target`` and the autotuner's pricing set it: ``cost_target``).
_COST_TARGET: ContextVar[object | None] = ContextVar("einfuse_cost_target", default=None)


def register_chooser(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        _CHOOSERS[kind] = factory
        return factory

    return deco


@contextmanager
def cost_target(target: object | None) -> Iterator[None]:
    """Run passes whose ``auto`` options are priced on ``target`` (a name or a Target)."""
    token = _COST_TARGET.set(target)
    try:
        yield
    finally:
        _COST_TARGET.reset(token)


def chooser_for(pass_name: str, option: str, kind: str, cost: object, **options: Any) -> Any:
    """The cost model's chooser of ``kind`` on ``cost`` (else the context's target)."""
    target = cost or _COST_TARGET.get()
    if not target:
        raise needs_cost_model(pass_name, option)
    if kind not in _CHOOSERS:
        importlib.import_module(_CHOOSER_MODULE)
    return _CHOOSERS[kind](target, **options)


def unpack(result: Any) -> tuple[Any, str]:
    """A chooser's answer as (value, why); a bare value has no why."""
    if isinstance(result, tuple):
        return result[0], str(result[1])
    return result, ""


def not_paying(why: str) -> str:
    """A decision's reason when the cost model says no (its own "not applied: " dropped)."""
    why = why.removeprefix("not applied: ")
    return f"the cost model says it does not pay{': ' if why else ''}{why}"


def needs_cost_model(pass_name: str, option: str) -> OverlapError:
    return OverlapError(
        f"{pass_name}: {option}=auto needs the cost model's target: add cost=h100 (or another "
        f"target), run it inside cost_target(target) (explain --target does), or give {option}=N"
    )


def int_option(pass_name: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OverlapError(f"{pass_name}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def int_size(c: Cascade, rank: str) -> int | None:
    """A rank's size when it is a bound integer (the rewrites need concrete counts)."""
    size = c.size(rank)
    return int(size) if isinstance(size, int | sympy.Integer) else None


fresh = unique_name  # a name not in ``taken``


def taken_names(c: Cascade) -> set[str]:
    """Every tensor and rank name (upper-cased too: a rank's size is its upper-case name)."""
    names = {t.name for t in c.inputs} | {e.output for e in c.einsums}
    ranks = set(c.all_ranks()) | {r for r, _ in c.devices}
    return names | ranks | {r.upper() for r in ranks}


def flat(outer: Expr, inner: str) -> Expr:
    """``outer*T0 + t0``: the global index of shard row ``t0`` of block ``outer``."""
    return Op("add", (Op("mul", (outer, Size(inner))), Var(inner)))


def replace_reads(expr: Expr, fn: Callable[[Access], Expr | None]) -> Expr:
    """Rewrite tensor reads (``fn`` returns the new expression, or None to keep a read)."""
    return substitute(expr, lambda x: fn(x) if isinstance(x, Access) else None)
