"""Tests for the noise-aware timing harness (einfuse.autotune.timing)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from einfuse.autotune.timing import Timing, compile_time, time_interleaved
from einfuse.autotune.timing_steal import (
    CpuTimes,
    StealWatch,
    read_cpu_times,
    steal_fraction_between,
)
from einfuse.autotune.timing_subprocess import measure_in_subprocess, timings_from_result
from einfuse.autotune.timing_table import format_table


class FakeStealReader:
    """Counters that advance 100 jiffies per reading; listed measurements show 50% steal."""

    def __init__(self, stolen_measurements: set[int] | None = None, always: bool = False) -> None:
        self.readings = 0
        self.steal = 0
        self.stolen = stolen_measurements or set()
        self.always = always

    def __call__(self) -> CpuTimes:
        # Readings come in (before, after) pairs, one pair per measurement.
        measurement = self.readings // 2
        if self.readings % 2 == 1 and (self.always or measurement in self.stolen):
            self.steal += 50
        self.readings += 1
        return CpuTimes(self.steal, 100 * self.readings)


def test_rounds_run_every_candidate_once_in_shuffled_orders() -> None:
    calls: list[str] = []
    names = ["a", "b", "c", "d"]
    candidates = {n: (lambda n=n: calls.append(n)) for n in names}
    time_interleaved(candidates, warmup=1, repeats=8, rng_seed=3)
    assert calls[:4] == names  # warm-up, in declaration order
    rounds = [tuple(calls[4 + 4 * i : 8 + 4 * i]) for i in range(8)]
    assert len(calls) == 4 + 4 * 8
    assert all(sorted(r) == names for r in rounds)
    assert len(set(rounds)) >= 3


def test_medians_match_synthetic_sleeps() -> None:
    timings = time_interleaved(
        {"short": lambda: time.sleep(0.004), "long": lambda: time.sleep(0.016)},
        warmup=1,
        repeats=5,
    )
    short, long = timings["short"], timings["long"]
    assert len(short.samples) == len(long.samples) == 5
    assert 0.004 <= short.median < 0.012
    assert 0.016 <= long.median < 0.040
    assert long.ratio_to(short) > 1.8
    assert short.min <= short.median and short.iqr >= 0.0


def test_single_candidate_is_timed() -> None:
    timings = time_interleaved({"only": lambda: time.sleep(0.001)}, warmup=0, repeats=3)
    assert list(timings) == ["only"]
    assert len(timings["only"].samples) == 3


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_time_is_recorded_per_sample() -> None:
    timings = time_interleaved(
        {"sleep": lambda: time.sleep(0.01), "spin": lambda: _spin(0.01)}, warmup=0, repeats=3
    )
    assert len(timings["spin"].cpu_samples) == 3
    assert timings["sleep"].cpu_median < 0.005
    assert timings["spin"].cpu_median >= 0.01


def test_samples_taken_under_steal_are_discarded_and_retaken() -> None:
    reader = FakeStealReader(stolen_measurements={0, 1})
    timings = time_interleaved({"x": lambda: None}, warmup=0, repeats=3, steal_reader=reader)
    assert timings["x"].discarded == 2
    assert timings["x"].kept_noisy == 0
    assert len(timings["x"].samples) == 3
    assert reader.readings == 2 * 5


def test_steal_retries_are_bounded() -> None:
    reader = FakeStealReader(always=True)
    timings = time_interleaved(
        {"x": lambda: None}, warmup=0, repeats=2, max_retries=2, steal_reader=reader
    )
    assert len(timings["x"].samples) == 2
    assert timings["x"].discarded == 4
    assert timings["x"].kept_noisy == 2


def test_steal_fraction_is_steal_over_total_jiffies() -> None:
    assert steal_fraction_between(CpuTimes(10, 1000), CpuTimes(30, 1100)) == pytest.approx(0.2)
    assert steal_fraction_between(CpuTimes(5, 50), CpuTimes(5, 50)) == 0.0
    now = read_cpu_times()
    assert 0 <= now.steal <= now.total
    with StealWatch(FakeStealReader(always=True)) as watch:
        pass
    assert watch.fraction == pytest.approx(0.5)


def test_timing_statistics_and_ratio() -> None:
    t = Timing.from_samples([3.0, 1.0, 2.0, 5.0, 4.0], discarded=1)
    assert (t.median, t.min, t.iqr, t.discarded) == (3.0, 1.0, 2.0, 1)
    other = Timing.from_samples([1.5])
    assert t.ratio_to(other) == pytest.approx(2.0)
    assert Timing.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="at least one sample"):
        Timing.from_samples([])


def test_compile_time_measures_the_first_call() -> None:
    assert compile_time(lambda s: time.sleep(s), 0.01) >= 0.01


_TARGETS = """
import os
import numpy as np

