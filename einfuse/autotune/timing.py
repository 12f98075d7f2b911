"""Noise-aware timing and peak-memory measurement for benchmarks and the autotuner.

The machines we measure on are shared: one configuration's time varies 1.4x between runs, up
to 4x when the hypervisor steals CPU. So alternatives are compared side by side in one process,
interleaved in a fresh shuffled order every round, and summarised by medians; a sample taken
while ``/proc/stat`` shows CPU steal above a threshold is thrown away and re-taken.

Peak memory is only meaningful per process (allocators keep what they grabbed), so
:func:`measure_in_subprocess` runs one configuration in its own Python process and reports the
rise of its peak RSS over the RSS it had before the first call. The child runs this file as a
script, which keeps the package's own imports out of the baseline.

This module imports only the standard library at load time; JAX is used only if the measured
code already imported it (to wait for asynchronous results).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_MAX_STEAL = 0.05
_PROC_STAT = Path("/proc/stat")
# Runs this file as ``__main__`` without importing the einfuse package (its imports would
# inflate the baseline) and without putting this file's folder first on ``sys.path``.
_CHILD_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


# --- CPU steal ------------------------------------------------------------------------------


class CpuTimes(NamedTuple):
    """Cumulative jiffies from the aggregate ``cpu`` line of ``/proc/stat``."""

    steal: int
    total: int


StealReader = Callable[[], CpuTimes]


def read_cpu_times(path: Path = _PROC_STAT) -> CpuTimes:
    """Read steal and total jiffies; zeros where ``/proc/stat`` does not exist (non-Linux)."""
    try:
        first_line = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return CpuTimes(0, 0)
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
    # already counted in user, so the total is the first eight fields.
    fields = [int(x) for x in first_line.split()[1:9]]
    steal = fields[7] if len(fields) > 7 else 0
    return CpuTimes(steal, sum(fields))


def steal_fraction_between(before: CpuTimes, after: CpuTimes) -> float:
    """Fraction of CPU time stolen by the hypervisor between two readings (0 if none passed)."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    return max(0, after.steal - before.steal) / total


def cpu_steal_fraction(interval: float = 0.2, reader: StealReader = read_cpu_times) -> float:
    """Steal fraction observed over ``interval`` seconds of wall time, for a quick health check."""
    before = reader()
    time.sleep(interval)
    return steal_fraction_between(before, reader())


class StealWatch:
    """Context manager measuring the steal fraction over its body: ``with StealWatch() as w``."""

    def __init__(self, reader: StealReader = read_cpu_times) -> None:
        self._reader = reader
        self._before = CpuTimes(0, 0)
        self.fraction = 0.0

    def __enter__(self) -> StealWatch:
        self._before = self._reader()
        return self

    def __exit__(self, *exc: object) -> None:
        self.fraction = steal_fraction_between(self._before, self._reader())


# --- Timing ---------------------------------------------------------------------------------


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


# --- Peak memory in a subprocess ------------------------------------------------------------


def _proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field (VmRSS, VmHWM) of ``/proc/<pid>/status``; None where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak excludes input creation."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _child_measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Body of the measuring child: set up, record the baseline, call, time, record the peak."""
    module_name, _, func_name = spec["target"].partition(":")
    setup_start = time.perf_counter()
    made = getattr(importlib.import_module(module_name), func_name)(**spec["kwargs"])
    candidates = made if isinstance(made, Mapping) else {"main": made}
    setup_s = time.perf_counter() - setup_start
    baseline_kib = _proc_status_kib("VmRSS") or 0
    hwm_reset = _reset_peak_rss()
    first_call_s = {name: compile_time(fn) for name, fn in candidates.items()}
    timings: dict[str, Any] = {}
    if spec["repeats"] > 0:
        measured = time_interleaved(
            candidates,
            warmup=spec["warmup"],
            repeats=spec["repeats"],
            rng_seed=spec["rng_seed"],
            max_steal=spec["max_steal"],
        )
        timings = {name: t.to_dict() for name, t in measured.items()}
    hwm_kib = _proc_status_kib("VmHWM") or 0
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak_kib = hwm_kib if hwm_reset and hwm_kib else max(hwm_kib, maxrss_kib)
    return {
        "setup_s": setup_s,
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "rise_mib": max(0, peak_kib - baseline_kib) / 1024,
        "peak_includes_setup": not hwm_reset,
        "first_call_s": first_call_s,
        "timings": timings,
    }


