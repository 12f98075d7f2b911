"""Measure one configuration in a fresh Python process: peak memory, first call and timings.

Peak memory is only meaningful per process (allocators keep what they grabbed), so
:func:`measure_in_subprocess` runs one configuration in its own Python process and reports the
rise of its peak RSS over the RSS it had before the first call. The child imports only this
module and the timing modules it uses (the ``einfuse`` package inits load nothing else), from
the same folder as the parent, so the baseline holds little beyond what the target sets up.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from einfuse.autotune.timing import Timing, compile_time, time_interleaved
from einfuse.autotune.timing_steal import DEFAULT_MAX_STEAL, read_cpu_times, steal_fraction_between

# The child puts the folder holding the parent's ``einfuse`` first on ``sys.path`` just long
# enough to import this module, so it measures with the parent's code whatever its working
# directory holds, and then resolves the target exactly as its ``PYTHONPATH`` says.
_CHILD_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import einfuse.autotune.timing_subprocess as child; sys.path.remove(sys.argv[1]); "
    "sys.exit(child._child_main(sys.argv[2], sys.argv[3]))"
)
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
                    _PACKAGE_ROOT,
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
