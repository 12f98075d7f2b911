"""Noise-aware timing for benchmarks and the autotuner: interleaved rounds, median summaries.

The machines we measure on are shared: one configuration's time varies 1.4x between runs, up
to 4x when the hypervisor steals CPU. So alternatives are compared side by side in one process,
interleaved in a fresh shuffled order every round, and summarised by medians; a sample taken
while CPU steal is above a threshold (``timing_steal``) is thrown away and re-taken. Peak
memory is measured per process by ``timing_subprocess``.

This module imports only the standard library at load time; JAX is used only if the measured
code already imported it (to wait for asynchronous results).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from einfuse.autotune.timing_steal import (
    DEFAULT_MAX_STEAL,
    StealReader,
    read_cpu_times,
    steal_fraction_between,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    """Summary of one candidate's samples, in seconds.

    ``discarded`` counts samples thrown away for CPU steal and re-taken; ``kept_noisy`` counts
    samples kept although steal stayed high after the retries ran out. ``cpu_samples`` is the
    process CPU time (all threads, user + system) of each sample: on a machine that other
    tenants load, it varies less than wall time for code that runs on one core.
    """

    median: float
    min: float
    iqr: float
    samples: tuple[float, ...]
    discarded: int = 0
    kept_noisy: int = 0
    cpu_samples: tuple[float, ...] = ()

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[float],
        discarded: int = 0,
        kept_noisy: int = 0,
        cpu_samples: Sequence[float] = (),
    ) -> Timing:
        if not samples:
            raise ValueError("Timing needs at least one sample")
        values = tuple(float(s) for s in samples)
        cpu = tuple(float(s) for s in cpu_samples)
        median, iqr = statistics.median(values), _iqr(values)
        return cls(median, min(values), iqr, values, discarded, kept_noisy, cpu)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timing:
        """Rebuild from :meth:`to_dict` output (the JSON a measuring subprocess returns)."""
        return cls.from_samples(
            data["samples"],
            data.get("discarded", 0),
            data.get("kept_noisy", 0),
            data.get("cpu_samples", ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "samples": list(self.samples),
            "cpu_samples": list(self.cpu_samples),
        }

    @property
    def cpu_median(self) -> float | None:
        """Median process CPU time per sample; None when it was not recorded."""
        return statistics.median(self.cpu_samples) if self.cpu_samples else None

    def ratio_to(self, other: Timing) -> float:
        """How many times slower this is than ``other`` (median over median)."""
        return self.median / other.median


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def _block(result: Any) -> Any:
    """Wait for JAX's asynchronous dispatch, without importing JAX for code that never used it."""
    jax = sys.modules.get("jax")
    return jax.block_until_ready(result) if jax is not None else result


def time_interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    rng_seed: int = 0,
    max_steal: float = DEFAULT_MAX_STEAL,
    max_retries: int = 3,
    steal_reader: StealReader = read_cpu_times,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time zero-argument callables side by side: every round calls each once, shuffled.

    Interleaving spreads slow drifts of the machine (other tenants, thermal, steal) evenly over
    the candidates, so ratios of medians are far more stable than separate runs. Each call is
    followed by ``jax.block_until_ready`` so asynchronous dispatch is included in the time.
    A sample whose steal fraction exceeds ``max_steal`` is discarded and re-taken up to
    ``max_retries`` times.
    """
    if not candidates:
        raise ValueError("time_interleaved needs at least one candidate")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            _block(candidates[name]())
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu_samples: dict[str, list[float]] = {name: [] for name in names}
    discarded = dict.fromkeys(names, 0)
    kept_noisy = dict.fromkeys(names, 0)
    rng = random.Random(rng_seed)
    for _ in range(repeats):
        order = names.copy()
        rng.shuffle(order)
        for name in order:
            for attempt in range(max_retries + 1):
                before = steal_reader()
                cpu_start, start = time.process_time(), clock()
                _block(candidates[name]())
                elapsed, cpu = clock() - start, time.process_time() - cpu_start
                if steal_fraction_between(before, steal_reader()) <= max_steal:
                    break
                if attempt == max_retries:
                    kept_noisy[name] += 1
                    break
                discarded[name] += 1
            samples[name].append(elapsed)
            cpu_samples[name].append(cpu)
    return {
        name: Timing.from_samples(
            samples[name], discarded[name], kept_noisy[name], cpu_samples[name]
        )
        for name in names
    }


def compile_time(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Wall time of one call including waiting for its result.

    Pass a freshly made ``jax.jit(f)`` so the call includes tracing, compiling and running;
    a function JAX has already compiled for these shapes only measures the run.
    """
    start = time.perf_counter()
    _block(fn(*args, **kwargs))
    return time.perf_counter() - start
