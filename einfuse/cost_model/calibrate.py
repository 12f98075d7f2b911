"""Measure the host CPU once and describe it as a `Target`.

Datasheet peaks say little about what XLA:CPU reaches on a given machine, so the host target is
measured: a few jitted kernels (f32/bf16 matmul, a streaming read+write much larger than the
last-level cache, an exp loop, a polynomial loop, and an in-cache read+write per cache level),
each timed several times and summarised by its median. The figures are what XLA:CPU achieves,
not hardware peaks, and they are cached as JSON per machine (hostname, CPU model, core count,
jax version) so that later calls cost one file read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from einfuse.cost_model.calibrate_kernels import (
    DTYPES,
    FULL_MATMULS,
    QUICK_MATMULS,
    measure_exp_rate,
    measure_matmul,
    measure_stream_bandwidth,
    measure_vector_rate,
)
from einfuse.cost_model.calibrate_overheads import measure_overheads
from einfuse.cost_model.overheads import Overheads
from einfuse.cost_model.target import ComputeUnit, Interconnect, MemoryLevel, Target

_SCHEMA = 5  # 2: loop, operation and dot-step overheads; 3: sliced-element cost;
# 4: thin dot shapes and a relative least squares for the dot element costs; 5: element-wise
# rates per dtype
_SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
# Used when neither sysfs nor lscpu tells us the caches: a typical x86 server core.
_DEFAULT_CACHES = (("l3", 32 << 20, 1), ("l2", 1 << 20, 1), ("l1d", 32 << 10, 1))
# Assumed, not measured: XLA:CPU collectives between host-platform devices meet once per step.
_HOST_COLLECTIVE_LATENCY_S = 1e-5


@dataclass(frozen=True, slots=True)
class CacheLevel:
    """One data cache level as the OS reports it (size per instance)."""

    name: str
    size_bytes: int
    instances: int


@dataclass(frozen=True, slots=True)
class HostDescription:
    """What identifies the machine (the cache key) plus what calibration needs to know."""

    hostname: str
    cpu_model: str
    cores: int
    jax_version: str
    memory_bytes: int
    caches: tuple[CacheLevel, ...]  # largest first
    cache_source: str  # "sysfs", "lscpu" or "defaults"


@dataclass(frozen=True, slots=True)
class HostMeasurements:
    """Raw calibration results; rates in ops/s, bandwidths in bytes/s (read + write)."""

    matmul_macs_per_s: tuple[tuple[str, int, float], ...]  # (dtype, n, rate) per size tried
    vector_ops_per_s: tuple[tuple[str, float], ...]  # (dtype, rate)
    exp_per_s: float  # float32; other dtypes keep its cost in element-wise ops
    dram_bytes_per_s: float
    dram_buffer_bytes: int
    cache_bytes_per_s: tuple[float, ...]  # aligned with HostDescription.caches
    seconds: float
    overheads: tuple[float, ...]  # see calibrate_overheads.measure_overheads


# ---------------------------------------------------------------------------------------------
# Describing the host.


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a cache size from {text!r}")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _cpu_list_count(text: str) -> int:
    count = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def _caches_from_sysfs(cores: int) -> tuple[CacheLevel, ...]:
    levels = []
    for index in sorted(_SYSFS_CACHE.glob("index*")):
        kind = (index / "type").read_text().strip()
        if kind not in ("Data", "Unified"):
            continue
        level = int((index / "level").read_text())
        size = _parse_size((index / "size").read_text())
        sharing = _cpu_list_count((index / "shared_cpu_list").read_text())
        name = f"l{level}d" if kind == "Data" else f"l{level}"
        levels.append(CacheLevel(name, size, max(1, cores // max(1, sharing))))
    return tuple(sorted(levels, key=lambda c: -c.size_bytes))


def _caches_from_lscpu() -> tuple[CacheLevel, ...]:
    out = subprocess.run(
        ["lscpu", "--bytes", "--caches=NAME,ONE-SIZE,TYPE"],
        capture_output=True,
        text=True,
        check=True,
        timeout=5,
    ).stdout
    levels = []
    for line in out.splitlines()[1:]:
        name, size, kind = line.split()
        if kind in ("Data", "Unified"):
            levels.append(CacheLevel(name.lower(), int(size), 1))
    return tuple(sorted(levels, key=lambda c: -c.size_bytes))


def read_cpu_caches(cores: int) -> tuple[tuple[CacheLevel, ...], str]:
    """Data caches, largest first, and where they came from (sysfs, then lscpu, then defaults)."""
    readers: tuple[tuple[str, Callable[[], tuple[CacheLevel, ...]]], ...] = (
        ("sysfs", lambda: _caches_from_sysfs(cores)),
        ("lscpu", _caches_from_lscpu),
    )
    for source, reader in readers:
        try:
            caches = reader()
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
        if caches:
            return caches, source
    return tuple(CacheLevel(*c) for c in _DEFAULT_CACHES), "defaults"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_bytes() -> tuple[int, int]:
    """(total, available) RAM; falls back to sysconf, then to a modest 8 GiB guess."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = _parse_size(info["MemTotal"].replace("kB", "K"))
        available = _parse_size(info.get("MemAvailable", info["MemTotal"]).replace("kB", "K"))
        return total, available
    except (OSError, KeyError, ValueError):
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30, 4 << 30


