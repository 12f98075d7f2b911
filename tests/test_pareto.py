"""The Pareto search over pruning pipelines (``--objective pareto``) on a tiny random MiniLM."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

import einfuse
from einfuse.autotune.pareto import pareto_search, stored_result
from einfuse.autotune.pareto_result import (
    ParetoPoint,
    ParetoResult,
    choose,
    pareto_front,
    plot_front,
)
from einfuse.autotune.store import TuningStore
from einfuse.cli import main
from einfuse.explain_pruning import pruning_points
from examples import minilm
from tests import pareto_metric

MAX_LOSS = 0.05
COMMON = ["--target", "cpu", "--no-calibrate", "--quiet", "--seed", "0"]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search by the command line, stored in an SQLite file; and its front plotted."""
    root = tmp_path_factory.mktemp("pareto")
    db = str(root / "tuning.db")
    code, out, err = cli(
        "autotune", "examples.minilm:encode", "--objective", "pareto", "--time", "model",
        "--metric", "tests.pareto_metric:loss", "--max-loss", str(MAX_LOSS), "--trials", "4",
        "--prune", "tokens", "--storage", db, "--plot", str(root / "plots"), *COMMON,
    )  # fmt: skip
    assert code == 0, err
    (study,) = TuningStore(db).studies()
    result = stored_result(TuningStore(db).find_study(study["study"]))
    return db, out, root / "plots", result


def test_the_search_prints_the_front_and_plots_it(searched) -> None:
    _, out, plots, result = searched
    assert "Pareto front (cost-model time" in out
    assert f"chosen: the fastest candidate with loss <= {MAX_LOSS:g}" in out
    assert (plots / f"{result.study.study_name}-front.png").stat().st_size > 1000


def test_the_stored_front_is_non_dominated_and_the_choice_within_the_bound(searched) -> None:
    _, _, _, result = searched
    ok = [p for p in result.points if p.ok]
    assert len(result.points) == 4 and any(p.pipeline == "" for p in ok)  # dense: a candidate
    front = result.front
    assert not any(a.dominates(b) for a in front for b in front)
    assert all(p in front or any(q.dominates(p) for q in front) for p in ok)
    feasible = [p for p in ok if p.loss <= MAX_LOSS]
    assert result.chosen.loss <= MAX_LOSS
    assert result.chosen.time == min(p.time for p in feasible)
    assert result.chosen.pipeline.startswith("prune-tokens")  # pruning pays here


def test_show_lists_every_stored_candidate(searched) -> None:
    db, _, _, result = searched
    code, out, _ = cli("autotune", "--show", result.study.study_name, "--storage", db)
    assert code == 0
    assert "Pareto front" in out and out.count("prune-tokens") >= 3
    assert f"chosen  {result.chosen.pipeline}" in out


def test_the_stored_choice_replays_through_jit(searched, tmp_path) -> None:
    db, _, _, result = searched
    call = pareto_metric.calibration()[0]
    replayed = einfuse.jit(minilm.encode, autotune=db)
    want = einfuse.jit(minilm.encode, passes=result.chosen.pipeline)(*call)
    assert np.array_equal(np.asarray(replayed(*call)), np.asarray(want))
    traced = replayed.trace(*call)
    assert result.chosen.pipeline in traced.program_tuning
    assert pruning_points(traced.program)  # the replayed program prunes
    exported = str(tmp_path / "best.json")
    assert cli("autotune", "--export", exported, "--storage", db)[0] == 0
    from_json = einfuse.jit(minilm.encode, autotune=exported)
    assert np.array_equal(np.asarray(from_json(*call)), np.asarray(want))


def test_a_second_search_measures_only_what_is_new(searched) -> None:
    db, _, _, first = searched
    again = pareto_search(
        minilm.encode, pareto_metric.calibration(), pareto_metric.loss, max_loss=MAX_LOSS,
        target="cpu", time_mode="model", trials=4, prune=["tokens"], storage=db,
        progress=False, metric_name="tests.pareto_metric:loss",
    )  # fmt: skip
    assert again.new_trials == 0
    assert again.chosen.pipeline == first.chosen.pipeline


def test_failed_candidates_are_recorded_never_chosen_and_dense_is_the_fallback() -> None:
    result = pareto_search(
        minilm.encode, pareto_metric.small_calibration(), pareto_metric.nan_when_pruned,
        max_loss=-1.0, target="cpu", time_mode="measure", trials=2, repeats=1,
        prune=["tokens"], storage="memory", progress=False, seed=1,
    )  # fmt: skip
    (failed,) = result.failed
    assert failed.pipeline.startswith("prune-tokens") and "returned nan" in failed.reason
    assert result.chosen.pipeline == ""
    assert "no candidate has loss <= -1" in result.message
    assert "chose the dense program" in result.table()


def test_autotune_points_at_the_pareto_search() -> None:
    with pytest.raises(einfuse.EinfuseError, match="pareto_search"):
        einfuse.autotune(minilm.encode, objective="pareto")


def test_choose_takes_the_fastest_within_the_bound() -> None:
    points = [
        ParetoPoint(0, "", 1.0, 0.0),
        ParetoPoint(1, "a", 0.5, 0.2),
        ParetoPoint(2, "b", 0.7, 0.04),
        ParetoPoint(3, "c", 0.6, None, reason="boom"),
        ParetoPoint(4, "d", 0.8, 0.03),
    ]
    chosen, _ = choose(points, 0.05)
    assert chosen.pipeline == "b"
    assert [p.pipeline for p in pareto_front(points)] == ["a", "b", "d", ""]
    assert choose(points, 0.5)[0].pipeline == "a"
    raced, message = choose(points, 0.05, race={"": 1.0, "b": 0.9, "d": 0.6})
    assert raced.pipeline == "d" and "final race of 3" in message  # the race decides
    assert not math.isnan(choose(points, 0.0)[0].time)


def test_the_plot_draws_the_race_and_the_choice(tmp_path) -> None:
    points = (ParetoPoint(0, "", 1.0, 0.0), ParetoPoint(1, "a", 0.6, 0.01))
    result = ParetoResult(None, points, points[1], 0.02, "m:f", "measure", "", race={"a": 0.7})
    (line,) = plot_front(result, tmp_path)
    assert line == f"wrote {tmp_path / 'pareto-front.png'}"
    assert (tmp_path / "pareto-front.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("tests.no_such_module:loss", "cannot import 'tests.no_such_module'"),
        ("tests.pareto_metric:no_such_fn", "has no attribute 'no_such_fn'"),
        ("tests.pareto_metric:raising", "raised ValueError: no quality today"),
        ("tests.pareto_metric:text", "returned str 'good', not a number"),
    ],
)
def test_a_bad_metric_is_one_clear_line(metric: str, message: str) -> None:
    code, out, err = cli(
        "autotune", "examples.minilm:encode", "--objective", "pareto", "--metric", metric,
        "--max-loss", "0.1", "--calibration", "tests.pareto_metric:small_calibration",
        "--storage", "memory", *COMMON,
    )  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith("einfuse: error: ") and message in err and err.count("\n") == 1


def test_a_metric_module_without_calibration_is_refused() -> None:
    code, _, err = cli(
        "autotune", "examples.minilm:encode", "--objective", "pareto",
        "--metric", "tests.prune_model:reference", "--max-loss", "0.1", "--storage", "memory",
        *COMMON,
    )  # fmt: skip
    assert code == 2 and "has no function `calibration`" in err
