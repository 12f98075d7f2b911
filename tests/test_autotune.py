"""The autotuner: the space, the model objective, and measured candidates that fail."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from einfuse.autotune import space as space_module
from einfuse.autotune.measure import Bench, Prepared, consumed, jax_backend, sliceable_rank
from einfuse.autotune.objectives import TuningError
from einfuse.autotune.screen import ModelEvaluator, screen
from einfuse.autotune.space import Param, SearchSpace, SpaceOptions, build_space, register_space
from einfuse.autotune.tuner import autotune
from einfuse.backends.backend import Backend
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade import attention
from einfuse.ir import parse
from einfuse.ir.cascade import bind_sizes

CPU = get_target("cpu", calibrate=False)


def small_attention(n: int = 64, causal: bool = False):
    return attention("3pass", causal=causal, heads=False, batch=False, p=n, m=n, e=8, f=8)


# --------------------------------------------------------------------------- the space
def test_default_point_is_in_the_space_and_deterministic():
    c = small_attention(4096)
    space = build_space(c, CPU, bind_sizes(c))
    points = list(space.points())
    assert space.default_point() in points
    assert build_space(c, CPU, bind_sizes(c)).default_point() == space.default_point()
    assert len(points) == len(set(points)) == space.size()


def test_fuse_is_on_by_default_only_when_it_makes_two_tiles():
    for n, expected in ((4096, True), (256, False)):
        c = small_attention(n)
        space = build_space(c, CPU, bind_sizes(c))
        assert dict(space.default_point())["fuse"] is expected


def test_tile_choices_are_powers_of_two_and_divisors_up_to_the_size():
    c = attention("3pass", heads=False, batch=False, p=384, m=4096, e=8, f=8)
    space = build_space(c, CPU, bind_sizes(c))
    choices = space.param("tile.p").choices
    assert 384 in choices and 128 in choices and 192 in choices
    assert all(t <= 384 and (t & (t - 1) == 0 or 384 % t == 0) for t in choices)


def test_tiles_are_bounded_by_on_chip_capacity():
    c = small_attention(1 << 20)
    h100 = get_target("h100")
    small = build_space(c, h100, bind_sizes(c)).param("fuse.tile").choices
    large = build_space(c, CPU, bind_sizes(c)).param("fuse.tile").choices
    assert max(small) < max(large)
    assert max(small) * 8 * 4 <= 233472  # 8 = the minimal tile of e in K[e, m], 4 B floats


def test_a_tile_claimed_by_fusion_is_offered_only_while_fusion_is_off():
    c = small_attention(4096)
    space = build_space(c, CPU, bind_sizes(c))
    assert space.param("tile.m").when == ("fuse", False)
    fused = space.candidate(space.point({"fuse": True, "tile.m": 64}))
    assert fused.pipeline == "fuse{tile=512}" and fused.schedule.tile("m") is None
    unfused = space.candidate(space.point({"fuse": False, "tile.m": 64}))
    assert unfused.pipeline == "" and unfused.schedule.tile("m") == 64


def test_the_blockwise_query_tile_is_searched_while_fusion_is_on():
    c = small_attention(4096)
    space = build_space(c, CPU, bind_sizes(c))
    query = space.param("fuse.query_tile")
    assert (query.subject, query.when, query.default) == ("p", ("fuse", True), 512)
    assert space.param("tile.p").when == ("fuse", False)
    measured = {p.name for p in space.params if p.consumed_by(consumed(jax_backend()))}
    assert measured == {"fuse", "fuse.tile", "fuse.query_tile"}
    fused = space.candidate(space.point({"fuse": True, "fuse.query_tile": 128}))
    assert fused.schedule.tile("p") == 128


def test_a_measured_query_tile_runs_that_tile_and_passes_the_check():
    c = small_attention(256, causal=True)
    space = build_space(c, CPU, bind_sizes(c), SpaceOptions(min_tiled_size=8))
    point = space.point({"fuse": True, "fuse.tile": 64, "fuse.query_tile": 128})
    bench = Bench(c, bind_sizes(c))
    prepared = bench.prepare(space.candidate(point))
    assert isinstance(prepared, Prepared), prepared
    cascade = bench.transformed(prepared.candidate.pipeline)
    emitted = jax_backend().emit(cascade, bind_sizes(cascade), prepared.candidate.schedule)
    assert emitted.lowered().q_tile == 128


def test_a_registered_provider_extends_the_space_and_the_pipeline(monkeypatch):
    monkeypatch.setattr(space_module, "_PROVIDERS", dict(space_module.space_providers()))

    @register_space("test-dce")
    def dce_toggle(ctx):
        return (Param("dce", "pass", "dce", (False, True), False),)

    c = small_attention(256)
    space = build_space(c, CPU, bind_sizes(c), SpaceOptions(providers=("test-dce", "tiles")))
    assert [p.name for p in space.params] == ["dce", "tile.p", "tile.m"]
    assert space.candidate(space.point({"dce": True})).pipeline == "dce"


# --------------------------------------------------------------------------- the model
def test_model_objective_finds_the_models_optimum_of_a_small_space():
    c = small_attention(512, causal=True)
    sizes = bind_sizes(c)
    result = autotune(c, target=CPU, objective="model", storage="memory", progress=False)
    space = build_space(c, CPU, sizes)
    evaluator = ModelEvaluator(c, CPU, sizes)
    names = [p.name for p in space.params]
    best = math.inf
    for values in itertools.product(*(p.choices for p in space.params)):  # every combination
        point = space.point(dict(zip(names, values)))
        best = min(best, evaluator.estimate(space.candidate(point))[0])
    assert result.trials_done == space.size()
    assert result.predicted_s == pytest.approx(best)
    assert result.predicted_s <= result.default_predicted_s


def test_search_of_a_large_space_finds_the_optimum_of_a_smooth_objective():
    params = tuple(Param(f"x{i}", "tile", f"r{i}", tuple(range(10)), 0) for i in range(5))
    space = SearchSpace(params)
    target = {"x0": 7, "x1": 2, "x2": 5, "x3": 9, "x4": 3}

    def bowl(point):
        return float(sum((v - target[k]) ** 2 for k, v in point)), ""

    result = screen(space, bowl, budget=2000, seed=1)
    assert not result.exhaustive and result.evaluated <= 2000 < space.size()
    assert result.scores[0].seconds == 0.0


def test_equal_model_scores_prefer_the_default_then_smaller_tiles():
    space = SearchSpace((Param("tile.p", "tile", "p", (64, 16, 32), 64),))
    flat = screen(space, lambda point: (1.0, ""), budget=10)
    assert flat.scores[0].point == space.default_point()
    space = SearchSpace((Param("tile.p", "tile", "p", (16, 32, 64), 16),))
    ranked = screen(space, lambda point: (0.0 if dict(point)["tile.p"] > 16 else 1.0, ""), 10)
    assert ranked.scores[0].point == (("tile.p", 32),)


# --------------------------------------------------------------------------- measuring
def test_the_numeric_check_slices_queries_and_never_the_key_rank():
    c = small_attention(64, causal=True)
    assert sliceable_rank(c, bind_sizes(c)) == "p"
    bench = Bench(c, bind_sizes(c))
    oracle = bench._prefix_oracle(8)
    assert oracle["AV"].shape == (8, 8)


def faulty_backend(raise_for: str, wrong_for: str) -> Backend:
    """The JAX backend, except one pipeline fails to build and another returns garbage."""
    real = jax_backend()

    def emit(cascade, sizes, schedule):
        fn = real.emit(cascade, sizes, schedule)
        tile = next((p.tile for p in cascade.partitions), None)
        if f"tile={tile}" == raise_for:
            raise RuntimeError("simulated backend crash")
        if f"tile={tile}" == wrong_for:
            return lambda *args: tuple(o * 0 for o in fn(*args))  # fast, and wrong
        return fn

    return Backend("faulty", emit, real.schedule_fields)


def test_failing_candidates_are_recorded_with_their_reason_and_never_win():
    c = small_attention(64)
    result = autotune(
        c,
        target=CPU,
        objective="measure",
        trials=4,
        storage="memory",
        progress=False,
        backend=faulty_backend("tile=16", "tile=32"),
        repeats=3,
        space_options=SpaceOptions(providers=("fuse",)),
    )
    reasons = {
        t.user_attrs.get("pipeline"): t.user_attrs.get("reason") for t in result.study.trials
    }
    assert "simulated backend crash" in reasons["fuse{tile=16}"]
    assert reasons["fuse{tile=32}"].startswith("wrong numbers")
    states = {t.user_attrs.get("pipeline"): t.state.name for t in result.study.trials}
    assert states["fuse{tile=16}"] == states["fuse{tile=32}"] == "FAIL"
    assert result.pipeline not in ("fuse{tile=16}", "fuse{tile=32}")
    assert result.trials_failed == 2 and result.measurements == 2
    assert result.measured_s is not None and result.default_measured_s is not None


def test_hybrid_measures_the_models_best_programs_and_the_default():
    c = small_attention(128)
    sizes = bind_sizes(c)
    result = autotune(
        c, target=CPU, objective="hybrid", trials=2, storage="memory", progress=False, repeats=3
    )
    space = build_space(c, CPU, sizes)
    evaluator = ModelEvaluator(c, CPU, sizes)
    by_pipeline: dict[str, float] = {}
    for point in space.points():
        candidate = space.candidate(point)
        seconds = evaluator.estimate(candidate)[0]
        by_pipeline[candidate.pipeline] = min(
            by_pipeline.get(candidate.pipeline, math.inf), seconds
        )
    measured = {t.user_attrs["pipeline"] for t in result.study.trials}
    default = space.candidate(space.default_point()).pipeline
    runner_up = min((p for p in by_pipeline if p != default), key=by_pipeline.get)
    assert measured == {default, runner_up}  # the default always, then the model's best other
    assert result.measurements == 2
    assert result.pipeline in measured


def test_hybrid_refuses_to_run_when_the_model_prices_no_candidate():
    """float16 has no rate on the CPU target: hybrid would measure the default alone."""
    c = small_attention(32)
    c = replace(c, inputs=tuple(replace(t, dtype="float16") for t in c.inputs))
    with pytest.raises(
        TuningError, match=r"hybrid: the cost model refused every candidate.*float16"
    ):
        autotune(c, target=CPU, objective="hybrid", trials=2, storage="memory", progress=False)


def test_bfloat16_attention_is_priced_and_tuned_by_hybrid():
    c = small_attention(64)
    c = replace(c, inputs=tuple(replace(t, dtype="bfloat16") for t in c.inputs))
    result = autotune(
        c, target=CPU, objective="hybrid", trials=2, storage="memory", progress=False, repeats=3
    )
    assert result.measurements == 2 and result.trials_failed == 0
    assert result.predicted_s is not None and math.isfinite(result.predicted_s)


def test_sizes_given_for_a_spec_replace_the_sizes_it_declares():
    """The design's spec declares p=m=4096 in bfloat16; tuning it at 32 measures at 32."""
    spec = Path(__file__).parents[1] / "examples" / "specs" / "attention_3pass.ein"
    c = parse(spec.read_text())
    sizes = {"e": 8, "f": 8, "p": 32, "m": 32}
    result = autotune(
        c, sizes=sizes, target=CPU, objective="hybrid", trials=2, storage="memory",
        progress=False, repeats=3,
    )  # fmt: skip
    assert result.measurements == 2 and result.trials_failed == 0
    assert {r: n for r, n in result.key.sizes} == sizes


