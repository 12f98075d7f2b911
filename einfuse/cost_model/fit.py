"""Which memory level holds each tile of a kernel, and whether the tiles fit.

On a cache-only target (CPU) nothing is rejected: the smallest cache that holds the kernel's
whole working set serves its tiles. On a target with software-managed levels (shared memory,
VMEM, a global buffer) the kernel's inputs and results are staged in the largest managed level
unless placed elsewhere, and a level whose tiles exceed what one tile may use is an error of the
schedule (``fits`` False, with the reason). Intermediates of the kernel stay on chip while they
fit, and spill to main memory otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from einfuse.cost_model.kernels import Kernel
from einfuse.cost_model.target import MemoryLevel

if TYPE_CHECKING:
    from einfuse.cost_model.traffic import KernelTraffic


def place_tiles(
    kernel: Kernel,
    resident: Mapping[str, int],
    explicit: Mapping[str, int],
    capacity: Callable[[int], float],  # bytes one tile may use of a level
    out: KernelTraffic,
    memory: Sequence[MemoryLevel],
    eb: int,
) -> tuple[dict[str, int], list[str]]:
    """Which level holds each tile; sets ``out.staging``, and ``out.fits``/``reason``."""
    level_of: dict[str, int] = {}
    spilled: list[str] = []
    managed = [i for i, lvl in enumerate(memory) if i > 0 and lvl.managed]
    if not managed:  # caches: the smallest that holds the whole working set serves the tiles
        work = sum(resident.values()) * eb
        out.staging = max((i for i in range(1, len(memory)) if capacity(i) >= work), default=0)
        for t in resident:
            level_of[t] = explicit.get(t, out.staging)
        return level_of, spilled
    staging = out.staging = managed[0]
    used = [0.0] * len(memory)
    for t in (*kernel.reads, *kernel.results, *explicit):
        li = level_of[t] = explicit.get(t, staging)
        if li > 0:
            used[li] += resident[t] * eb
    for li in range(1, len(memory)):
        if used[li] > capacity(li) and out.fits:
            here = sorted((t for t in level_of if level_of[t] == li), key=lambda t: -resident[t])
            parts = ", ".join(f"{t} {_kib(resident[t] * eb)}" for t in here[:3])
            out.fits = False
            out.reason = (
                f"{kernel.name}: tiles need {_kib(used[li])} of {memory[li].name} ({parts}), "
                f"but a tile gets {_kib(capacity(li))}"
            )
    for t in kernel.internal:  # intermediates stay on chip while they fit, else spill
        if t in level_of:
            continue
        if used[staging] + resident[t] * eb <= capacity(staging):
            level_of[t] = staging
            used[staging] += resident[t] * eb
        else:
            level_of[t] = 0
            spilled.append(t)
    out.spilled = tuple(spilled)
    return level_of, spilled


def _kib(n_bytes: float) -> str:
    if n_bytes >= 1 << 20:
        return f"{n_bytes / (1 << 20):.1f} MiB"
    return f"{n_bytes / 1024:.1f} KiB"
