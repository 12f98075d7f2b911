"""The backend seam: a named `Backend` declares what it reads of a Schedule and what it can
place, `jit`/`autotune`/the CLI take its name, and the name is part of the tuning key."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einfuse.autotune.measure import consumed
from einfuse.autotune.space import PIPELINE_KINDS
from einfuse.autotune.tuner import autotune
from einfuse.backends import backend as backends
from einfuse.backends.backend import UnknownBackend, get_backend
from einfuse.frontend import NoTunedResultWarning, jit


def attn(q, k, v):
    return jax.nn.softmax(jnp.einsum("qd,kd->qk", q, k), axis=-1) @ v


def inputs(n: int = 256) -> tuple[jax.Array, ...]:
    return tuple(jax.random.normal(jax.random.PRNGKey(i), (n, 16)) for i in range(3))


def test_the_jax_backend_declares_what_it_reads_and_places() -> None:
    jax_backend = get_backend()
    assert jax_backend.name == "jax" and jax_backend.schedule_fields == {"fuse.query_tile"}
    assert jax_backend.placements == frozenset()  # XLA places tensors: nothing to search
    assert consumed(jax_backend) == PIPELINE_KINDS | {"fuse.query_tile"}
    assert "cuda" in jax_backend.platforms and "tpu" in jax_backend.platforms


def test_an_unknown_backend_is_refused_by_name() -> None:
    with pytest.raises(UnknownBackend, match="unknown backend 'cuda'; known: jax, pallas"):
        jit(attn, backend="cuda")
    with pytest.raises(UnknownBackend, match="nope"):
        autotune(attn, *inputs(), backend="nope", objective="model", progress=False)


def test_a_result_tuned_for_one_backend_is_never_replayed_on_another(tmp_path, monkeypatch):
    twin = replace(get_backend("jax"), name="twin")  # the same code under another name
    monkeypatch.setitem(backends.BACKENDS, "twin", lambda: twin)
    store = str(tmp_path / "tune.db")
    q, k, v = inputs()
    result = autotune(attn, q, k, v, objective="model", storage=store, backend="twin")
    (key,) = {r.key.backend for r in result.results}
    assert key == "twin"
    with pytest.warns(NoTunedResultWarning):  # the jax backend finds nothing of twin's
        jit(attn, autotune=store).trace(q, k, v)
    replayed = jit(attn, autotune=store, backend="twin")
    assert replayed.trace(q, k, v).compiled[0].pipeline == result.results[0].pipeline
    np.testing.assert_allclose(replayed(q, k, v), jax.jit(attn)(q, k, v), rtol=1e-4, atol=1e-5)


def test_the_tuner_offers_only_placements_the_backend_carries_out(monkeypatch) -> None:
    from einfuse.autotune.space import SpaceOptions
    from einfuse.autotune.tuner import _for_backend
    from einfuse.einsum_cascade import attention

    c = attention("3pass").with_sizes(b=1, h=2, e=64, f=64, p=1024, m=1024)
    result = autotune(c, target="h200", objective="model", storage="memory", progress=False)
    assert result.schedule is not None and "tile" in str(result.schedule)
    assert "place" not in str(result.schedule)  # XLA places tensors; nothing is claimed
    placing = replace(get_backend(), name="placing", placements=frozenset({"shared_memory"}))
    assert _for_backend(None, get_backend()).providers is not None
    assert "placement" not in _for_backend(None, get_backend()).providers
    assert _for_backend(SpaceOptions(), placing) == SpaceOptions(backend="placing")
