"""Builds one random valid cascade, Einsum by Einsum, from hypothesis draws.

The builder keeps a pool of readable tensors with the interval of their values; each
*kind* of step (contraction, map, reduction, softmax chain, online softmax, recurrence,
tiling) reads from the pool or declares fresh inputs and adds its outputs. Tensors that
may hold infinities (masked scores, running maxima before step 1) never enter the pool,
so no later Einsum can turn them into NaN. Sinks become the cascade's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hypothesis import strategies as st

from einfuse.ir import Cascade, Einsum, Partition, TensorDecl, verify
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, accesses, rank_vars, size_refs
from tests.strategy_exprs import Draw, ExprGen, Val, pick, scale_down
from tests.strategy_values import TOP, Interval, point

RANK_NAMES = ("i", "j", "k", "l", "m", "n", "p", "q", "h", "f")


@dataclass(frozen=True, slots=True)
class StepKind:
    """One kind of build step: its draw weight, the fewest Einsums it adds, and the step."""

    weight: int
    least: int
    run: Callable[[CascadeBuilder, int], bool]  # (builder, Einsum budget) -> applied?


RANK_LIMIT = 4
NEG_INF = Const(-math.inf)
_INPUT_NAMES = "ABCDEGKLNOPRSUVWXY"


@dataclass(frozen=True, slots=True)
class PoolTensor:
    """A readable tensor: its ranks, value interval and, for recurrences, the step dim."""

    name: str
    ranks: tuple[str, ...]
    iv: Interval
    iterative_dim: int | None = None
    init_iv: Interval | None = None


def plus(r: str, k: int) -> Expr:
    return Op("add", (Var(r), Const(k))) if k >= 0 else Op("sub", (Var(r), Const(-k)))


class CascadeBuilder:
    """Mutable state of one draw; ``build()`` returns the verified cascade."""

    def __init__(
        self,
        draw: Draw,
        *,
        max_ranks: int = 4,
        min_size: int = 2,
        max_size: int = 6,
        safe: bool = True,
    ) -> None:
        self.draw, self.safe = draw, safe
        n = draw(st.integers(2, max(2, max_ranks)))
        names = draw(st.lists(st.sampled_from(RANK_NAMES), min_size=n, max_size=n, unique=True))
        self.sizes: dict[str, int] = {r: draw(st.integers(min_size, max_size)) for r in names}
        self.base_ranks = tuple(names)
        self.inputs: list[TensorDecl] = []
        self.input_kinds: dict[str, str] = {}
        self.einsums: list[Einsum] = []
        self.pool: list[PoolTensor] = []
        self.partitions: list[Partition] = []

    # -- tensors ---------------------------------------------------------------------
    def new_input(self, ranks: tuple[str, ...]) -> PoolTensor:
        """Declare an input; its values are uniform(0.5, 2), with random signs unless positive."""
        k = len(self.inputs)
        name = _INPUT_NAMES[k] if k < len(_INPUT_NAMES) else f"Z{k}"
        positive = self.draw(st.booleans())
        self.inputs.append(TensorDecl(name, ranks))
        self.input_kinds[name] = "positive" if positive else "signed"
        return PoolTensor(name, ranks, Interval(0.5 if positive else -2.0, 2.0))

    def fresh_input(self, in_use: set[str], limit: int, min_ranks: int = 0) -> PoolTensor:
        """A new input over up to three ranks, favouring ranks the Einsum already uses."""
        least = 1 if self.draw(st.integers(0, 3)) else 0
        ranks_st = st.sampled_from(self.base_ranks)
        chosen = self.draw(st.lists(ranks_st, unique=True, min_size=least, max_size=3))
        new = [r for r in chosen if r not in in_use][: max(0, limit - len(in_use))]
        ranks = [r for r in chosen if r in in_use or r in new]
        if len(ranks) < min_ranks:
            ranks.append(min(in_use) if in_use else self.base_ranks[0])
        return self.new_input(tuple(ranks))

    def plain(self, t: PoolTensor) -> Val:
        return Val(Access(t.name, tuple(Var(q) for q in t.ranks)), t.iv)

    def read(self, t: PoolTensor, in_use: set[str]) -> Val:
        """An access to ``t``: mostly plain, sometimes aliased, shifted or at a constant."""
        indices: list[Expr] = []
        iv = t.iv
        for d, r in enumerate(t.ranks):
            if d == t.iterative_dim:
                step_ok = t.init_iv is not None and t.init_iv.finite
                mode = pick(self.draw, [(3, "final"), (2, "next"), (1 if step_ok else 0, "step")])
                if mode == "final":
                    indices.append(Size(r))
                elif mode == "next":
                    indices.append(plus(r, 1))
                else:
                    indices.append(Var(r))
                    iv = iv.hull(t.init_iv or TOP)
                continue
            mode = pick(self.draw, [(12, "plain"), (1, "alias"), (1, "shift"), (1, "const")])
            twins = sorted(
                s for s in in_use | set(t.ranks) if s != r and self.sizes[s] == self.sizes[r]
            )
            if mode == "alias" and twins:
                indices.append(Var(self.draw(st.sampled_from(twins))))
            elif mode == "shift":
                indices.append(plus(r, self.draw(st.sampled_from((1, -1)))))
                iv = iv.hull(point(0.0))  # reads past the end give 0
            elif mode == "const":
                last = Op("sub", (Size(r), Const(1)))
                indices.append(self.draw(st.sampled_from((Const(0), last))))
            else:
                indices.append(Var(r))
        access = Access(t.name, tuple(indices))
        in_use.update(rank_vars(access))
        return Val(access, iv)

    def operand(self, in_use: set[str], limit: int = RANK_LIMIT, min_ranks: int = 0) -> Val:
        """A read of a pool tensor (recent ones first) or of a fresh input."""
        fits = [
            t
            for t in self.pool
            if len(set(t.ranks) | in_use) <= limit and len(t.ranks) >= min_ranks
        ]
        if fits and self.draw(st.integers(0, 3)) > 0:
            t = fits[-1 - self.draw(st.integers(0, len(fits) - 1))]
        else:
            t = self.fresh_input(in_use, limit, min_ranks)
        v = self.read(t, in_use)
        if len(rank_vars(v.expr)) < min_ranks:  # a constant index dropped the rank we need
            v = self.plain(self.fresh_input(in_use, limit, min_ranks))
            in_use.update(rank_vars(v.expr))
        return v

    def expr_gen(self, in_use: set[str], limit: int = RANK_LIMIT) -> ExprGen:
        return ExprGen(
            self.draw,
            operand=lambda: self.operand(in_use, limit),
            in_use=in_use,
            sizes=self.sizes,
            limit=limit,
            safe=self.safe,
        )

    def emit(
        self,
        out: list[str] | tuple[Expr, ...],
        v: Val,
        reduce: str = "sum",
        *,
        init: Expr | None = None,
        poolable: bool = True,
        iterative_dim: int | None = None,
        init_iv: Interval | None = None,
    ) -> PoolTensor:
        """Append an Einsum; plain Einsums are scaled down so stored values stay small."""
        if self.safe and init is None and reduce != "prod":
            v = scale_down(v)
        indices = tuple(Var(r) if isinstance(r, str) else r for r in out)
        name = f"T{len(self.einsums) + 1}"
        self.einsums.append(Einsum(name, indices, v.expr, reduce, init))
        ranks = tuple(rank_vars(i)[0] for i in indices)
        t = PoolTensor(name, ranks, v.iv, iterative_dim, init_iv)
        if poolable and (v.iv.finite or not self.safe):
            self.pool.append(t)
        return t

    def out_order(self, ranks: list[str]) -> list[str]:
        return list(self.draw(st.permutations(ranks))) if self.draw(st.booleans()) else ranks

    def split(self, ranks: list[str]) -> tuple[list[str], list[str]]:
        """Draw which ranks stay on the left; the rest are reduced."""
        keep = [r for r in ranks if self.draw(st.booleans())]
        return keep, [r for r in ranks if r not in keep]

    def count(self, ranks: list[str]) -> int:
        return math.prod(self.sizes[r] for r in ranks)

    # -- kinds -------------------------------------------------------------------------
    def contraction(self, budget: int) -> bool:
        in_use: set[str] = set()
        vals = [self.operand(in_use), self.operand(in_use)]
        if self.draw(st.integers(0, 4)) == 0:
            vals.append(self.operand(in_use))
        g = self.expr_gen(in_use)
        combine = pick(self.draw, [(4, "mul"), (1, "add")])
        v = vals[0]
        for w in vals[1:]:
            v = g.op(combine, v, w)
        keep, reduced = self.split(rank_vars(v.expr))
        reduce = pick(self.draw, [(5 if combine == "mul" else 0, "sum"), (1, "max"), (1, "min")])
        if not reduced:
            reduce = "sum"
        iv = v.iv.summed(self.count(reduced)) if reduce == "sum" else v.iv
        self.emit(self.out_order(keep), Val(v.expr, iv), reduce)
        return True

    def map(self, budget: int) -> bool:
        in_use: set[str] = set()
        v = self.expr_gen(in_use).value(self.draw(st.integers(1, 3)))
        out = self.out_order(rank_vars(v.expr))
        spare = [r for r in self.base_ranks if r not in out]
        if spare and len(out) < RANK_LIMIT and self.draw(st.integers(0, 7)) == 0:
            out.insert(self.draw(st.integers(0, len(out))), self.draw(st.sampled_from(spare)))
        self.emit(out, v)
        return True

    def reduction(self, budget: int) -> bool:
        in_use: set[str] = set()
        g = self.expr_gen(in_use)
        v = g.value(self.draw(st.integers(0, 2)))
        ranks = rank_vars(v.expr)
        if not ranks:
            self.emit([], v)
            return True
        reduce = pick(self.draw, [(3, "sum"), (2, "max"), (2, "min"), (1, "prod")])
        keep, reduced = self.split(ranks)
        if reduce == "prod" or not reduced:
            r = self.draw(st.sampled_from(reduced or ranks))
            keep, reduced = [s for s in ranks if s != r], [r]
        if reduce == "prod":
            n = self.sizes[reduced[0]]
            if self.safe and not (v.iv.lo >= 0.5 and v.iv.hi <= 1.5):
                v = g.op("add", g.op("mul", g.op("tanh", v), g.const(0.5)), g.const(1))
            iv = Interval(v.iv.lo**n, v.iv.hi**n) if self.safe else TOP
        elif reduce == "sum":
            iv = v.iv.summed(self.count(reduced))
        else:
            iv = v.iv
        self.emit(self.out_order(keep), Val(v.expr, iv), reduce)
        return True

    def tiling(self, budget: int) -> bool:
        """Split a rank ``r -> r1, r0`` and read ``X[r1*R0+r0]`` (padded tail reads 0)."""
        cands = [
            (t, r)
            for t in self.pool
            if t.iterative_dim is None
            for r in t.ranks
            if r in self.base_ranks and self.sizes[r] >= 3 and f"{r}0" not in self.sizes
        ]
        if not cands:
            return False
        t, r = self.draw(st.sampled_from(cands))
        n = self.sizes[r]
        tile = self.draw(st.integers(2, n - 1))
        outer, inner, padded = f"{r}1", f"{r}0", n % tile != 0
        self.sizes[inner], self.sizes[outer] = tile, -(-n // tile)
        self.partitions.append(Partition(r, outer, inner, tile))
        flat = Op("add", (Op("mul", (Var(outer), Size(inner))), Var(inner)))
        read = Access(t.name, tuple(flat if q == r else Var(q) for q in t.ranks))
        others = [q for q in t.ranks if q != r]
        if self.draw(st.booleans()):
            iv = t.iv.hull(point(0)) if padded else t.iv
            self.emit(self.out_order([outer, inner, *others]), Val(read, iv))
            return True
        reduce = self.draw(st.sampled_from(("sum", "max", "min")))
        body: Expr = read
        iv = t.iv
        if reduce == "sum":
            iv = (t.iv.hull(point(0)) if padded else t.iv).summed(tile)
        elif padded or self.draw(st.booleans()):
            fill = Const(-math.inf if reduce == "max" else math.inf)
            body = Op("where", (Op("lt", (flat, Size(r))), read, fill))
        tiles = self.emit([outer, *others], Val(body, iv), reduce)
        if budget >= 2 and self.draw(st.booleans()):
            again = Access(tiles.name, tuple(Var(q) for q in tiles.ranks))
            total = tiles.iv.summed(self.sizes[outer]) if reduce == "sum" else tiles.iv
            self.emit(others, Val(again, total), reduce)
        return True

    # -- the whole cascade -------------------------------------------------------------
    def build(self, n_einsums: int, steps: Mapping[str, StepKind]) -> Cascade:
        """Take steps of the given kinds until ``n_einsums`` Einsums exist, then finish."""
        while len(self.einsums) < n_einsums:
            budget = n_einsums - len(self.einsums)
            options = [(k.weight, k) for k in steps.values() if k.least <= budget]
            if not options:
                break
            if not pick(self.draw, options).run(self, budget):
                self.map(budget)
        if not self.einsums:
            self.map(1)
        return self.finish()

    def finish(self) -> Cascade:
        read: set[str] = set()
        for e in self.einsums:
            read.update(e.inputs)
            if e.init is not None:
                read.update(a.tensor for a in accesses(e.init))
        outputs = [e.output for e in self.einsums if e.output not in read]
        also = [
            t.name
            for t in self.pool
            if t.name in read and t.name.startswith("T") and (t.init_iv is None or t.init_iv.finite)
        ]
        if also and self.draw(st.integers(0, 4)) == 0:
            outputs.append(self.draw(st.sampled_from(also)))
        used: set[str] = set()
        for t in self.inputs:
            used.update(t.ranks)
        for e in self.einsums:
            used.update(e.ranks)
            for x in (*e.indices, e.expr, *((e.init,) if e.init is not None else ())):
                used.update(rank_vars(x))
                used.update(size_refs(x))
        for p in self.partitions:
            used.update((p.rank, p.outer, p.inner))
        sizes = tuple((r, s) for r, s in self.sizes.items() if r in used)
        c = Cascade(
            tuple(self.inputs), tuple(self.einsums), tuple(outputs), sizes, tuple(self.partitions)
        )
        return verify(c)