def test_relative_error_flags_nan_and_accepts_matching_infinities():
    from einfuse.autotune.measure import relative_error

    want = np.array([1.0, -np.inf, 2.0])
    assert relative_error(np.array([1.0, -np.inf, 2.0]), want) == 0.0
    assert relative_error(np.array([1.0, np.nan, 2.0]), want) == math.inf
    assert relative_error(np.array([1.0, -np.inf, 2.2]), want) == pytest.approx(0.1)


def test_an_expired_timeout_measures_nothing_new_and_the_default_decides():
    c = small_attention(64)
    result = autotune(
        c,
        target=CPU,
        objective="measure",
        trials=3,
        timeout=0.0,
        storage="memory",
        progress=False,
        repeats=2,
        space_options=SpaceOptions(providers=("fuse",)),
    )
    assert result.measurements == result.trials_done == 0
    assert result.pipeline == result.default_pipeline
    assert result.measured_s == result.default_measured_s is not None  # raced alone


def test_tuning_a_function_tunes_each_distinct_cascade_it_lifts_to():
    import jax
    import jax.numpy as jnp

    def two_attentions(q, k, v):
        def attend(q, k, v):
            return jax.nn.softmax(q @ k.T / 8.0, axis=-1) @ v

        return attend(q, k, v) + attend(q, k, v)

    spec = jax.ShapeDtypeStruct((512, 64), jnp.float32)
    result = autotune(
        two_attentions, spec, spec, spec, target=CPU, storage="memory", progress=False
    )
    assert len(result.results) >= 1
    fingerprints = [r.key.fingerprint for r in result.results]
    assert len(fingerprints) == len(set(fingerprints))
    assert any(r.space_size > 1 for r in result.results)
    assert "cascade 0" in result.table()


def test_measuring_for_a_target_that_is_not_this_machine_is_refused():
    from einfuse.errors import EinfuseError

    with pytest.raises(EinfuseError, match=r"not target 'h100'.*--objective model"):
        autotune(small_attention(64), target=get_target("h100"), objective="measure",
                 storage="memory", progress=False)  # fmt: skip


def test_fused_schedules_tile_the_rows_the_blockwise_loop_maps_one_at_a_time():
    c = attention("3pass", b=2, h=4, e=8, f=8, p=256, m=256)
    space = build_space(c, CPU, bind_sizes(c))
    fused = space.candidate(space.point({"fuse": True}))
    unfused = space.candidate(space.point({"fuse": False}))
    assert (fused.schedule.tile("b"), fused.schedule.tile("h")) == (1, 1)
    assert unfused.schedule.tile("h") is None