def describe_host() -> HostDescription:
    """This machine; reads jax's version from its metadata so a cache hit never imports jax."""
    # The cores this process may run on: XLA:CPU sizes its thread pool by them, so a process
    # pinned to fewer cores runs (and calibrates) differently and is cached separately.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cores = cores or os.cpu_count() or 1
    caches, source = read_cpu_caches(cores)
    return HostDescription(
        hostname=socket.gethostname(),
        cpu_model=_cpu_model(),
        cores=cores,
        jax_version=metadata.version("jax"),
        memory_bytes=_memory_bytes()[0],
        caches=caches,
        cache_source=source,
    )


def measure_host(host: HostDescription, *, quick: bool = False) -> HostMeasurements:
    """Run every kernel; about 5-10 s (quick: about 2 s, for tests)."""
    start = time.perf_counter()
    repeats = 3 if quick else 5
    volume = (16 << 20) if quick else (128 << 20)  # bytes moved per timed in-cache call
    matmuls = QUICK_MATMULS if quick else FULL_MATMULS
    matmul = tuple((dt, n, measure_matmul(dt, n, repeats)) for dt, n in matmuls)
    smallest, second = host.caches[-1], host.caches[-2] if len(host.caches) > 1 else None
    exp_buffer = min((second or smallest).size_bytes // 4, 1 << 20)
    vector = tuple(
        (dt, measure_vector_rate(smallest.size_bytes // 4, volume // 16, repeats, dt))
        for dt in DTYPES
    )
    exp = measure_exp_rate(exp_buffer, volume // 16, repeats)
    caches = []
    for cache in host.caches:  # a quarter of the cache: in place, with room for neighbours
        buffer = max(4096, cache.size_bytes // 4)
        buffer = min(buffer, 4 << 20) if quick else buffer
        caches.append(measure_stream_bandwidth(buffer, max(volume, 16 * buffer), repeats))
    _, available = _memory_bytes()
    largest_cache = host.caches[0].size_bytes
    dram_buffer = 64 << 20 if quick else min(max(4 * largest_cache, 64 << 20), 512 << 20)
    dram_buffer = max(1 << 20, min(dram_buffer, available // 8))
    dram = measure_stream_bandwidth(dram_buffer, 2 * dram_buffer, repeats)  # one pass a call
    overheads = measure_overheads(repeats)
    return HostMeasurements(
        matmul_macs_per_s=matmul,
        vector_ops_per_s=vector,
        exp_per_s=exp,
        dram_bytes_per_s=dram,
        dram_buffer_bytes=dram_buffer,
        cache_bytes_per_s=tuple(caches),
        seconds=time.perf_counter() - start,
        overheads=overheads,
    )


# ---------------------------------------------------------------------------------------------
# From measurements to a Target, and the per-machine cache.


def host_target(host: HostDescription, measured: HostMeasurements) -> Target:
    """The calibrated host as a `Target`; the best matmul size per dtype is the matrix rate."""
    matmul: dict[str, float] = {}
    for dtype, _, rate in measured.matmul_macs_per_s:
        matmul[dtype] = max(rate, matmul.get(dtype, 0.0))
    vector = dict(measured.vector_ops_per_s)
    exp_cost = vector["float32"] / measured.exp_per_s
    units = (
        ComputeUnit("xla_dot", "matrix", matmul),
        ComputeUnit("xla_elementwise", "vector", vector),
        ComputeUnit(
            "xla_exp",
            "transcendental",
            {dtype: rate / exp_cost for dtype, rate in vector.items()},
            emulated_on="xla_elementwise",
        ),
    )
    caches = zip(host.caches, measured.cache_bytes_per_s, strict=True)
    memory = (
        MemoryLevel("dram", host.memory_bytes, measured.dram_bytes_per_s),
        *(MemoryLevel(c.name, c.size_bytes, bw, instances=c.instances) for c, bw in caches),
    )
    small_dram = measured.dram_buffer_bytes < 2 * host.caches[0].size_bytes
    notes = (
        f"calibrated on {host.hostname} ({host.cpu_model}, {host.cores} cores, "
        f"jax {host.jax_version}) in {measured.seconds:.1f} s; caches from {host.cache_source}; "
        "XLA:CPU achieved rates, not hardware peaks"
        + ("; DRAM buffer not much larger than the last cache" if small_dram else "")
    )
    return Target(
        name="cpu",
        device_kind="cpu",
        units=units,
        memory=memory,
        interconnect=Interconnect(
            latency_s=_HOST_COLLECTIVE_LATENCY_S,
            bandwidth_bytes_per_s=measured.dram_bytes_per_s,
            topology="shared_memory",
            asynchronous=False,  # XLA:CPU runs each collective to completion
        ),
        word_bytes=4,
        exp_cost_in_macs=exp_cost,
        notes=notes,
        overheads=Overheads(0.0, *measured.overheads),
    )


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/einfuse, else ~/.cache/einfuse (the XDG convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "einfuse"


def _cache_key(host: HostDescription, quick: bool) -> dict[str, Any]:
    return {
        "schema": _SCHEMA,
        "hostname": host.hostname,
        "cpu_model": host.cpu_model,
        "cores": host.cores,
        "jax_version": host.jax_version,
        "quick": quick,
    }


def cache_path(host: HostDescription, cache_dir: Path, *, quick: bool = False) -> Path:
    digest = hashlib.sha256(json.dumps(_cache_key(host, quick), sort_keys=True).encode())
    return cache_dir / f"host-calibration-{digest.hexdigest()[:16]}.json"


def _load_cached(
    path: Path, key: dict[str, Any]
) -> tuple[HostDescription, HostMeasurements] | None:
    """The cached record if it is readable and for this key; None means measure again."""
    try:
        record = json.loads(path.read_text())
        if record["key"] != key:
            return None
        host = dict(record["host"])
        host["caches"] = tuple(CacheLevel(**c) for c in host["caches"])
        measured = dict(record["measurements"])
        measured["matmul_macs_per_s"] = tuple(tuple(m) for m in measured["matmul_macs_per_s"])
        measured["cache_bytes_per_s"] = tuple(measured["cache_bytes_per_s"])
        vector = measured["vector_ops_per_s"]
        measured["vector_ops_per_s"] = tuple((str(d), float(r)) for d, r in vector)
        measured["overheads"] = tuple(measured["overheads"])
        return HostDescription(**host), HostMeasurements(**measured)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(path: Path, key: dict[str, Any], host: HostDescription, m: HostMeasurements) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "host": asdict(host), "measurements": asdict(m)}
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(record, indent=1))
    os.replace(scratch, path)  # atomic: a concurrent reader sees the old file or the new one


def calibrate_host(
    force: bool = False, cache_dir: str | Path | None = None, *, quick: bool = False
) -> Target:
    """The measured host target, from the per-machine cache unless `force` or none is stored.

    `cache_dir` defaults to `default_cache_dir()`. `quick` uses smaller kernels (about 2 s, for
    tests) and is cached separately from a full calibration.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    host = describe_host()
    key = _cache_key(host, quick)
    path = cache_path(host, directory, quick=quick)
    cached = None if force else _load_cached(path, key)
    if cached is not None:
        return host_target(*cached)
    measured = measure_host(host, quick=quick)
    _store(path, key, host, measured)
    return host_target(host, measured)
