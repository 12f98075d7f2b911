"""The rank order an Einsum's map is evaluated in: the one that moves the fewest elements.

Every value of a map is laid out in one canonical rank order (see ``jax_values``), so an
operand stored in another order is transposed when read, and a result in another order than
the output is transposed when written. The emitter used to take ranks in order of first
appearance in the expression; for ``W[a, j, b, e] = where(b >= e, S[a, j, b, e], -inf)`` that
is ``b, e, a, j``, so the scores were transposed in and out. XLA cancels the pair only after
its CPU tree-reduction rewrite has already split the softmax's row reductions into
``reduce-window`` + ``reduce`` (and fused the mask into two kernels), so the program was
slower than ``jax.jit``'s of the same function. ``choose_order`` scores a few candidate
orders by the elements they would transpose and keeps the cheapest, preferring the
output's own order on a tie, as a hand-written JAX function would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from einfuse.ir.expr import Access, Expr, accesses, rank_vars


def choose_order(
    expr: Expr,
    tail: tuple[str, ...],
    sizes: Mapping[str, int],
    stored: Callable[[Access], tuple[str, ...] | None],
) -> tuple[str, ...]:
    """An order of ``expr``'s ranks and ``tail``'s, with ``tail``'s ranks in ``tail``'s order.

    ``stored(a)`` is the order access ``a`` reads its ranks in (None for a gather, which
    builds its result in any order). Candidates: ``tail`` then the other ranks; each
    stored order of an access then the rest; the order of first appearance.
    """
    appearance = tuple(dict.fromkeys([*rank_vars(expr), *tail]))
    rest = tuple(r for r in appearance if r not in tail)
    reads = [(s, math.prod(sizes[r] for r in s)) for a in accesses(expr) if (s := stored(a))]
    out_size = math.prod(sizes[r] for r in tail)
    candidates = [tail + rest]
    for s, _ in reads:
        head = tuple(r for r in s if r in appearance)
        candidates.append(head + tuple(r for r in candidates[0] if r not in head))
    candidates.append(appearance)

    def moved(order: tuple[str, ...]) -> int:
        cost = sum(size for s, size in reads if not _in_order(s, order))
        return cost + (0 if _in_order(tail, order) else out_size)

    return min(candidates, key=moved)  # min keeps the first of equals: the output's order


def _in_order(ranks: tuple[str, ...], order: tuple[str, ...]) -> bool:
    """Whether ``ranks`` appear in ``order`` in the same relative order."""
    positions = [order.index(r) for r in ranks if r in order]
    return positions == sorted(positions)
