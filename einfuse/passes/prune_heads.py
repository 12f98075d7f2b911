"""``prune-heads``: SpAtten cascade head pruning, a pass over a whole lifted program.

Each region holding an attention (a *layer*, in program order) also computes each head's
importance, the magnitude of its attention output (``sum |context|`` over batch rows, tokens
and the head dimension), accumulated over layers. Where the schedule asks layer ``i`` to keep
fewer heads, a top-k op follows that layer's region: it keeps the ``k`` heads of highest
accumulated importance (``lax.top_k``: ties go to the lower index), the same heads for every
batch row, and gathers layer ``i``'s attention output over them, so its output projection
reads only their rows. Every later region reads the kept heads' columns of its Q/K/V
projections (weights and biases) and rows of its output projection, gathered before it, and
computes only ``k`` heads: a pruned head stays pruned. Pruning heads after layer ``i``'s
attention is the dense model with those heads' outputs zeroed from layer ``i`` on.

Options as ``prune-tokens``: ``keep=0.5,start=2`` or per layer ``keep=1:1:0.75:0.5``;
``k = ceil(keep * heads)``; ``keep=1`` leaves the program unchanged. With ``prune-tokens``
it goes first (``prune-heads{...},prune-tokens{...}``; the other order is refused): both
importances are carried, a later layer computes the kept heads on the kept tokens, and the
token importance sums the kept heads' attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from einfuse.ir.cascade import Cascade
from einfuse.ir.expr import Access, Var
from einfuse.passes.manager import register_program_pass
from einfuse.passes.prune_attention import AttentionSite, PruneError, layer_sites
from einfuse.passes.prune_tokens import OP_PREFIX as TOKEN_PREFIX

if TYPE_CHECKING:
    from einfuse.einsum_cascade.lift import Program

OP_PREFIX = "prune_heads_layer"  # the top-k ops' names: prune_heads_layer<i>_keep<k>
GATHER_NAME = "prune_heads_gather"  # the ops gathering a later layer's weights


@dataclass(frozen=True, slots=True)
class HeadSite:
    head: str  # the head rank of the attention probabilities
    heads: int
    flat: frozenset[str]  # ranks indexed ``head*U+u`` (projection outputs: heads x head dim)


def head_site(c: Cascade, site: AttentionSite) -> HeadSite:
    """The one head rank of ``site`` and the ranks its projections index by it."""
    others = set(c.tensor_ranks(site.probs)) - {site.key, site.query, site.batch}
    ranks = {r for r in others if c.size(r) != 1}  # a batch of one row keeps a size-1 rank
    if len(ranks) != 1:
        raise PruneError(
            f"prune-heads: the attention writing {site.probs} has head ranks {sorted(ranks)}; "
            "it needs exactly one"
        )
    (head,) = ranks
    flat = set()
    for e in c.einsums:
        for a in (x for x in e.expr.walk() if isinstance(x, Access)):
            for index, rank in zip(a.indices, c.tensor_ranks(a.tensor)):
                if not isinstance(index, Var) and any(
                    isinstance(v, Var) and v.rank == head for v in index.walk()
                ):
                    flat.add(rank)
    if not flat:
        raise PruneError(
            f"prune-heads: no projection of the attention {site.probs} is split by head"
        )
    return HeadSite(head, int(c.size(head)), frozenset(flat))


@register_program_pass("prune-heads")
def prune_heads(program: Program, keep: float | str = 1.0, start: int = 0) -> Program:
    """Prune heads by accumulated output magnitude; see the module docstring."""
    from einfuse.einsum_cascade.lift import Opaque  # imports jax: not at pass registration

    if any(
        str(s.eqn.params.get("name", "")).startswith(TOKEN_PREFIX)
        for s in program.segments
        if isinstance(s, Opaque)
    ):
        raise PruneError(
            "prune-heads: write it before prune-tokens in one pipeline "
            "(prune-heads{...},prune-tokens{...}): prune-tokens' top-k ops gather values at "
            "the full head count"
        )
    sites, ratios = layer_sites(program, "prune-heads", keep, start)
    heads = [head_site(r.cascade, s) if s else None for r, s in zip(program.regions, sites)]
    counts = {h.heads for h in heads if h is not None}
    if len(counts) != 1:
        raise PruneError(f"prune-heads: the layers have different head counts {sorted(counts)}")
    (total,) = counts
    kept = [max(1, math.ceil(r * total)) for r in ratios]
    if all(k == total for k in kept):
        return program
    from einfuse.passes.prune_heads_rewrite import prune_program_heads

    return prune_program_heads(program, sites, heads, kept)