def allocate(mib):
    def run():
        buf = np.ones(mib * 1024 * 1024 // 8)  # np.ones touches every page
        return float(buf[-1])
    return run

def allocate_in_setup(mib):
    buf = np.ones(mib * 1024 * 1024 // 8)
    return lambda: float(buf.sum())

def pair():
    return {"small": lambda: np.ones(1000).sum(), "big": lambda: np.ones(10**5).sum()}

def fail_in_setup():
    raise RuntimeError("setup broke on purpose")

def abort():
    return os.abort

def sleep_forever():
    import time
    return lambda: time.sleep(60)
"""


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("targets")
    (path / "measure_targets.py").write_text(textwrap.dedent(_TARGETS))
    return path


def test_subprocess_reports_rise_of_peak_memory(targets_dir: Path) -> None:
    result = measure_in_subprocess(
        "measure_targets:allocate", {"mib": 200}, 60, repeats=2, python_path=[targets_dir]
    )
    assert result["error"] is None, result
    assert 180 <= result["rise_mib"] < 400
    assert result["peak_rss_mib"] >= result["baseline_rss_mib"] + result["rise_mib"] - 1
    assert len(timings_from_result(result)["main"].samples) == 2
    assert result["first_call_s"]["main"] > 0


def test_subprocess_baseline_includes_setup_allocations(targets_dir: Path) -> None:
    result = measure_in_subprocess(
        "measure_targets:allocate_in_setup", {"mib": 200}, 60, python_path=[targets_dir]
    )
    assert result["error"] is None, result
    assert result["baseline_rss_mib"] >= 200
    assert result["rise_mib"] < 50


def test_subprocess_times_named_candidates_together(targets_dir: Path) -> None:
    result = measure_in_subprocess("measure_targets:pair", {}, 60, python_path=[targets_dir])
    assert result["error"] is None, result
    assert set(timings_from_result(result)) == {"small", "big"}


def test_subprocess_exception_is_reported_as_error(targets_dir: Path) -> None:
    result = measure_in_subprocess(
        "measure_targets:fail_in_setup", {}, 60, python_path=[targets_dir]
    )
    assert "RuntimeError: setup broke on purpose" in result["error"]
    assert result["returncode"] == 1


def test_subprocess_crash_is_reported_as_error(targets_dir: Path) -> None:
    result = measure_in_subprocess("measure_targets:abort", {}, 60, python_path=[targets_dir])
    assert "SIGABRT" in result["error"]


def test_subprocess_timeout_is_reported_as_error(targets_dir: Path) -> None:
    result = measure_in_subprocess(
        "measure_targets:sleep_forever", {}, 1.0, python_path=[targets_dir]
    )
    assert result["error"].startswith("timeout")
    assert result["wall_s"] < 30


def test_subprocess_over_memory_limit_is_killed(targets_dir: Path) -> None:
    result = measure_in_subprocess(
        "measure_targets:allocate",
        {"mib": 2000},
        60,
        memory_limit_mib=300,
        python_path=[targets_dir],
    )
    assert result["error"].startswith("memory limit exceeded")


def test_format_table_aligns_columns() -> None:
    rows = [{"name": "xla", "ms": 12.5, "n": 3}, {"name": "blockwise", "ms": 1.25, "n": None}]
    lines = format_table(rows, ["name", "ms", "n"]).splitlines()
    assert lines[0].split() == ["name", "ms", "n"]
    assert lines[2].startswith("xla ") and lines[3].rstrip().endswith("-")
    assert len({len(line) for line in lines[:3]}) == 1
    assert lines[2].index("12.5") + 4 == lines[3].index("1.25") + 4
    md = format_table(rows, ["name", "ms"], formats={"ms": ".1f"}, markdown=True).splitlines()
    assert md[1] == "|-----------|-----:|"
    assert md[3] == "| blockwise |  1.2 |"
