"""One compile path: what the autotuner tunes and measures is the program einfuse.jit replays."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einfuse
from einfuse.autotune.measure import program_hlo
from einfuse.autotune.store import TuningStore, write_best_file
from einfuse.compile_path import ScheduleMismatch, canonicalize, trace_canonical
from einfuse.frontend import jit


def multi_head(q, k, v):  # [batch, heads, seq, dim]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def grouped_query(q, k, v):  # q [batch, 4 heads, seq, dim]; k, v [batch, 2 heads, seq, dim]
    b, h, n, d = q.shape
    qg = q.reshape(b, k.shape[1], h // k.shape[1], n, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k) * 0.25
    o = jnp.einsum("bhgqk,bhkd->bhgqd", jax.nn.softmax(s, axis=-1), v)
    return o.reshape(b, h, n, d)


def batched(q, k, v):  # [batch, seq, dim]
    s = jnp.einsum("bqd,bkd->bqk", q, k) * 0.25
    return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v)


N = 256
CASES = {
    "multi_head": (multi_head, [(1, 2, N, 16)] * 3),
    "grouped_query": (grouped_query, [(1, 4, N, 16), (1, 2, N, 16), (1, 2, N, 16)]),
    "batched": (batched, [(2, N, 16)] * 3),
}


def _args(shapes):
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    return tuple(jax.random.normal(key, s) for key, s in zip(keys, shapes))


def _replay(fn, args, storage, *, run: bool = False):
    """What ``jit(autotune=storage)`` compiles (and, with ``run``, that it computes ``fn``)."""
    compiled = jit(fn, autotune=storage)
    traced = compiled.trace(*args)
    if run:
        np.testing.assert_allclose(compiled(*args), jax.jit(fn)(*args), rtol=2e-4, atol=2e-5)
    return traced


@pytest.mark.parametrize("case", list(CASES))
def test_the_program_the_model_chose_is_the_program_jit_replays(case, tmp_path):
    fn, shapes = CASES[case]
    args = _args(shapes)
    storage = str(tmp_path / "tune.db")
    (result,) = einfuse.autotune(
        fn, *args, objective="model", storage=storage, progress=False
    ).results
    assert result.pipeline.startswith("fuse")  # the canonical cascade fuses (it did not before)
    traced = _replay(fn, args, storage)
    (compiled,) = traced.compiled
    assert (compiled.pipeline, compiled.schedule) == (result.pipeline, result.schedule)
    chosen = program_hlo(result.cascade, result.sizes, result.pipeline, result.schedule)
    assert traced.runner.region_hlo(0) == chosen
    assert traced.runner.emitted[0].lowered().query is not None  # one fused loop


def test_the_program_measured_is_the_program_jit_replays(tmp_path):
    fn, shapes = CASES["multi_head"]
    args = _args(shapes)
    storage = str(tmp_path / "tune.db")
    (result,) = einfuse.autotune(
        fn, *args, objective="measure", trials=3, repeats=1, storage=storage, progress=False
    ).results
    assert result.hlo is not None and result.race
    traced = _replay(fn, args, storage, run=True)
    assert traced.runner.region_hlo(0) == result.hlo


def test_a_stored_schedule_naming_a_rank_the_cascade_lacks_is_refused(tmp_path):
    """The old tuner stored schedules naming ranks (``g``) that unify-ranks had merged away."""
    fn, shapes = CASES["multi_head"]
    args = _args(shapes)
    storage = str(tmp_path / "tune.db")
    einfuse.autotune(fn, *args, objective="model", trials=50, storage=storage, progress=False)
    (record,) = TuningStore(storage).records()
    write_best_file(tmp_path / "best.json", [replace(record, schedule="tile zz=16")])
    with pytest.raises(ScheduleMismatch, match=r"names rank.*zz.*tune again"):
        jit(fn, autotune=str(tmp_path / "best.json")).trace(*args)


def test_canonical_form_is_a_fixpoint():
    fn, shapes = CASES["grouped_query"]
    (region,) = trace_canonical(fn, _args(shapes)).regions
    assert canonicalize(region.cascade) == region.cascade


def test_explain_says_what_each_pass_did_to_each_region():
    fn, shapes = CASES["batched"]
    args = _args(shapes)
    fused = jit(fn, passes="fuse{tile=64}").explain(*args)
    assert "fuse: fused " in fused and "(tile 64)" in fused
    plain = jit(lambda x, y: jnp.tanh(x @ y), passes="fuse").explain(*_args([(8, 8)] * 2))
    assert "fuse: unchanged — no rank takes more than one pass" in plain
    assert "  pass fuse" not in fused + plain
