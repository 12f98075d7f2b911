"""Where a cascade's attention is, and how much attention each token receives (SpAtten).

`attention_site` finds the softmax probabilities ``P = exp(S - max_m S) / sum_m exp(...)`` of
an attention (the scores ``S`` a contraction of queries with keys), and names its ranks: the
key rank ``m`` (the softmax's), the query rank (a plain index of the query operand only) and
the batch rank (a plain index of both operands); every other rank of ``P`` is a head rank.
A batch of one row has no batch rank (the lifter indexes size-1 axes with 0).
`add_importance` appends SpAtten's token importance, the probability a key receives summed
over heads and queries, accumulated with the importance of earlier layers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx

from einfuse.ir.cascade import Cascade, Einsum, TensorDecl
from einfuse.ir.dtypes import cast, tensor_dtypes
from einfuse.ir.errors import EinfuseError
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var
from einfuse.passes.defer import unique_name

if TYPE_CHECKING:
    from einfuse.einsum_cascade.lift import Program


class PruneError(EinfuseError):
    """A program prune-tokens cannot prune without changing what it means."""


@dataclass(frozen=True, slots=True)
class AttentionSite:
    probs: str
    key: str
    query: str
    batch: str | None  # None when the batch has one row (the lifter drops size-1 axes' ranks)
    dtype: str
    causal: bool = False  # the scores are masked by comparing the query and key ranks


def attention_sites(c: Cascade) -> list[AttentionSite]:
    """Every softmax-attention of ``c``, in cascade order."""
    return [s for e in c.einsums if (s := _site(c, e)) is not None]


def _site(c: Cascade, p: Einsum) -> AttentionSite | None:
    if p.reduced_ranks or not (isinstance(p.expr, Op) and p.expr.op == "div"):
        return None
    num, den = p.expr.args
    if not (isinstance(num, Access) and isinstance(den, Access)):
        return None
    ex, total = c.writer(num.tensor), c.writer(den.tensor)
    if ex is None or total is None or not (isinstance(ex.expr, Op) and ex.expr.op == "exp"):
        return None
    if total.reduce != "sum" or total.inputs != (ex.output,) or len(total.reduced_ranks) != 1:
        return None
    key = total.reduced_ranks[0]
    maxima = [w for t in ex.inputs if (w := c.writer(t)) is not None and w.reduce == "max"]
    if len(maxima) != 1 or maxima[0].reduced_ranks != (key,):
        return None
    scores = _scores(c, maxima[0].output, key)
    if scores is None:
        return None
    a, b = accesses2(scores)
    q_op, k_op = (b, a) if key in _plain(a) else (a, b)
    ranks = set(c.tensor_ranks(p.output))
    query = sorted((_plain(q_op) - _plain(k_op)) & ranks)
    batch = sorted((_plain(q_op) & _plain(k_op) & ranks) - {key})
    if len(query) != 1 or len(batch) > 1:
        raise PruneError(
            f"prune-tokens: the attention writing {p.output} has query rank(s) {query} and "
            f"batch rank(s) {batch}; it needs one query and at most one batch rank "
            "(heads as a compound index)"
        )
    b = batch[0] if batch else None
    causal = _compares(c, maxima[0].output, query[0], key)
    return AttentionSite(p.output, key, query[0], b, tensor_dtypes(c)[p.output], causal)


COMPARISONS = frozenset({"ge", "gt", "le", "lt", "eq", "ne"})


def _compares(c: Cascade, before: str, query: str, key: str) -> bool:
    """Whether the scores are masked by a comparison of the query and key indices (``r >= j``,
    a causal mask): the one mask form that keeps its meaning among kept tokens in order."""
    up = nx.ancestors(c.graph(), before) | {before}
    for e in c.einsums:
        if e.output not in up:
            continue
        for x in e.expr.walk():
            if (
                isinstance(x, Op)
                and x.op in COMPARISONS
                and {a.rank for a in x.args if isinstance(a, Var)} == {query, key}
            ):
                return True
    return False


def _scores(c: Cascade, before: str, key: str) -> Einsum | None:
    """The one query-key contraction the softmax's maximum depends on."""
    up = nx.ancestors(c.graph(), before) | {before}
    found = [
        e
        for e in c.einsums
        if e.output in up
        and e.reduce == "sum"
        and e.reduced_ranks
        and key in e.output_ranks
        and accesses2(e) is not None
    ]
    return found[0] if len(found) == 1 else None


