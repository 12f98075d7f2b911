"""prune-tokens: SpAtten cascade token pruning on a tiny random MiniLM (the real encode)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.errors import EinfuseError
from einfuse.explain_pruning import kept_positions, pruning_points
from einfuse.passes.prune_attention import PruneError
from einfuse.passes.prune_rewrite import _top_k_gather
from examples import minilm
from tests.prune_model import pruned_reference, tiny_params, tiny_tokens


def run_pruned(passes: str, params, ids, mask):
    f = einfuse.jit(minilm.encode, passes=passes)
    out = np.asarray(f(params, ids, mask))
    traced = f.trace(params, ids, mask)
    points = pruning_points(traced.program)
    leaves = jax.tree_util.tree_leaves((params, ids, mask))
    kept = kept_positions(points, traced.runner.environment, leaves)
    return out, {p.layer: k for p, k in zip(points, kept)}, f


def check_definition(params, ids, mask, passes: str) -> dict[int, np.ndarray]:
    """The pruned program equals the dense model run on the tokens it kept, and those are
    the top-k of the accumulated importance (CLS always among them)."""
    got, kept, _ = run_pruned(passes, params, ids, mask)
    want, importances = pruned_reference(params, ids, mask, kept)
    np.testing.assert_allclose(got, want, atol=2e-5)
    present = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    for layer in sorted(kept):
        imp = importances[layer]
        for b in range(ids.shape[0]):
            assert kept[layer][b][0] == 0  # CLS
            rows = np.searchsorted(present[b], kept[layer][b])
            dropped = np.setdiff1d(np.arange(len(present[b])), rows)
            if len(dropped):
                assert imp[b, rows[1:]].min(initial=np.inf) >= imp[b, dropped].max() - 1e-5
        present = kept[layer]
    return kept


def test_keep_one_is_the_dense_program_exactly() -> None:
    params = tiny_params(0, layers=2)
    ids, mask = tiny_tokens(0, 2, 7, [7, 5])
    dense = einfuse.jit(minilm.encode)
    pruned = einfuse.jit(minilm.encode, passes="prune-tokens{keep=1}")
    assert np.array_equal(
        np.asarray(dense(params, ids, mask)), np.asarray(pruned(params, ids, mask))
    )
    assert pruned.cascade(params, ids, mask) == dense.cascade(params, ids, mask)


def test_pruning_equals_the_dense_model_on_the_kept_tokens() -> None:
    params = tiny_params(1, layers=3)
    ids, mask = tiny_tokens(1, 3, 9, [9, 6, 4])
    kept = check_definition(params, ids, mask, "prune-tokens{keep=1:0.6:0.4}")
    assert {k: v.shape for k, v in kept.items()} == {1: (3, 6), 2: (3, 4)}


def test_padding_goes_before_any_real_token() -> None:
    params = tiny_params(2, layers=2)
    ids, mask = tiny_tokens(2, 2, 8, [8, 3])
    _, kept, _ = run_pruned("prune-tokens{keep=0.5}", params, ids, mask)
    assert kept[0][1].tolist() == [0, 1, 2, 3]  # the 3 real tokens, then one masked pad


@settings(max_examples=4)
@given(
    seed=st.integers(0, 1000),
    batch=st.integers(1, 3),
    seq=st.integers(3, 10),
    layers=st.integers(1, 2),
    data=st.data(),
)
def test_pruning_matches_the_reference_for_any_schedule(seed, batch, seq, layers, data) -> None:
    ratios = sorted(
        data.draw(st.lists(st.floats(0.1, 1.0), min_size=layers, max_size=layers)), reverse=True
    )
    lengths = data.draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
    params = tiny_params(seed, layers)
    ids, mask = tiny_tokens(seed, batch, seq, lengths)
    keep = ":".join(f"{r:.3f}" for r in ratios)
    kept = check_definition(params, ids, mask, f"prune-tokens{{keep={keep}}}")
    counts = [seq, *(max(1, math.ceil(float(f"{r:.3f}") * seq)) for r in ratios)]
    assert {k: v.shape[1] for k, v in kept.items()} == {
        i: counts[i + 1] for i in range(layers) if counts[i + 1] < counts[i]
    }


def test_start_form_equals_its_per_layer_schedule() -> None:
    params = tiny_params(3, layers=2)
    ids, mask = tiny_tokens(3, 2, 8, [8, 8])
    a = einfuse.jit(minilm.encode, passes="prune-tokens{keep=0.5,start=1}")(params, ids, mask)
    b = einfuse.jit(minilm.encode, passes="prune-tokens{keep=1:0.5}")(params, ids, mask)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_top_k_ties_keep_the_lower_index() -> None:
    acc = np.array([[1.0, 2.0, 2.0, 2.0, 2.0, 0.5]], np.float32)
    _, pos = _top_k_gather(3, [], first=True, name="t")(acc)
    assert pos.tolist() == [[0, 1, 2]]  # CLS, then the first two of four equal scores


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ("prune-tokens{keep=1:0.5}", "has 2 ratios; the program has 3"),
        ("prune-tokens{keep=0.5:0.8:0.8}", "must not grow"),
        ("prune-tokens{keep=1.5}", "must lie in (0, 1]"),
        ("prune-tokens{keep=0.5,start=3}", "start=3"),
        ("prune-tokens{keep=1:1:0.5,start=1}", "not both"),
    ],
)
def test_bad_schedules_are_refused_by_name(passes: str, message: str) -> None:
    params = tiny_params(0, layers=3)
    ids, mask = tiny_tokens(0, 1, 5, [5])
    with pytest.raises(PruneError, match=message.replace("(", r"\(").replace("]", r"\]")):
        einfuse.jit(minilm.encode, passes=passes)(params, ids, mask)


def test_a_program_without_attention_is_refused() -> None:
    f = einfuse.jit(lambda x: jax.numpy.tanh(x @ x.T), passes="prune-tokens{keep=0.5}")
    with pytest.raises(PruneError, match="no softmax attention"):
        f(np.ones((4, 4), np.float32))


def test_a_pruned_program_refuses_to_be_differentiated() -> None:
    params = tiny_params(0, layers=2)
    ids, mask = tiny_tokens(0, 1, 6, [6])
    f = einfuse.jit(minilm.encode, passes="prune-tokens{keep=0.5}")
    with pytest.raises(EinfuseError, match="has no derivative"):
        jax.grad(lambda p: f(p, ids, mask).sum())(params)


def test_explain_says_which_tokens_each_layer_pruned() -> None:
    params = tiny_params(4, layers=2)
    ids, mask = tiny_tokens(4, 2, 6, [6, 4])
    _, kept, f = run_pruned("prune-tokens{keep=0.5}", params, ids, mask)
    text = f.explain(params, ids, mask)
    assert "layer 0 keeps 3 of 6" in text
    gone = sorted(set(range(6)) - set(kept[0][1].tolist()))
    assert f"row 1: {gone}" in text


def test_positions_computed_after_pruning_are_refused_not_miscounted() -> None:
    """An ALiBi-style bias from an integer iota in a later layer would count kept tokens."""

    def alibi(x: jax.Array, w: jax.Array) -> jax.Array:
        for _ in range(2):
            s = x.shape[1]
            bias = jnp.abs(jnp.arange(s)[None, :] - jnp.arange(s)[:, None]).astype(x.dtype)
            scores = jnp.einsum("bqd,bkd->bqk", x @ w, x) - bias
            x = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, axis=-1), x)
            x = jnp.sort(x, axis=-1)  # opaque: one region per layer
        return x.sum(1)

    x = np.random.default_rng(0).normal(size=(2, 6, 4)).astype(np.float32)
    f = einfuse.jit(alibi, passes="prune-tokens{keep=0.5}")
    with pytest.raises(PruneError, match="uses the index of the pruned rank"):
        f(x, np.eye(4, dtype=np.float32))
