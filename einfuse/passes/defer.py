"""Division deferral: hoist factors that do not vary with a sum's reduced ranks out of it.

``AV[f, p] = A[m, p] * V[f, m]`` with ``A[m, p] = SN[m, p] / SD[p]`` divides every
probability before the contraction. Since ``SD[p]`` does not vary with ``m``, the sum
can run over the numerator alone and divide once afterwards::

    SNV[f, p] = SN[m, p] * V[f, m]
    AV[f, p]  = SNV[f, p] / SD[p]

This is FuseMax's "deferred" attention, and more than a saving: the contraction no
longer reads ``SD``, which is complete only after a whole pass over ``m``, so it can run
in the same pass as ``SD`` itself. To see the factors, the pass inlines elementwise
producers read by the sum (``A`` above, or a broadcast ``SDB[m, p] = SD[p]``) when that
exposes a hoistable factor, and looks through masks ``where(c, x, 0)``. It applies only
to sums: ``max`` does not distribute over a quotient's sign. Hoisting reassociates
floating-point arithmetic, so results change by rounding only.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.dtypes import cast
from einfuse.ir.expr import (
    CAST_OPS,
    Access,
    Const,
    Expr,
    Op,
    Var,
    accesses,
    rank_vars,
    rename_ranks,
)
from einfuse.passes.dce import remove_unread
from einfuse.passes.manager import register_pass


@register_pass("defer-division")
def defer_division(c: Cascade, rank: str = "") -> Cascade:
    """Hoist rank-free factors out of sums (only sums over ``rank`` when it is given).

    A partitioned rank may be named by its original name (``m`` for ``m1``, ``m0``).
    """
    return defer(c, related_ranks(c, rank) if rank else None)


def related_ranks(c: Cascade, rank: str) -> frozenset[str]:
    """``rank`` and, when it was partitioned, its outer and inner ranks."""
    out = {rank}
    for p in c.partitions:
        if rank in (p.rank, p.outer):
            out |= {p.outer, p.inner}
    return frozenset(out)


def defer(c: Cascade, ranks: Collection[str] | None = None) -> Cascade:
    """Defer every eligible sum in order; producers inlined away and left unread are dropped."""
    writers = {e.output: e for e in c.einsums}
    taken = {t.name for t in c.inputs} | set(writers)
    out: list[Einsum] = []
    inlined: set[str] = set()
    for e in c.einsums:
        if _eligible(e, ranks):
            split = _Split.of(e.expr, frozenset(e.reduced_ranks), writers)
            new = _hoist(e, split, taken)
            if new is not None:
                out.extend(new)
                writers.update((n.output, n) for n in new)
                inlined |= split.inlined
                continue
        out.append(e)
    if len(out) == len(c.einsums):
        return c
    return remove_unread(c.with_einsums(out), only=inlined)


def _eligible(e: Einsum, ranks: Collection[str] | None) -> bool:
    if e.reduce != "sum" or e.is_recurrence or not e.reduced_ranks:
        return False
    return ranks is None or bool(set(e.reduced_ranks) & set(ranks))


@dataclass
class _Split:
    """A map as ``prod(kept_num) / prod(kept_den) * prod(free_num) / prod(free_den)``.

    ``free`` factors do not mention the reduced ranks; ``inlined`` names the producers
    whose maps were substituted to find them.
    """

    kept_num: list[Expr] = field(default_factory=list)
    kept_den: list[Expr] = field(default_factory=list)
    free_num: list[Expr] = field(default_factory=list)
    free_den: list[Expr] = field(default_factory=list)
    inlined: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, expr: Expr, reduced: frozenset[str], writers: dict[str, Einsum]) -> _Split:
        if not set(rank_vars(expr)) & reduced:
            return cls(free_num=[expr])
        if isinstance(expr, Op) and expr.op in ("mul", "div"):
            a, b = (cls.of(x, reduced, writers) for x in expr.args)
            return a.times(b if expr.op == "mul" else b.inverse())
        if isinstance(expr, Op) and expr.op == "neg":
            inner = cls.of(expr.args[0], reduced, writers)
            negated = Op("neg", (product(inner.kept_num),))
            return cls([negated], inner.kept_den, inner.free_num, inner.free_den, inner.inlined)
        if isinstance(expr, Op) and expr.op == "where":
            return cls._masked(expr, reduced, writers)
        if isinstance(expr, Op) and expr.op in CAST_OPS:
            return cls._cast(expr, reduced, writers)
        if isinstance(expr, Access):
            inlined = cls._inline(expr, reduced, writers)
            if inlined is not None:
                return inlined
        return cls(kept_num=[expr])

    @classmethod
    def _masked(cls, expr: Op, reduced: frozenset[str], writers: dict[str, Einsum]) -> _Split:
        """``where(c, n * f, 0) = where(c, n, 0) * f``: the mask stays with the kept part."""
        cond, a, b = expr.args
        zero_first = _is_zero(a)
        if not (_is_zero(b) or zero_first):
            return cls(kept_num=[expr])
        inner = cls.of(b if zero_first else a, reduced, writers)
        if not inner.worth_hoisting():
            return cls(kept_num=[expr])
        kept = quotient(product(inner.kept_num), inner.kept_den)
        masked = Op("where", (cond, Const(0.0), kept) if zero_first else (cond, kept, Const(0.0)))
        return cls([masked], [], inner.free_num, inner.free_den, inner.inlined)

    @classmethod
    def _cast(cls, expr: Op, reduced: frozenset[str], writers: dict[str, Einsum]) -> _Split:
        """``bfloat16(n / d) = bfloat16(n) / d`` up to where it rounds: the cast stays with the
        kept part (a bfloat16 ``P`` before ``P V``, as flash kernels round it), the free
        factors move out in the dtype they have."""
        inner = cls.of(expr.args[0], reduced, writers)
        if not inner.worth_hoisting():
            return cls(kept_num=[expr])
        kept = cast(expr.op, quotient(product(inner.kept_num), inner.kept_den))
        return cls([kept], [], inner.free_num, inner.free_den, inner.inlined)

    @classmethod
    def _inline(
        cls, a: Access, reduced: frozenset[str], writers: dict[str, Einsum]
    ) -> _Split | None:
        """Substitute an elementwise producer's map when that exposes a free factor.

        Only reads by plain ranks: they stay inside the producer's extent, where
        recomputing the map gives exactly the stored value.
        """
        w = writers.get(a.tensor)
        if w is None or w.reduced_ranks or w.is_recurrence:
            return None
        if not all(isinstance(i, Var) for i in a.indices):
            return None
        mapping = {r: i for r, i in zip(w.output_ranks, a.indices, strict=True)}
        split = cls.of(rename_ranks(w.expr, mapping), reduced, writers)
        if not split.worth_hoisting():
            return None
        split.inlined.add(a.tensor)
        return split

    def times(self, other: _Split) -> _Split:
        return _Split(
            self.kept_num + other.kept_num,
            self.kept_den + other.kept_den,
            self.free_num + other.free_num,
            self.free_den + other.free_den,
            self.inlined | other.inlined,
        )

    def inverse(self) -> _Split:
        return _Split(self.kept_den, self.kept_num, self.free_den, self.free_num, self.inlined)

    def worth_hoisting(self) -> bool:
        """A free factor that reads a tensor (hoisting constants alone gains nothing)."""
        return any(accesses(f) for f in self.free_num + self.free_den)


def _hoist(e: Einsum, split: _Split, taken: set[str]) -> list[Einsum] | None:
    """``S = sum kept * free`` becomes ``SK = sum kept`` and ``S = SK * free``."""
    if not split.worth_hoisting() or not (split.kept_num or split.kept_den):
        return None
    kept = quotient(product(split.kept_num), split.kept_den)
    used = set(rank_vars(kept))
    if used - set(e.output_ranks) != set(e.reduced_ranks):
        return None  # inlining dropped a reduced rank: the sum would lose a count factor
    name = _sum_name(e.output, kept, taken)
    taken.add(name)
    indices = tuple(Var(r) for r in e.output_ranks if r in used)
    total = Einsum(name, indices, kept, "sum", loc=e.loc)
    free = product([Access(name, indices), *split.free_num])
    return [total, Einsum(e.output, e.indices, quotient(free, split.free_den), loc=e.loc)]


def _sum_name(output: str, kept: Expr, taken: set[str]) -> str:
    """FuseMax's spelling: ``S`` + the tensors summed (``SN * V`` -> ``SNV``)."""
    base = "".join(dict.fromkeys(a.tensor for a in accesses(kept)))
    name = base if base.startswith("S") else f"S{base}"
    if len(name) > 8:
        name = f"S{output}"
    return unique_name(name, taken)


def unique_name(name: str, taken: Collection[str]) -> str:
    """``name``, or ``name_1``, ``name_2``, ... when it is already used."""
    k, out = 0, name
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    return out


def product(factors: list[Expr]) -> Expr:
    if not factors:
        return Const(1.0)
    out = factors[0]
    for f in factors[1:]:
        out = Op("mul", (out, f))
    return out


def quotient(num: Expr, den: list[Expr]) -> Expr:
    for d in den:
        num = Op("div", (num, d))
    return num


def _is_zero(e: Expr) -> bool:
    return isinstance(e, Const) and e.value == 0
