"""``prune-tokens``: SpAtten cascade token pruning, a pass over a whole lifted program.

Each region holding an attention (a *layer*, in program order) also computes the attention
probability each token receives, summed over heads and queries and accumulated over layers.
Where the schedule asks layer ``i`` to keep fewer tokens, a top-k op follows that layer's
region: it keeps the ``k`` tokens of highest accumulated importance (``lax.top_k``: ties go to
the lower index; the first token, BERT's CLS, is always kept), in their original order, and
gathers every later-read value over the tokens (the hidden state, the padding mask, the
importance itself) so the rest of layer ``i`` (output projection, residual, MLP) and every
later layer run on ``k`` rows. Padding stays masked: a padded key receives no attention,
so it is pruned before any real token, and a kept one stays masked in attention and pooling.

Options: ``keep=0.5,start=2`` (layers ``start`` on keep half the tokens) or a per-layer
``keep=1:1:0.8:0.6:0.5:0.5`` (the fraction of the original tokens kept after each layer's
attention; non-increasing, since a pruned token stays pruned). ``k = ceil(keep * length)``.
``keep=1`` leaves the program unchanged. It changes results by design and never runs unless
named in a pipeline.

Causal models (scores masked by comparing query and key indices, ``r >= j``): a pruned token
leaves every later layer's queries *and* keys/values. The kept tokens are the same for every
batch row (importance summed over rows), because positional values such as rotary tables are
computed once for all rows; a later layer reads them gathered at the kept tokens' original
positions. Each layer's received attention is divided by the number of queries that see the
token (``n - m``: the mean received probability), else the earliest tokens would always win.
The last token (its output predicts the next token) and the first (the attention sink) are
always kept. The causal mask stays right among kept tokens because they keep their order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from einfuse.passes.manager import register_program_pass
from einfuse.passes.prune_attention import PruneError, layer_sites

if TYPE_CHECKING:
    from einfuse.einsum_cascade.lift import Program

OP_PREFIX = "prune_tokens_layer"  # the top-k ops' names: prune_tokens_layer<i>_keep<k>
GATHER_NAME = "prune_tokens_positions"  # ops gathering a full-length value at kept positions


@register_program_pass("prune-tokens")
def prune_tokens(program: Program, keep: float | str = 1.0, start: int = 0) -> Program:
    """Prune tokens by accumulated received attention; see the module docstring."""
    sites, ratios = layer_sites(program, "prune-tokens", keep, start)
    causal = {s.causal for s in sites if s}
    if len(causal) != 1:
        raise PruneError("prune-tokens: some attention layers are causal and some are not")
    length = next(int(r.cascade.size(s.key)) for r, s in zip(program.regions, sites) if s)
    kept = [max(1, math.ceil(r * length)) for r in ratios]
    if all(k == length for k in kept):
        return program
    from einfuse.passes.prune_rewrite import prune_program

    return prune_program(program, sites, kept, causal.pop())
