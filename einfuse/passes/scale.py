"""Scale analysis: may a chain use a running max in place of the global max ``G``?

FuseMax's online softmax evaluates ``exp(x - G)`` against the max *so far*, ``M_k``,
and fixes the partial sums up as the max grows. That is exact only for values whose
dependence on ``G`` is one of:

- **affine**: ``u + k*G`` (the argument ``x - G`` of an exponential),
- **scaled**: ``u * exp(-c*G)`` (``exp(x - G)``, and products, quotients, masks of such),

where ``u`` does not depend on ``G``. A scaled value computed against ``M_k`` is off by
exactly ``exp(c*(G - M_k))``: a running sum of such values can be corrected step by step
by ``exp(c*(M_old - M_new))``. Anything else (``G`` read as a plain value, ``exp`` of a
scaled value, a sum of shifted values) is not fusable, and the analysis says why.

``Dep`` records the dependence of one expression; ``analyze_chain`` runs the rules over
every Einsum that reads ``G`` (directly or through others) and plans the rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from einfuse.ir.cascade import Cascade, Einsum, Partition
from einfuse.ir.expr import (
    CAST_OPS,
    Access,
    Const,
    Expr,
    Op,
    Size,
    Var,
    accesses,
    rank_vars,
    shifted_rank,
)

FREE, AFFINE, SCALED = "free", "affine", "scaled"


class NotFusable(Exception):
    """Why a chain cannot run in one pass; the message is the user-facing reason."""


@dataclass(frozen=True, slots=True)
class Dep:
    """How a value depends on ``G``: free of it, ``u + coef*G[at]`` or ``u*exp(-coef*G[at])``."""

    kind: str = FREE
    coef: float = 0.0
    at: tuple[Expr, ...] = ()  # the element of G, as index expressions of the reader


NO_DEP = Dep()


@dataclass(frozen=True, slots=True)
class MaxSource:
    """What plays ``G``: a max reduction over ``rank``, or a running max read at its end.

    The 2-pass attention form has no max reduction; its second pass reads the running
    max ``RM[M1, p]`` of the first, which is the global max all the same.
    """

    tensor: str
    rank: str  # the outer rank the loop runs over (m1)
    out: tuple[Expr, ...]  # G's own indices (plain ranks), without the iterative one
    running_dim: int | None = None  # the iterative dim when G is a running max

    def read_at(self, a: Access) -> tuple[Expr, ...] | None:
        """The element of G that ``a`` reads, or None when ``a`` does not read G."""
        if a.tensor != self.tensor:
            return None
        d = self.running_dim
        if d is None:
            return a.indices
        if a.indices[d] != Size(self.rank):
            return None
        return a.indices[:d] + a.indices[d + 1 :]


def max_sources(c: Cascade, p: Partition) -> list[MaxSource]:
    """Max reductions over the outer rank, and running maxima read at their last step."""
    r1, out = p.outer, []
    for e in c.einsums:
        if e.reduce == "max" and not e.is_recurrence and r1 in e.reduced_ranks:
            if p.inner not in e.output_ranks:
                out.append(MaxSource(e.output, r1, e.indices))
        elif e.iterative_rank == r1 and e.init == Const(-math.inf):
            dim = e.iterative_dim
            assert dim is not None
            prev = list(e.indices)
            prev[dim] = Var(r1)
            args = e.expr.args if isinstance(e.expr, Op) and e.expr.op == "max" else ()
            if Access(e.output, tuple(prev)) in args:
                rest = e.indices[:dim] + e.indices[dim + 1 :]
                out.append(MaxSource(e.output, r1, rest, running_dim=dim))
    return out


# --------------------------------------------------------------------------- expression rules
def dep_of(expr: Expr, src: MaxSource, read: Callable[[Access], Dep]) -> Dep:
    """The dependence of ``expr`` on G; ``read`` gives that of other tensors' reads."""
    if isinstance(expr, Const | Var | Size):
        return NO_DEP
    if isinstance(expr, Access):
        at = src.read_at(expr)
        if at is None:
            return read(expr)
        if src.rank in {r for i in at for r in rank_vars(i)}:
            raise NotFusable(f"{expr} reads {src.tensor} at an index that moves with {src.rank}")
        return Dep(AFFINE, 1.0, at)
    assert isinstance(expr, Op)
    deps = [dep_of(a, src, read) for a in expr.args]
    if all(d.kind == FREE for d in deps):
        return NO_DEP
    rule = _RULES.get(expr.op)
    out = rule(expr.args, deps) if rule is not None else None
    if out is None:
        raise NotFusable(
            f"{src.tensor} flows through {expr.op}(...) in {expr}: a running max can stand "
            "in for it only inside exp(x - max) and products or quotients of such"
        )
    return out


def _const(e: Expr) -> float | None:
    return float(e.value) if isinstance(e, Const) else None


def _same(a: Dep, b: Dep) -> Dep | None:
    return a if a == b else None


