"""CPU steal: how much of the machine the hypervisor took away while we measured.

A sample taken while ``/proc/stat`` shows steal above a threshold is not the code's own time, so
the timing harness discards and re-takes it; benchmarks also check steal before they start.
Readers are injectable so tests can fake steal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

DEFAULT_MAX_STEAL = 0.05
_PROC_STAT = Path("/proc/stat")


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
