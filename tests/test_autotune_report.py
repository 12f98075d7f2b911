"""The tuner's report is its trials: one final race decides, and every report prints its medians.

A fake clock replays what a shared machine did in the issue: while searching, the default
looked fast (12.51 ms) and the others slow (18.59 ms); in the final race, where all run
interleaved, the candidate measured last is by far the fastest and the default the slowest.
"""

from __future__ import annotations

import pytest

from einfuse.autotune import measure, measured
from einfuse.autotune.space import SpaceOptions
from einfuse.autotune.timing import Timing
from einfuse.autotune.tuner import autotune
from einfuse.cli import main
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade import attention

SEARCH_DEFAULT, SEARCH_OTHER = 12.51e-3, 18.59e-3
RACE_FASTEST, RACE_DEFAULT = 4.321e-3, 27.35e-3


@pytest.fixture
def fake_clock(monkeypatch):
    """Bench.time by candidate pipeline; ``seen`` lists non-default pipelines as first timed."""
    state = {"race": False, "seen": []}

    def time(self, prepared, *, warmup=1, repeats=5, seed=0):
        out = {}
        for name, p in prepared.items():
            pipeline = p.candidate.pipeline
            if pipeline and pipeline not in state["seen"]:
                state["seen"].append(pipeline)
            if not state["race"]:
                t = SEARCH_OTHER if pipeline else SEARCH_DEFAULT
            elif not pipeline:
                t = RACE_DEFAULT
            elif pipeline == state["seen"][-1]:
                t = RACE_FASTEST
            else:
                t = 20e-3 + 1e-3 * state["seen"].index(pipeline)
            out[name] = Timing.from_samples([t] * repeats)
        return out

    race = measured.MeasuredSearch.race

    def racing(self, finalists):
        state["race"] = True
        return race(self, finalists)

    monkeypatch.setattr(measure.Bench, "time", time)
    monkeypatch.setattr(measured.MeasuredSearch, "race", racing)
    return state


def test_the_winner_is_the_fastest_of_one_race_of_all_candidates_and_every_report_agrees(
    fake_clock, tmp_path, capsys
):
    storage = str(tmp_path / "tune.db")
    cascade = attention("3pass", heads=False, batch=False, p=128, m=128, e=8, f=8)
    result = autotune(
        cascade,
        target=get_target("cpu", calibrate=False),
        objective="measure",
        trials=4,
        storage=storage,
        progress=False,
        repeats=2,
        space_options=SpaceOptions(providers=("fuse",)),
    )
    assert len(fake_clock["seen"]) == 3  # the default and three others were measured
    # every measured candidate raced, the default too; the race's fastest won
    assert len(result.race) == 4 and sum(r["default"] for r in result.race) == 1
    assert result.pipeline == fake_clock["seen"][-1]
    assert [r["pipeline"] for r in result.race if r["chosen"]] == [result.pipeline]
    # both rows of the table are medians of that race
    assert result.measured_s == pytest.approx(RACE_FASTEST)
    assert result.default_measured_s == pytest.approx(RACE_DEFAULT)
    summary = result.table()
    assert main(["autotune", "--show", result.study.study_name, "--storage", storage]) == 0
    shown = capsys.readouterr().out
    assert "in the final race: measured 4.321 ms, default 27.35 ms" in shown
    race_lines = [line for line in summary.splitlines() if "27.35" in line or "4.321" in line]
    assert len(race_lines) == 4  # table rows (tuned, default) and race rows (chosen, default)
    for line in race_lines[2:]:
        assert line in shown  # --show prints the very race the summary printed