def accesses2(e: Einsum) -> tuple[Access, Access] | None:
    """The two operands of a product ``A[..] * B[..]``, or None."""
    x = e.expr
    if isinstance(x, Op) and x.op == "mul" and len(x.args) == 2:
        a, b = x.args
        if isinstance(a, Access) and isinstance(b, Access):
            return a, b
    return None


def _plain(a: Access) -> set[str]:
    return {i.rank for i in a.indices if isinstance(i, Var)}


def add_importance(
    c: Cascade, site: AttentionSite, accumulate: bool, shared: bool = False
) -> tuple[Cascade, str, str]:
    """``c`` with ``ACC[batch, key]`` = received attention (+ the ``ACC_IN`` input if
    ``accumulate``); returns the cascade, the output and the input tensor names. ``shared``
    (causal models): ``ACC[key]``, summed over the batch rows too, and each layer's sum
    divided by the number of queries that see the key (``n - m`` under a causal mask), so
    late tokens, which few queries see, are not pruned for that alone. Otherwise the sum runs
    over the real queries only, those that themselves receive attention: a padded query still
    attends to the real keys, and with short texts padded long most queries are padding."""
    taken = {t.name for t in c.inputs} | {e.output for e in c.einsums}
    imp = unique_name("IMPORTANCE", taken)
    acc = unique_name("ACCUMULATED", taken | {imp})
    acc_in = unique_name("ACCUMULATED_IN", taken | {imp, acc})
    kept_ranks = (site.key,) if shared else (site.batch, site.key)
    left = tuple(Var(r) for r in kept_ranks if r is not None)
    received: Expr = Access(site.probs, tuple(Var(r) for r in c.tensor_ranks(site.probs)))
    einsums = list(c.einsums)
    if shared:
        seen_by = cast(site.dtype, Op("sub", (Size(site.key), Var(site.key))))
        received = Op("div", (received, seen_by))
    else:
        every = unique_name("RECEIVED", taken | {imp, acc, acc_in})
        einsums.append(Einsum(every, left, received))
        query = tuple(Var(r) for r in (site.batch, site.query) if r is not None)
        real = Op("gt", (Access(every, query), Const(0.0)))
        received = Op("mul", (received, Op("where", (real, Const(1.0), Const(0.0)))))
    einsums.append(Einsum(imp, left, received))
    inputs = list(c.inputs)
    if accumulate:
        inputs.append(TensorDecl(acc_in, tuple(v.rank for v in left), site.dtype))
        einsums.append(Einsum(acc, left, Op("add", (Access(imp, left), Access(acc_in, left)))))
    else:
        acc = imp
    return c.with_einsums(einsums, inputs=tuple(inputs), outputs=(*c.outputs, acc)), acc, acc_in


def layer_sites(
    program: Program, name: str, keep: float | str, start: int
) -> tuple[list[AttentionSite | None], list[float]]:
    """Each region's attention (None: a region without one) and the keep ratio after each
    layer, for a pruning pass ``name``; a region with several attentions, or a program with
    none, is refused."""
    found = [attention_sites(r.cascade) for r in program.regions]
    if any(len(s) > 1 for s in found):
        raise PruneError(f"{name}: a region holds several attentions; it needs one per layer")
    layers = sum(len(s) for s in found)
    if layers == 0:
        raise PruneError(f"{name}: the program has no softmax attention to prune")
    return [s[0] if s else None for s in found], keep_schedule(keep, start, layers, name)


def keep_schedule(keep: float | str, start: int, layers: int, name: str) -> list[float]:
    """The fraction of tokens (or heads) kept after each layer's attention."""
    if isinstance(keep, str):
        if start:
            raise PruneError(f"{name}: give start= or a per-layer keep=a:b:..., not both")
        try:
            ratios = [float(x) for x in keep.split(":")]
        except ValueError:
            raise PruneError(f"{name}: keep={keep!r} is not a list of numbers") from None
        if len(ratios) != layers:
            raise PruneError(
                f"{name}: keep={keep} has {len(ratios)} ratios; the program has "
                f"{layers} attention layers"
            )
    else:
        if not 0 <= start < layers:
            raise PruneError(f"{name}: start={start}; the program has layers 0..{layers - 1}")
        ratios = [1.0] * start + [float(keep)] * (layers - start)
    if any(not 0 < r <= 1 for r in ratios):
        raise PruneError(f"{name}: keep ratios must lie in (0, 1]; got {ratios}")
    if any(b > a for a, b in itertools.pairwise(ratios)):
        raise PruneError(f"{name}: keep ratios must not grow (pruned ones stay): {ratios}")
    return ratios
