"""prune-heads then prune-tokens in one pipeline, on a tiny random MiniLM (the real encode):
a later layer computes the kept heads on the kept tokens."""

from __future__ import annotations

import jax
import numpy as np

import einfuse
from einfuse.explain_pruning import kept_positions, pruning_points
from einfuse.passes.prune_heads import OP_PREFIX as HEADS
from einfuse.passes.prune_tokens import OP_PREFIX as TOKENS
from examples import minilm
from tests.prune_model import reference, tiny_params, tiny_tokens


def test_heads_and_tokens_equal_the_dense_model_on_kept_tokens_with_heads_zeroed() -> None:
    params = tiny_params(7, layers=3, heads=4)
    ids, mask = tiny_tokens(7, 2, 8, [8, 6])
    passes = "prune-heads{keep=1:0.75:0.5},prune-tokens{keep=1:0.6:0.4}"
    f = einfuse.jit(minilm.encode, passes=passes)
    got = np.asarray(f(params, ids, mask))
    traced = f.trace(params, ids, mask)
    leaves = jax.tree_util.tree_leaves((params, ids, mask))
    kept = {}
    for prefix in (TOKENS, HEADS):
        points = pruning_points(traced.program, prefix)
        which = kept_positions(points, traced.runner.environment, leaves)
        kept[prefix] = {p.layer: k for p, k in zip(points, which)}
    assert {k: v.shape for k, v in kept[TOKENS].items()} == {1: (2, 5), 2: (2, 4)}
    assert {k: v.shape for k, v in kept[HEADS].items()} == {1: (3,), 2: (2,)}
    want, tokens_imp, heads_imp = reference(params, ids, mask, kept[TOKENS], kept[HEADS])
    np.testing.assert_allclose(got, want, atol=2e-5)
    # Each top-k is of its own accumulated importance: the heads' over the tokens present,
    # the tokens' over the heads computed.
    alive = np.arange(4)
    for layer, heads in sorted(kept[HEADS].items()):
        imp = heads_imp[layer][alive]
        rows = np.searchsorted(alive, heads)
        assert imp[rows].min() >= np.delete(imp, rows).max() - 1e-5
        alive = heads
    present = np.broadcast_to(np.arange(8), (2, 8))
    for layer, tokens in sorted(kept[TOKENS].items()):
        for b in range(2):
            rows = np.searchsorted(present[b], tokens[b])
            imp = tokens_imp[layer][b]
            assert imp[rows[1:]].min() >= np.delete(imp, rows).max() - 1e-5
        present = tokens
    text = f.explain(params, ids, mask)
    assert "layer 1 keeps 5 of 8, layer 2 keeps 4 of 5" in text
    assert "layer 1 keeps 3 of 4, layer 2 keeps 2 of 3" in text
