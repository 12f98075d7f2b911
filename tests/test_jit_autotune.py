"""einfuse.jit(autotune=...) reuses what the tuner stored, without searching again."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einfuse.autotune.store import TuningStore, write_best_file
from einfuse.autotune.tuner import autotune
from einfuse.frontend import jit


def attn(q, k, v):
    return jax.nn.softmax(jnp.einsum("qd,kd->qk", q, k), axis=-1) @ v


def _inputs(n: int = 1024):
    return tuple(jax.random.normal(jax.random.PRNGKey(i), (n, 16)) for i in range(3))


def test_jit_reuses_the_stored_pipeline(tmp_path):
    store = str(tmp_path / "tune.db")
    q, k, v = _inputs()
    result = autotune(attn, q, k, v, objective="model", storage=store, progress=False)
    (tuned,) = {r.pipeline for r in result.results}
    compiled = jit(attn, autotune=store)
    history = compiled.trace(q, k, v).pass_history[0]
    passes = [name for name, _ in history if ": " not in name]  # not fuse's inner rewrites
    assert passes == [*filter(None, tuned.split(","))]
    np.testing.assert_allclose(compiled(q, k, v), jax.jit(attn)(q, k, v), rtol=1e-4, atol=1e-5)


def test_without_a_stored_result_the_given_passes_run(tmp_path):
    from einfuse.frontend import NoTunedResultWarning

    q, k, v = _inputs(256)
    compiled = jit(attn, passes="dce", autotune=str(tmp_path / "empty.db"))
    with pytest.warns(NoTunedResultWarning, match="these run passes dce"):
        history = compiled.trace(q, k, v).pass_history[0]
    assert [name for name, _ in history] == ["dce"]


def test_jit_emits_the_stored_schedules_query_tile(tmp_path):
    """A record whose schedule tiles the queries by 128: the blockwise loop follows it."""
    store = str(tmp_path / "tune.db")
    q, k, v = _inputs()
    autotune(attn, q, k, v, objective="model", storage=store, progress=False)
    (record,) = TuningStore(store).records()
    query = jit(attn, passes="fuse").trace(q, k, v).runner.emitted[0].lowered().query
    chosen = replace(record, pipeline="fuse{tile=256}", schedule=f"tile {query}=128")
    write_best_file(tmp_path / "best.json", [chosen])
    compiled = jit(attn, autotune=str(tmp_path / "best.json"))
    loop = compiled.trace(q, k, v).runner.emitted[0].lowered()
    assert (loop.q_tile, loop.q_blocks) == (128, 1024 // 128)
    np.testing.assert_allclose(compiled(q, k, v), jax.jit(attn)(q, k, v), rtol=1e-4, atol=1e-5)


def test_nothing_stored_warns_once_naming_the_regions_and_keys_and_explain_says_so(tmp_path):
    import warnings

    from einfuse.frontend import NoTunedResultWarning

    q, k, v = _inputs(64)
    store = tmp_path / "empty.db"
    compiled = jit(attn, autotune=str(store))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(q, k, v)
        compiled(q, k, v)
        compiled.trace(q, k, v)
    (warning,) = [w for w in caught if issubclass(w.category, NoTunedResultWarning)]
    key = compiled.trace(q, k, v).tuning[0]
    assert "region 0: key " in str(warning.message) and str(store) in str(warning.message)
    assert "nothing stored for key" in key and "cpu on cpu:" in key
    text = compiled.explain(q, k, v)
    assert "autotune: nothing stored for key" in text and "ran passes none" in text
    assert not store.exists()  # looking up creates no store