def _neg(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    (x,) = d
    return Dep(AFFINE, -x.coef, x.at) if x.kind == AFFINE else x


def _add(args: tuple[Expr, ...], d: list[Dep], sign: float = 1.0) -> Dep | None:
    a, b = d
    if SCALED in (a.kind, b.kind):  # u*e + 0, or two terms scaled alike
        if _const(args[1]) == 0:
            return a
        if _const(args[0]) == 0:
            return b if sign > 0 else _neg(args[1:], [b])
        return _same(a, b)
    if a.kind == b.kind == AFFINE and a.at != b.at:
        return None
    k = a.coef + sign * b.coef
    return Dep(AFFINE, k, a.at or b.at) if k != 0 else NO_DEP


def _sub(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    return _add(args, d, -1.0)


def _mul(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    a, b = d
    if a.kind == FREE or b.kind == FREE:
        (dep, other) = (b, args[0]) if a.kind == FREE else (a, args[1])
        if dep.kind == SCALED:
            return dep
        k = _const(other)  # an affine value may only be scaled by a constant
        return Dep(AFFINE, dep.coef * k, dep.at) if k else None
    if a.kind == b.kind == SCALED and a.at == b.at:
        c = a.coef + b.coef
        return Dep(SCALED, c, a.at) if c != 0 else NO_DEP
    return None


def _div(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    a, b = d
    if b.kind == FREE:
        if a.kind == SCALED:
            return a
        k = _const(args[1])
        return Dep(AFFINE, a.coef / k, a.at) if k else None
    if b.kind == SCALED and a.kind in (FREE, SCALED) and (a.kind == FREE or a.at == b.at):
        c = a.coef - b.coef
        return Dep(SCALED, c, b.at) if c != 0 else NO_DEP
    return None


def _exp(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    (x,) = d
    return Dep(SCALED, -x.coef, x.at) if x.kind == AFFINE else None


def _log(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    (x,) = d
    return Dep(AFFINE, -x.coef, x.at) if x.kind == SCALED else None


def _power(p: float) -> Callable[[tuple[Expr, ...], list[Dep]], Dep | None]:
    def rule(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
        (x,) = d
        if x.kind != SCALED:
            return None
        return Dep(SCALED, x.coef * p, x.at) if p != 0 else NO_DEP

    return rule


def _pow(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    p = _const(args[1])
    return _power(p)(args[:1], d[:1]) if p is not None and d[1].kind == FREE else None


def _abs(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    return d[0] if d[0].kind == SCALED else None  # |u*e| = |u|*e, as e > 0


def _either(args: tuple[Expr, ...], d: list[Dep], absorbing: set[float]) -> Dep | None:
    """Two alternatives (where, max, min) agree on their dependence, or one is a constant
    that every shift or scaling leaves alone: 0 for scaled values, +-inf for shifted ones."""
    a, b = d
    if a == b:
        return a
    for dep, other, k in ((a, b, _const(args[1])), (b, a, _const(args[0]))):
        if other.kind != FREE or k is None:
            continue
        if (dep.kind == SCALED and k == 0 and 0.0 in absorbing) or (
            dep.kind == AFFINE and math.isinf(k) and k in absorbing
        ):
            return dep
    return None


def _where(args: tuple[Expr, ...], d: list[Dep]) -> Dep | None:
    if d[0].kind != FREE:
        return None
    return _either(args[1:], d[1:], {0.0, math.inf, -math.inf})


_RULES: dict[str, Callable[[tuple[Expr, ...], list[Dep]], Dep | None]] = {
    "neg": _neg,
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "exp": _exp,
    "log": _log,
    "sqrt": _power(0.5),
    "rsqrt": _power(-0.5),
    "pow": _pow,
    "abs": _abs,
    "where": _where,
    # max(u*e, v*e) = max(u, v)*e and max(u + kG, v + kG) = max(u, v) + kG
    "max": lambda args, d: _either(args, d, {0.0, -math.inf, math.inf}),
    "min": lambda args, d: _either(args, d, {0.0, -math.inf, math.inf}),
    # A cast is the identity in real arithmetic: the rewrite keeps it where it stands.
    **{op: (lambda args, d: d[0]) for op in CAST_OPS},
}


# --------------------------------------------------------------------------- tensors
@dataclass(frozen=True, slots=True)
class TensorDep:
    """A tensor's dependence on G; ``dims`` are its dims that index G's dims, in order."""

    kind: str
    coef: float
    dims: tuple[int, ...]

    def read(self, a: Access) -> Dep:
        return Dep(self.kind, self.coef, tuple(a.indices[d] for d in self.dims))


def reduce_dep(e: Einsum, d: Dep) -> Dep:
    """Reductions keep the dependence when G is constant along them and the operator
    commutes with it: sums of scaled values, max/min of anything (exp > 0)."""
    if d.kind == FREE or not e.reduced_ranks:
        return d
    moving = set(e.reduced_ranks) & {r for i in d.at for r in rank_vars(i)}
    if moving:
        raise NotFusable(f"{e.output}: the max it depends on varies with reduced {sorted(moving)}")
    if e.reduce in ("max", "min") or (e.reduce == "sum" and d.kind == SCALED):
        return d
    what = "shifted by" if d.kind == AFFINE else "scaled by"
    raise NotFusable(f"{e.output}: a {e.reduce} over values {what} the max is not correctable")


def tensor_dep(e: Einsum, d: Dep) -> TensorDep | None:
    """Express ``d`` through ``e``'s output dims, or raise when G's index is not one of them."""
    if d.kind == FREE:
        return None
    dims = []
    for i in d.at:
        if not isinstance(i, Var) or Var(i.rank) not in e.indices:
            raise NotFusable(f"{e.output} depends on the max at {i}, which is not one of its ranks")
        dims.append(e.indices.index(i))
    return TensorDep(d.kind, d.coef, tuple(dims))


# --------------------------------------------------------------------------- the chain
class Avail(Enum):
    FREE = "free"  # ready before the loop
    STREAM = "stream"  # produced step by step along the loop rank
    DONE = "done"  # complete only after the loop


@dataclass
class ChainPlan:
    """What the online rewrite must do for one G."""

    src: MaxSource
    loop: set[str] = field(default_factory=set)  # Einsums in the loop that depend on G
    running: dict[str, TensorDep] = field(default_factory=dict)  # sums over the loop rank

    @property
    def scales(self) -> list[float]:
        return sorted({d.coef for d in self.running.values()})


def analyze_chain(c: Cascade, src: MaxSource) -> ChainPlan:
    """Check every Einsum that depends on G and plan the rewrite; raise NotFusable if not."""
    r1 = src.rank
    avail = {t.name: Avail.FREE for t in c.inputs}
    deps: dict[str, TensorDep] = {}
    desc: set[str] = set()
    plan = ChainPlan(src)

    def read(a: Access) -> Dep:
        td = deps.get(a.tensor)
        return td.read(a) if td is not None else NO_DEP

    for e in c.einsums:
        reads = [a for a in accesses(e.expr) if a.tensor != e.output]
        init_reads = accesses(e.init) if e.init is not None else []
        avail[e.output] = _avail(e, r1, [avail[a.tensor] for a in reads + init_reads])
        if e.output == src.tensor:
            _check_source_map(e, src, reads, avail)
            continue
        if not any(src.read_at(a) is not None or a.tensor in desc for a in reads + init_reads):
            continue
        desc.add(e.output)
        if e.init is not None and r1 in e.ranks:
            raise NotFusable(f"recurrence {e.output} depends on the max of {src.tensor}")
        if r1 not in e.ranks:  # after the loop: may read G and sums, not rescaled values
            for a in reads:
                if a.tensor in deps:
                    raise NotFusable(
                        f"{e.output} reads {a.tensor} after the loop over {r1}, "
                        "but inside the loop it is computed against a running max"
                    )
            continue
        for a in reads:
            _check_loop_read(c, e, a, src, avail)
        d = dep_of(e.expr, src, read)
        plan.loop.add(e.output)
        if r1 in e.output_ranks:
            td = tensor_dep(e, reduce_dep(e, d))
            if td is not None:
                deps[e.output] = td
        elif d.kind != FREE:
            if e.reduce != "sum" or d.kind != SCALED:
                raise NotFusable(
                    f"{e.output}: a {e.reduce} over {r1} of values "
                    f"{'shifted' if d.kind == AFFINE else 'scaled'} by the max "
                    "has no running correction"
                )
            td = tensor_dep(e, reduce_dep(e, d))
            assert td is not None
            plan.running[e.output] = td
    for o in c.outputs:
        if o in deps:
            raise NotFusable(f"output {o} is computed against the max inside the loop over {r1}")
    return plan


def _avail(e: Einsum, r1: str, reads: list[Avail]) -> Avail:
    if r1 in e.output_ranks:
        return Avail.STREAM
    if r1 in e.ranks or any(a is not Avail.FREE for a in reads):
        return Avail.DONE
    return Avail.FREE


def _check_source_map(e: Einsum, src: MaxSource, reads: list[Access], avail: dict) -> None:
    for a in reads:
        if avail[a.tensor] is Avail.DONE:
            raise NotFusable(
                f"the max {src.tensor} reads {a.tensor}, which is complete only "
                f"after a whole pass over {src.rank}"
            )


def _check_loop_read(c: Cascade, e: Einsum, a: Access, src: MaxSource, avail: dict) -> None:
    """Inside the loop, reads must follow the loop rank; only G may be read whole."""
    r1 = src.rank
    if src.read_at(a) is not None:
        return
    if avail[a.tensor] is Avail.DONE:
        raise NotFusable(
            f"{e.output} reads {a.tensor} inside the loop over {r1}, but "
            f"{a.tensor} is complete only after a whole pass over {r1}"
        )
    if avail[a.tensor] is Avail.STREAM:
        ranks = c.tensor_ranks(a.tensor)
        for d, i in enumerate(a.indices):
            if ranks[d] == r1 and shifted_rank(i) not in ((r1, 0), (r1, 1)):
                raise NotFusable(f"{e.output} reads {a} at another step of {r1} than its own")
