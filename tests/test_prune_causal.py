"""prune-tokens on a causal decoder (``examples.llama``: rotary positions, grouped-query
attention): the same tokens for every row, kept at their original positions."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.explain_pruning import kept_positions, pruning_points
from examples import llama
from tests.prune_model_causal import TINY, causal_reference


def model(cfg: llama.Config):
    return lambda params, tokens: llama.forward(params, tokens, cfg)


def inputs(seed: int, batch: int, seq: int, cfg: llama.Config = TINY):
    params = llama.init_params(cfg, seed, jnp.float32)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab, (batch, seq)).astype(np.int32)
    return params, tokens


def check_definition(cfg: llama.Config, params, tokens, passes: str):
    """The pruned program's logits are the dense model's on the kept tokens (original
    positions, causal among themselves), which are the top-k of the accumulated importance
    with the first and the last token always kept."""
    f = einfuse.jit(model(cfg), passes=passes)
    got = np.asarray(f(params, tokens))
    traced = f.trace(params, tokens)
    points = pruning_points(traced.program)
    leaves = jax.tree_util.tree_leaves((params, tokens))
    which = kept_positions(points, traced.runner.environment, leaves)
    kept = {p.layer: k for p, k in zip(points, which)}
    want, importances = causal_reference(params, tokens, cfg, kept)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    present = np.arange(tokens.shape[1])
    for layer in sorted(kept):
        rows = np.searchsorted(present, kept[layer])
        assert kept[layer][-1] == tokens.shape[1] - 1 and (len(rows) == 1 or kept[layer][0] == 0)
        free = [r for r in rows if present[r] not in (0, tokens.shape[1] - 1)]
        dropped = np.setdiff1d(np.arange(len(present)), rows)
        if len(dropped) and free:
            assert importances[layer][free].min() >= importances[layer][dropped].max() - 1e-5
        present = kept[layer]
    return kept, f


def test_keep_one_is_the_dense_program_exactly() -> None:
    params, tokens = inputs(0, 2, 6)
    dense = einfuse.jit(model(TINY))
    pruned = einfuse.jit(model(TINY), passes="prune-tokens{keep=1}")
    assert np.array_equal(np.asarray(dense(params, tokens)), np.asarray(pruned(params, tokens)))
    np.testing.assert_allclose(
        np.asarray(pruned(params, tokens)), jax.jit(model(TINY))(params, tokens), atol=1e-5
    )


def test_later_layers_run_on_the_kept_tokens_at_their_positions() -> None:
    cfg = dataclasses.replace(TINY, layers=3)
    params, tokens = inputs(1, 2, 9, cfg)
    kept, f = check_definition(cfg, params, tokens, "prune-tokens{keep=1:0.6:0.4}")
    assert {k: v.shape for k, v in kept.items()} == {1: (6,), 2: (4,)}
    text = f.explain(params, tokens)
    assert "layer 1 keeps 6 of 9, layer 2 keeps 4 of 6" in text
    gone = sorted(set(kept[1].tolist()) - set(kept[2].tolist()))
    assert f"pruned by layer 2 (every row): {gone}" in text


@settings(max_examples=3, deadline=None)
@given(
    seed=st.integers(0, 1000),
    batch=st.integers(1, 2),
    seq=st.integers(2, 9),
    layers=st.integers(1, 2),
    data=st.data(),
)
def test_pruning_matches_the_reference_for_any_schedule(seed, batch, seq, layers, data) -> None:
    ratios = sorted(
        data.draw(st.lists(st.floats(0.1, 1.0), min_size=layers, max_size=layers)), reverse=True
    )
    cfg = dataclasses.replace(TINY, layers=layers)
    params, tokens = inputs(seed, batch, seq, cfg)
    keep = ":".join(f"{r:.3f}" for r in ratios)
    kept, _ = check_definition(cfg, params, tokens, f"prune-tokens{{keep={keep}}}")
    counts = [seq, *(max(1, math.ceil(float(f"{r:.3f}") * seq)) for r in ratios)]
    assert {k: len(v) for k, v in kept.items()} == {
        i: counts[i + 1] for i in range(layers) if counts[i + 1] < counts[i]
    }