def _child_main(spec_path: str, result_path: str) -> int:
    """Entry point of the child process: JSON spec in, JSON result out, exit code 1 on error."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        result: dict[str, Any] = {"error": None, **_child_measure(spec)}
        code = 0
    except BaseException as exc:  # the parent reports any failure as data
        lines = traceback.format_exception_only(type(exc), exc)
        result = {"error": "".join(lines).strip(), "traceback": traceback.format_exc()}
        code = 1
    Path(result_path).write_text(json.dumps(result))
    return code


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (likely out of memory)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {returncode}"


def _read_child_result(path: Path) -> dict[str, Any]:
    """The child's JSON result; empty when it died before writing it (or mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def measure_in_subprocess(
    module_func: str,
    kwargs: Mapping[str, Any],
    timeout: float = 600.0,
    *,
    warmup: int = 1,
    repeats: int = 3,
    rng_seed: int = 0,
    max_steal: float = DEFAULT_MAX_STEAL,
    memory_limit_mib: float | None = None,
    python_path: Sequence[str | os.PathLike[str]] = (),
    poll_interval: float = 0.02,
) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh Python process and measure it.

    The function creates its inputs and returns a zero-argument callable (or a dict of named
    callables, timed interleaved). The child records its RSS after that setup (the baseline),
    calls each callable once (``first_call_s``: trace + compile + run), times them, and reports
    the peak RSS and its rise over the baseline, in MiB. Failures never raise: a crash, a
    timeout or a child whose RSS passes ``memory_limit_mib`` (polled, then killed) gives a
    result whose ``error`` says why. ``steal_fraction`` covers the child's whole run, so a
    caller can discard a run made while the hypervisor stole CPU.
    """
    spec = {
        "target": module_func,
        "kwargs": dict(kwargs),
        "warmup": warmup,
        "repeats": repeats,
        "rng_seed": rng_seed,
        "max_steal": max_steal,
    }
    env = dict(os.environ)
    extra = [os.fspath(p) for p in python_path]
    env["PYTHONPATH"] = os.pathsep.join([*extra, os.getcwd(), env.get("PYTHONPATH", "")])
    base: dict[str, Any] = {"target": module_func, "kwargs": dict(kwargs), "error": None}
    with tempfile.TemporaryDirectory(prefix="einfuse-measure-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        with open(Path(tmp, "output.txt"), "w+") as output:
            before = read_cpu_times()
            start = time.perf_counter()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _CHILD_BOOT,
                    os.path.abspath(__file__),
                    spec_path,
                    result_path,
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )
            failure, polled_kib = _supervise(proc, start, timeout, memory_limit_mib, poll_interval)
            base["wall_s"] = time.perf_counter() - start
            base["steal_fraction"] = steal_fraction_between(before, read_cpu_times())
            base["returncode"] = proc.returncode
            base["max_polled_rss_mib"] = polled_kib / 1024
            output.seek(0)
            output_tail = output.read()[-2000:]
        child = _read_child_result(result_path)
    result = {**base, **child}
    if failure is not None:
        result["error"] = failure
    elif proc.returncode != 0 and not result.get("error"):
        result["error"] = _describe_exit(proc.returncode)
    if result["error"]:
        result["output_tail"] = output_tail
    return result


def _supervise(
    proc: subprocess.Popen[bytes],
    start: float,
    timeout: float,
    memory_limit_mib: float | None,
    poll_interval: float,
) -> tuple[str | None, int]:
    """Wait for the child, killing it past the timeout or the RSS limit; (why killed, max RSS)."""
    max_kib = 0
    while True:
        try:
            proc.wait(timeout=poll_interval)
            return None, max_kib
        except subprocess.TimeoutExpired:
            pass
        rss_kib = _proc_status_kib("VmRSS", proc.pid) or 0
        max_kib = max(max_kib, rss_kib)
        if memory_limit_mib is not None and rss_kib > memory_limit_mib * 1024:
            reason = (
                f"memory limit exceeded: RSS {rss_kib / 1024:.0f} MiB > {memory_limit_mib:.0f} MiB"
            )
        elif time.perf_counter() - start > timeout:
            reason = f"timeout after {timeout:g} s"
        else:
            continue
        proc.kill()
        proc.wait()
        return reason, max_kib


def timings_from_result(result: Mapping[str, Any]) -> dict[str, Timing]:
    """The :class:`Timing` objects of a :func:`measure_in_subprocess` result (empty on error)."""
    return {name: Timing.from_dict(d) for name, d in (result.get("timings") or {}).items()}


# --- Tables ---------------------------------------------------------------------------------


def _format_cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if fmt is not None:
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    formats: Mapping[str, str] | None = None,
    markdown: bool = False,
) -> str:
    """Aligned text table (or a Markdown table) of ``rows``, one column per key in ``columns``.

    Numbers are right-aligned, text left-aligned; a missing or None value prints as ``-``;
    ``formats`` maps a column to a format spec such as ``".3f"``.
    """
    formats = formats or {}
    cells = [[_format_cell(row.get(col), formats.get(col)) for col in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(col), int | float) or row.get(col) is None for row in rows)
        for col in columns
    ]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    if markdown:
        dashes = ["-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric)]
        rule = "|" + "|".join(dashes) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(columns)), rule, *(line(r) for r in cells)])


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[-2], sys.argv[-1]))
