"""Hypothesis strategies for random valid cascades, their inputs, expressions and text.

Import them from any test::

    from tests.strategies import cascade_with_inputs, cascades, exprs, text_cascades

Every drawn cascade passes ``einfuse.ir.verify`` and has concrete int sizes. The mix is
meant to find bugs in passes and backends: matmul-like and multi-rank contractions,
elementwise maps over every operator (domains kept safe, e.g. ``log(abs(x) + 1)``),
sum/max/min/prod reductions, broadcasts, transposed and diagonal reads, masks on rank
values (``where(m <= p, x, -inf)``, ``where(i < 3, ...)``), chains reusing intermediates,
softmax chains (max, exp(x - max), sum, divide; sometimes masked, sometimes with the
division deferred past a V contraction), FuseMax's 1-pass online softmax, running
sums/maxima along a rank (recurrences with an initial value), and partitioned reads
``X[m1*M0+m0]`` whose padded tail is masked where 0 is not the identity.

Values stay finite: inputs are uniform(0.5, 2) in magnitude (some inputs positive, the
rest with random signs), and the builder tracks value intervals so every intermediate
stays within about 64 in magnitude (see ``strategy_values``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from hypothesis import strategies as st

from einfuse.ir import Cascade, bind_sizes, parse_size
from einfuse.ir.expr import BINARY_OPS, CAST_OPS, UNARY_OPS, Access, Const, Expr, Op, Size, Var
from tests import strategy_chains as chains
from tests.strategy_builder import RANK_NAMES, CascadeBuilder, StepKind

__all__ = [
    "KINDS",
    "RANK_NAMES",
    "STEPS",
    "DrawnCascade",
    "cascade_with_inputs",
    "cascades",
    "constants",
    "drawn_cascades",
    "exprs",
    "index_exprs",
    "random_inputs",
    "text_cascades",
]


# The kinds of steps a cascade is built from (weight, fewest Einsums, step).
STEPS: dict[str, StepKind] = {
    "contraction": StepKind(4, 1, CascadeBuilder.contraction),
    "map": StepKind(4, 1, CascadeBuilder.map),
    "reduction": StepKind(3, 1, CascadeBuilder.reduction),
    "softmax": StepKind(2, 4, chains.softmax),
    "online_softmax": StepKind(1, 3, chains.online_softmax),
    "recurrence": StepKind(2, 1, chains.recurrence),
    "tiling": StepKind(1, 1, CascadeBuilder.tiling),
}
KINDS = tuple(STEPS)


@dataclass(frozen=True, slots=True)
class DrawnCascade:
    """A drawn cascade and the inputs whose values must be positive (drawn from (0.5, 2))."""

    cascade: Cascade
    positive_inputs: frozenset[str]


@st.composite
def drawn_cascades(
    draw: st.DrawFn,
    max_einsums: int = 6,
    *,
    min_einsums: int = 1,
    max_ranks: int = 4,
    min_size: int = 2,
    max_size: int = 6,
    kinds: Iterable[str] = KINDS,
) -> DrawnCascade:
    """Like ``cascades`` but also says which inputs the cascade needs positive."""
    allowed = frozenset(kinds)
    unknown = allowed - set(KINDS)
    if unknown:
        raise ValueError(f"unknown cascade kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    fewest = min(STEPS[k].least for k in allowed)
    n = draw(st.integers(max(min_einsums, fewest), max(max_einsums, fewest)))
    b = CascadeBuilder(draw, max_ranks=max_ranks, min_size=min_size, max_size=max_size)
    c = b.build(n, {k: STEPS[k] for k in KINDS if k in allowed})
    positive = frozenset(k for k, v in b.input_kinds.items() if v == "positive")
    return DrawnCascade(c, positive)


def cascades(
    max_einsums: int = 6,
    *,
    min_einsums: int = 1,
    max_ranks: int = 4,
    min_size: int = 2,
    max_size: int = 6,
    kinds: Iterable[str] = KINDS,
) -> st.SearchStrategy[Cascade]:
    """Random valid cascades with concrete sizes (``min_size..max_size`` per rank).

    ``max_einsums`` bounds the Einsum count (a softmax chain needs 4, so it can push the
    minimum up when it is the only kind). ``max_ranks`` is the number of base ranks;
    tiling adds two more per split rank. ``kinds`` picks the steps the builder may use,
    from ``KINDS``: contraction, map, reduction, softmax, online_softmax, recurrence,
    tiling. Intermediates may have values anywhere in about [-64, 64]; inputs must be
    drawn as ``random_inputs`` does (positive ones from (0.5, 2)).
    """
    return drawn_cascades(
        max_einsums,
        min_einsums=min_einsums,
        max_ranks=max_ranks,
        min_size=min_size,
        max_size=max_size,
        kinds=kinds,
    ).map(lambda d: d.cascade)


def random_inputs(
    cascade: Cascade,
    seed: int,
    *,
    bind: Mapping[str, int] | None = None,
    positive: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """Float64 arrays for every input: magnitudes uniform in (0.5, 2), never zero.

    Inputs named in ``positive`` are positive; the others get random signs.
    """
    rng = np.random.default_rng(seed)
    sizes = bind_sizes(cascade, bind)
    out: dict[str, np.ndarray] = {}
    for t in cascade.inputs:
        shape = tuple(sizes[r] for r in t.ranks)
        x = rng.uniform(0.5, 2.0, shape)
        if t.name not in positive:
            x = x * rng.choice(np.array([-1.0, 1.0]), shape)
        out[t.name] = np.asarray(x, dtype=np.float64)
    return out


@st.composite
def cascade_with_inputs(
    draw: st.DrawFn, max_einsums: int = 6, **kwargs: object
) -> tuple[Cascade, dict[str, np.ndarray]]:
    """A random valid cascade (as ``cascades``) and matching random non-zero float64 inputs."""
    d = draw(drawn_cascades(max_einsums, **kwargs))  # type: ignore[arg-type]
    seed = draw(st.integers(0, 2**32 - 1))
    return d.cascade, random_inputs(d.cascade, seed, positive=d.positive_inputs)


# ---------------------------------------------------------------------------- text
def constants() -> st.SearchStrategy[int | float]:
    """Numbers the printer must spell exactly: negatives, 1e-05, inf, -inf, -0.0, huge."""
    odd = st.sampled_from((1e-05, -1e-05, math.inf, -math.inf, -0.0, 0.1, 1e300, 5e-324, 2.0))
    return st.one_of(odd, st.integers(-(10**6), 10**6), st.floats(allow_nan=False))


def index_exprs(ranks: tuple[str, ...] = RANK_NAMES[:4]) -> st.SearchStrategy[Expr]:
    """Affine index expressions: ranks, sizes and ints under + - * (``m1*M0+m0``, ``i-1``)."""
    leaves = st.one_of(
        st.builds(Var, st.sampled_from(ranks)),
        st.builds(Size, st.sampled_from(ranks)),
        st.builds(Const, st.integers(-3, 300)),
    )
    ops = st.sampled_from(("add", "sub", "mul"))
    return st.recursive(
        leaves, lambda kids: st.builds(lambda o, a, b: Op(o, (a, b)), ops, kids, kids), max_leaves=4
    )


def exprs(
    ranks: tuple[str, ...] = RANK_NAMES[:4],
    tensors: Mapping[str, int] | None = None,
    max_leaves: int = 12,
) -> st.SearchStrategy[Expr]:
    """Arbitrary map expressions (structure only, any operator nesting, odd constants).

    ``tensors`` maps the readable tensor names to their rank counts; accesses take
    affine index expressions over ``ranks``. Values are not meaningful: this is for the
    printer and parser, not for evaluation.
    """
    table = dict(tensors if tensors is not None else {"A": 2, "B": 1, "S": 0})

    def access(item: tuple[str, int]) -> st.SearchStrategy[Expr]:
        name, arity = item
        idx = st.tuples(*[index_exprs(ranks)] * arity)
        return idx.map(lambda i: Access(name, i))

    leaves = st.one_of(
        st.builds(Var, st.sampled_from(ranks)),
        st.builds(Size, st.sampled_from(ranks)),
        st.builds(Const, constants()),
        st.sampled_from(sorted(table.items())).flatmap(access),
    )

    def extend(kids: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
        unary = st.sampled_from(sorted(UNARY_OPS - CAST_OPS))  # casts: test_mixed_precision
        binary = st.sampled_from(sorted(BINARY_OPS))
        return st.one_of(
            st.builds(lambda o, a: Op(o, (a,)), unary, kids),
            st.builds(lambda o, a, b: Op(o, (a, b)), binary, kids, kids),
            st.builds(lambda a, b, c: Op("where", (a, b, c)), kids, kids, kids),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


_SIZE_TEMPLATES = ("{s}", "2*{s}", "{s} + 1", "ceiling({s}/4)", "Max({s}, 3)")
_SIZE_SYMBOLS = "STUVWXYZ"
_DTYPES = ("float32", "bfloat16", "float16", "float64", "int32")


@st.composite
def text_cascades(draw: st.DrawFn, max_einsums: int = 6) -> Cascade:
    """Valid cascades for the printer: wild constants, every operator anywhere (values
    meaningless), symbolic sizes (``ceiling(S/4)``, ``Max(T, 3)``) and assorted dtypes."""
    b = CascadeBuilder(draw, safe=False)
    c = b.build(draw(st.integers(1, max_einsums)), STEPS)
    # Ranks of equal size stay equal (reads across them are legal only then).
    symbolic: dict[int, object] = {}
    for k, v in enumerate(sorted({s for _, s in c.sizes})):
        template = draw(st.sampled_from((None, *_SIZE_TEMPLATES)))
        symbolic[v] = v if template is None else parse_size(template.format(s=_SIZE_SYMBOLS[k]))
    sizes = tuple((r, symbolic[s]) for r, s in c.sizes)
    parts = tuple(replace(p, tile=symbolic[p.tile]) for p in c.partitions)
    inputs = tuple(replace(t, dtype=draw(st.sampled_from(_DTYPES))) for t in c.inputs)
    return replace(c, inputs=inputs, sizes=sizes, partitions=parts)
