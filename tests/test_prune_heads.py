"""prune-heads: SpAtten cascade head pruning on a tiny random MiniLM (the real encode)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import einfuse
from einfuse.explain_pruning import kept_positions, pruning_points
from einfuse.passes.prune_attention import PruneError, attention_sites
from einfuse.passes.prune_heads import OP_PREFIX, head_site
from einfuse.passes.prune_heads_rewrite import _top_k_heads
from examples import minilm
from tests.prune_model import reference, tiny_params, tiny_tokens


def kept_heads(f, params, ids, mask) -> dict[int, np.ndarray]:
    traced = f.trace(params, ids, mask)
    points = pruning_points(traced.program, OP_PREFIX)
    leaves = jax.tree_util.tree_leaves((params, ids, mask))
    kept = kept_positions(points, traced.runner.environment, leaves)
    return {p.layer: k for p, k in zip(points, kept)}


def check_definition(params, ids, mask, passes: str) -> dict[int, np.ndarray]:
    """The pruned program equals the dense model with the pruned heads' outputs zeroed from
    their pruning layer on, and the kept heads are the top-k of the accumulated importance."""
    f = einfuse.jit(minilm.encode, passes=passes)
    got = np.asarray(f(params, ids, mask))
    kept = kept_heads(f, params, ids, mask)
    want, _, importances = reference(params, ids, mask, {}, kept)
    np.testing.assert_allclose(got, want, atol=2e-5)
    alive = np.arange(params["config"].num_heads)
    for layer in sorted(kept):
        imp = importances[layer][alive]
        rows = np.searchsorted(alive, kept[layer])
        dropped = np.setdiff1d(np.arange(len(alive)), rows)
        assert imp[rows].min() >= imp[dropped].max() - 1e-5
        alive = kept[layer]
    return kept


def test_keep_one_is_the_dense_program_exactly() -> None:
    params = tiny_params(0, layers=2, heads=4)
    ids, mask = tiny_tokens(0, 2, 7, [7, 5])
    dense = einfuse.jit(minilm.encode)
    pruned = einfuse.jit(minilm.encode, passes="prune-heads{keep=1}")
    assert np.array_equal(
        np.asarray(dense(params, ids, mask)), np.asarray(pruned(params, ids, mask))
    )
    assert pruned.cascade(params, ids, mask) == dense.cascade(params, ids, mask)


def test_pruning_equals_the_dense_model_with_pruned_heads_zeroed() -> None:
    params = tiny_params(1, layers=3, heads=4)
    ids, mask = tiny_tokens(1, 3, 6, [6, 4, 2])
    kept = check_definition(params, ids, mask, "prune-heads{keep=1:0.75:0.5}")
    assert {k: v.shape for k, v in kept.items()} == {1: (3,), 2: (2,)}
    assert set(kept[2]) <= set(kept[1])


def test_later_layers_really_compute_fewer_heads() -> None:
    params = tiny_params(2, layers=2, heads=4)
    ids, mask = tiny_tokens(2, 2, 5, [5, 5])
    f = einfuse.jit(minilm.encode, passes="prune-heads{keep=0.5}")
    check_definition(params, ids, mask, "prune-heads{keep=0.5}")
    program = f.trace(params, ids, mask).program
    region = [r for r in program.regions if attention_sites(r.cascade)][-1]
    hs = head_site(region.cascade, attention_sites(region.cascade)[0])
    # Layer 1 computes the 2 kept heads; its projections hold their 2 x 2 columns.
    assert hs.heads == 2
    assert {int(region.cascade.size(r)) for r in hs.flat} == {4}
    shapes = [program.avals[v].shape for v in region.inputs]
    assert (8, 4) in shapes and (8, 8) not in shapes[2:]


def test_start_form_equals_its_per_layer_schedule() -> None:
    params = tiny_params(3, layers=2, heads=4)
    ids, mask = tiny_tokens(3, 2, 5, [5, 3])
    a = einfuse.jit(minilm.encode, passes="prune-heads{keep=0.5,start=1}")(params, ids, mask)
    b = einfuse.jit(minilm.encode, passes="prune-heads{keep=1:0.5}")(params, ids, mask)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_top_k_ties_keep_the_lower_index() -> None:
    acc = np.array([1.0, 2.0, 2.0, 2.0, 0.5], np.float32)
    context = np.arange(5, dtype=np.float32)[None, :, None]
    kept_acc, pos, ctx = _top_k_heads(2, 1, first=True, name="t")(acc, context)
    assert pos.tolist() == [1, 2] and ctx[0, :, 0].tolist() == [1.0, 2.0]
    # A later point maps back to original indices, still lower-first on ties.
    _, pos2, _ = _top_k_heads(1, 1, first=False, name="t")(kept_acc, pos, ctx)
    assert pos2.tolist() == [1]


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ("prune-heads{keep=1:0.5}", "prune-heads: keep=1:0.5 has 2 ratios; the program has 3"),
        ("prune-heads{keep=0.5:0.8:0.8}", "prune-heads: keep ratios must not grow"),
        ("prune-heads{keep=0}", "prune-heads: keep ratios must lie in"),
        ("prune-heads{keep=0.5,start=3}", "prune-heads: start=3"),
        ("prune-tokens{keep=0.5},prune-heads{keep=0.5}", "prune-heads: write it before"),
    ],
)
def test_bad_schedules_are_refused_by_name(passes: str, message: str) -> None:
    params = tiny_params(0, layers=3, heads=4)
    ids, mask = tiny_tokens(0, 1, 5, [5])
    with pytest.raises(PruneError, match=message.replace("(", r"\(")):
        einfuse.jit(minilm.encode, passes=passes)(params, ids, mask)


def test_explain_says_how_many_heads_each_layer_kept() -> None:
    params = tiny_params(4, layers=2, heads=4)
    ids, mask = tiny_tokens(4, 2, 5, [5, 4])
    f = einfuse.jit(minilm.encode, passes="prune-heads{keep=0.75:0.5}")
    text = f.explain(params, ids, mask)
    assert "layer 0 keeps 3 of 4, layer 1 keeps 2 of 3" in text
    kept = kept_heads(f, params, ids, mask)
    assert f"heads kept by layer 1: {kept[1].tolist()}" in text


@pytest.mark.parametrize(
    ("seed", "batch", "layers", "keep"),
    [(5, 1, 2, "0.5:0.25"), (6, 2, 3, "1:0.5:0.5"), (7, 3, 1, "0.75")],
)
def test_definition_for_other_shapes_and_schedules(seed, batch, layers, keep) -> None:
    params = tiny_params(seed, layers=layers, heads=4)
    lengths = [5 - b for b in range(batch)]
    ids, mask = tiny_tokens(seed, batch, 5, lengths)
    kept = check_definition(params, ids, mask, f"prune-heads{{keep={keep}}}")
    assert kept
