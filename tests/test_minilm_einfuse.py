"""MiniLM through ``einfuse.jit``: the same embeddings, and attention lifted in every layer."""

from __future__ import annotations

from typing import Any

import jax
import networkx as nx
import numpy as np
import pytest

from einfuse.einsum_cascade.lift import Program
from einfuse.frontend import jit
from einfuse.ir import Cascade, Einsum, Op
from examples import minilm

encode = jit(minilm.encode)


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return minilm.load_params()


@pytest.fixture(scope="module")
def tokens() -> tuple[np.ndarray, np.ndarray]:
    return minilm.tokenize(minilm.load_tokenizer(), minilm.SENTENCES)


@pytest.fixture(scope="module")
def program(params: dict[str, Any], tokens: tuple[np.ndarray, np.ndarray]) -> Program:
    return encode.trace(params, *tokens).program


def is_contraction(e: Einsum) -> bool:
    return e.reduce == "sum" and bool(e.reduced_ranks) and len(e.inputs) == 2


def attentions(c: Cascade) -> int:
    """Softmax-attention instances: QK contraction -> max -> exp -> ... -> AV contraction."""
    g = c.graph()
    found = 0
    for m in (e for e in c.einsums if e.reduce == "max"):
        exps = [
            e
            for e in c.einsums
            if m.output in e.inputs and isinstance(e.expr, Op) and e.expr.op == "exp"
        ]
        before = nx.ancestors(g, m.output)
        qk = [e for e in c.einsums if is_contraction(e) and e.output in before]
        av = [
            e
            for x in exps
            for e in c.einsums
            if is_contraction(e) and e.output in nx.descendants(g, x.output)
        ]
        found += bool(exps and qk and av)
    return found


def test_einfuse_embeddings_equal_the_uncompiled_model(
    params: dict[str, Any], tokens: tuple[np.ndarray, np.ndarray]
) -> None:
    with jax.disable_jit():
        eager = np.asarray(minilm.encode(params, *tokens))
    got = np.asarray(encode(params, *tokens))
    assert got.shape == (len(minilm.SENTENCES), params["config"].hidden_size)
    assert np.abs(got - eager).max() < 1e-5


def test_attention_is_lifted_into_a_cascade_in_every_layer(
    program: Program, params: dict[str, Any]
) -> None:
    per_region = [attentions(r.cascade) for r in program.regions]
    assert sum(per_region) == len(params["layers"]) == 6
    assert max(per_region) == 1  # one layer's attention per region, between head merges


def test_explain_shows_the_lifted_attention_and_the_opaque_gather(
    params: dict[str, Any], tokens: tuple[np.ndarray, np.ndarray]
) -> None:
    text = encode.explain(params, *tokens)
    assert text.count("reduce_max x1") == 6
    assert "gather at " in text and "minilm.py:" in text


def test_fuse_rewrites_attention_in_every_layer_and_keeps_the_embeddings(
    params: dict[str, Any], tokens: tuple[np.ndarray, np.ndarray]
) -> None:
    from einfuse.passes.fuse import fused_groups

    ids, mask = tokens
    fused = jit(minilm.encode, passes="fuse{tile=32}")
    got = np.asarray(fused(params, ids, mask))
    want = np.asarray(jax.jit(minilm.encode)(params, ids, mask))
    assert np.abs(got - want).max() < 1e-5
    traced = fused.trace(params, ids, mask)
    assert sum(len(fused_groups(r.cascade)) for r in traced.program.regions) == 6
    # BERT's padding bias (1 - mask) * finfo.min is recognized: all-padded key tiles skip.
    sources = [em.source() for em in traced.runner.emitted.values()]
    skipping = "key padding from input (additive bias): all-masked key tiles skipped where exact"
    assert sum(skipping in s for s in sources) == 6


def test_bfloat16_minilm_fuses_attention_in_every_layer(
    params: dict[str, Any], tokens: tuple[np.ndarray, np.ndarray]
) -> None:
    """The model in bfloat16 (weights and activations) fuses as in float32, and its
    embeddings are as close to the float32 model's as ``jax.jit``'s bfloat16 ones are."""
    from einfuse.passes.fuse import fused_groups

    ids, mask = tokens
    half = jax.tree_util.tree_map(lambda x: x.astype(jax.numpy.bfloat16), params)
    fused = jit(minilm.encode, passes="fuse{tile=32}")
    got = np.asarray(fused(half, ids, mask), np.float32)
    want = np.asarray(jax.jit(minilm.encode)(half, ids, mask), np.float32)
    full = np.asarray(jax.jit(minilm.encode)(params, ids, mask))
    regions = fused.trace(half, ids, mask).program.regions
    assert sum(len(fused_groups(r.cascade)) for r in regions) == 6

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # bfloat16 norms are not quite 1
        return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    # As accurate as jax.jit's own bfloat16 model (to the float32 one), and close to it.
    assert cos(got, full).min() >= cos(want, full).min() - 2e-3
    assert cos(got, want).min() >= 0.995
