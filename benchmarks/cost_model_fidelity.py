"""Does the cost model rank schedules the way this CPU does? Spearman of predicted vs measured.

Two families of schedules, each priced by ``CostModel(cascade, get_target("cpu"))`` (the host,
calibrated) and each run for real, interleaved and shuffled with
``einfuse.autotune.timing.time_interleaved``. The host is shared (other jobs keep its two
cores busy), so XLA:CPU runs on one thread and the measure is the median *process CPU time* of
the repeats, which counts this process's work and not its waits; the wall-time median is shown
beside it. ``--twice`` measures everything again and prints the rank correlation of the two
runs: the most any model can reach on this host.

* **fused attention**: the 3-pass cascade through ``fuse{tile=bk}`` and emitted by
  ``emit_jax`` with the Schedule's query tile ``bq`` (``lax.map`` over query tiles and rows,
  ``fori_loop`` over key tiles), priced as the autotuner prices that candidate; ``bq`` and
  ``bk`` varied. ``--stand-in`` times the hand-written loop of
  ``benchmarks/attention_explore.py`` instead (the same loop nest, session 1's measure);
* **matmul chain** ``C2 = (A0 A1) A2``: each contraction its own loop nest of ``fori_loop``s
  over the tiled ranks in the schedule's loop order (``dynamic_slice``, a dot, accumulate);
  tiles of ``i0``, ``i1``, ``i2``, ``i3`` and two loop orders varied.

Spearman's rank correlation is computed here from NumPy ranks (average ranks for ties)::

    python -m benchmarks.cost_model_fidelity            # 49 + 36 schedules, a few minutes
    python -m benchmarks.cost_model_fidelity --quick    # 16 + 12 schedules, fewer repeats
"""

from __future__ import annotations

import os

# One XLA:CPU thread: on a shared host the process's CPU time then measures the work alone
# (see Timing.cpu_samples), where wall time also counts waiting for other tenants. XLA:CPU
# sizes its thread pool by the cores the process may use, and with two it splits large
# slices and dots across both (``outer_dimension_partitions`` in the compiled HLO), whose
# synchronisation on a busy host inflates CPU time well beyond the work: pin to one core
# before jax starts. The host calibration is cached per number of usable cores.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.attention_explore import blockwise_attention
from einfuse.autotune.loop_plan import fused_loop
from einfuse.autotune.timing import time_interleaved
from einfuse.autotune.timing_steal import cpu_steal_fraction
from einfuse.backends.jax_backend import emit_jax
from einfuse.cost_model.model import CostModel
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade import attention, matmul_chain
from einfuse.ir.cascade import bind_sizes
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import fuse

HEADS, HEAD_DIM = 8, 64


@dataclass(frozen=True)
class Case:
    family: str
    schedule: Schedule
    predicted_s: float
    run: Callable[[], Any]


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank."""
    x = np.asarray(values, dtype=float)
    out = np.empty(len(x))
    out[np.argsort(x, kind="stable")] = np.arange(len(x))
    for v in np.unique(x):
        tied = x == v
        out[tied] = out[tied].mean()
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of the ranks."""
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


# ----------------------------------------------------------------------------- attention
def attention_cases(seq: int, tiles: Sequence[int], model: CostModel) -> list[Case]:
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal((1, HEADS, seq, HEAD_DIM)), jnp.float32) for _ in range(3)
    )
    cases = []
    for bq, bk in itertools.product(tiles, tiles):
        fn = jax.jit(
            lambda q, k, v, bq=bq, bk=bk: blockwise_attention(
                q, k, v, causal=False, block_q=bq, block_k=bk
            )
        )
        schedule = Schedule.of(tiles={"p": bq, "m": bk})
        cases.append(
            Case("attention", schedule, model.estimate(schedule), lambda fn=fn: fn(q, k, v))
        )
    return cases


def emitted_attention_cases(seq: int, tiles: Sequence[int], target: Any) -> list[Case]:
    """The fused attention as einfuse emits it: ``fuse{tile=bk}``, then ``emit_jax`` with the
    query tile ``bq`` from the schedule; priced as the autotuner prices that candidate."""
    rng = np.random.default_rng(0)
    cascade = attention("3pass", b=1, h=HEADS, e=HEAD_DIM, f=HEAD_DIM, p=seq, m=seq)
    q, k, v = (
        jnp.asarray(rng.standard_normal((1, HEADS, HEAD_DIM, seq)), jnp.float32) for _ in range(3)
    )
    bound = tuple(sorted(bind_sizes(cascade, None).items()))
    cases = []
    for bk in tiles:
        fused = fuse(cascade, tile=bk)
        model = CostModel(fused, target)
        rows = dict.fromkeys(fused_loop(cascade, bk, bound)[1], 1)  # mapped one at a time
        for bq in tiles:
            schedule = Schedule.of(tiles={"p": bq, **rows})  # what the autotuner passes
            fn = emit_jax(fused, schedule=schedule)
            shown = Schedule.of(tiles={"p": bq, "m": bk})  # m: the fuse tile, for the table
            cases.append(
                Case("attention", shown, model.estimate(schedule), lambda fn=fn: fn(q, k, v))
            )
    return cases


# ----------------------------------------------------------------------------- matmul chain
def tiled_matmul(
    a: jax.Array, b: jax.Array, tile: dict[str, int], order: Sequence[str]
) -> jax.Array:
    """``a[i, k] @ b[k, j]`` as nested ``fori_loop``s over the tiled ranks in ``order``."""
    (n_i, n_k), n_j = a.shape, b.shape[1]
    size = {"i": n_i, "j": n_j, "k": n_k}
    trips = {r: size[r] // tile[r] for r in "ijk"}
    loops = [r for r in order if trips[r] > 1]

    def step(at: dict[str, Any], c: jax.Array) -> jax.Array:
        i, j, k = (at.get(r, 0) * tile[r] for r in "ijk")
        a_blk = lax.dynamic_slice(a, (i, k), (tile["i"], tile["k"]))
        b_blk = lax.dynamic_slice(b, (k, j), (tile["k"], tile["j"]))
        c_blk = lax.dynamic_slice(c, (i, j), (tile["i"], tile["j"]))
        return lax.dynamic_update_slice(c, c_blk + a_blk @ b_blk, (i, j))

    def nest(depth: int, at: dict[str, Any], c: jax.Array) -> jax.Array:
        if depth == len(loops):
            return step(at, c)
        r = loops[depth]
        return lax.fori_loop(0, trips[r], lambda x, c: nest(depth + 1, {**at, r: x}, c), c)

    return nest(0, {}, jnp.zeros((n_i, n_j), a.dtype))


def matmul_cases(n: int, grid: Sequence[dict[str, Any]], model: CostModel) -> list[Case]:
    rng = np.random.default_rng(1)
    a0, a1, a2 = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(3))
    cases = []
    for g in grid:
        t, order = g["tiles"], g["order"]
        # C1[i0, i2] = A0[i0, i1] A1[i1, i2];  C2[i0, i3] = C1[i0, i2] A2[i2, i3]
        first = {"i": t["i0"], "k": t["i1"], "j": t["i2"]}
        second = {"i": t["i0"], "k": t["i2"], "j": t["i3"]}
        o1 = [{"i0": "i", "i1": "k", "i2": "j"}[r] for r in order if r != "i3"]
        o2 = [{"i0": "i", "i2": "k", "i3": "j"}[r] for r in order if r != "i1"]

        def chain(a0, a1, a2, first=first, second=second, o1=o1, o2=o2):
            return tiled_matmul(tiled_matmul(a0, a1, first, o1), a2, second, o2)

        fn = jax.jit(chain)
        schedule = Schedule.of(tiles=t, loop_order=order)
        cases.append(
            Case("matmul chain", schedule, model.estimate(schedule), lambda fn=fn: fn(a0, a1, a2))
        )
    return cases


def matmul_grid(n: int, quick: bool) -> list[dict[str, Any]]:
    small = [16, 64, n] if not quick else [16, n]
    orders = [("i0", "i2", "i3", "i1"), ("i2", "i3", "i1", "i0")]
    grid = []
    for t0, t2, t3 in itertools.product(small, [32, 128, n] if not quick else [32, n], [64, n]):
        for order in orders:
            t1 = n if (t0 + t2 + t3) % 3 else 128  # vary i1 too, deterministically
            grid.append({"tiles": {"i0": t0, "i1": t1, "i2": t2, "i3": t3}, "order": order})
    seen, unique = set(), []
    for g in grid:
        key = (tuple(sorted(g["tiles"].items())), g["order"])
        if key not in seen:
            seen.add(key)
            unique.append(g)
    return unique[: 12 if quick else 36]


# ----------------------------------------------------------------------------- driver
def measure(cases: list[Case], repeats: int) -> tuple[list[float], list[float]]:
    """Median process CPU time and median wall time of each case, interleaved and shuffled."""
    named = {f"{i}": c.run for i, c in enumerate(cases)}
    timings = time_interleaved(named, warmup=1, repeats=repeats)
    cpu = [statistics.median(timings[f"{i}"].cpu_samples) for i in range(len(cases))]
    return cpu, [timings[f"{i}"].median for i in range(len(cases))]


def report(family: str, cases: list[Case], cpu: list[float], wall: list[float]) -> float:
    """Print the family's table (fastest first by CPU time) and return Spearman vs CPU time."""
    predicted = [c.predicted_s for c in cases]
    rp, rm = ranks(predicted), ranks(cpu)
    print(f"\n{family}: {len(cases)} schedules")
    head = (
        f"{'schedule':<58} {'predicted':>10} {'cpu':>10} {'wall':>10} {'rank p':>7} {'rank m':>7}"
    )
    print(head)
    for i in np.argsort(cpu):
        c = cases[i]
        print(
            f"{c.schedule!s:<58} {c.predicted_s * 1e3:>8.2f}ms {cpu[i] * 1e3:>8.2f}ms "
            f"{wall[i] * 1e3:>8.2f}ms {rp[i]:>7.1f} {rm[i]:>7.1f}"
        )
    rho = spearman(predicted, cpu)
    print(
        f"{family}: Spearman(predicted, CPU time) = {rho:.3f}; "
        f"Spearman(predicted, wall time) = {spearman(predicted, wall):.3f}"
    )
    return rho


def throughput(
    build: Callable[[], CostModel], schedules: Sequence[Schedule], seconds: float = 1.0
) -> float:
    """Schedules priced per CPU-second by ``CostModel.estimate`` (the autotuner's fast path).

    Each round builds a fresh model (counted): the fast path remembers kernels it priced, so
    re-pricing the same schedules on one model would measure dictionary lookups. Process
    time, like the measurements above: on a loaded host wall time counts the waits.
    """
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        model = build()
        for s in schedules:
            model.estimate(s)
        n += len(schedules)
    return n / (time.process_time() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer schedules and repeats")
    parser.add_argument("--seq", type=int, default=1024, help="attention sequence length")
    parser.add_argument("--n", type=int, default=512, help="matmul chain size (square)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--stand-in", action="store_true",
        help="time attention_explore's hand-written loop instead of the emitted attention",
    )  # fmt: skip
    parser.add_argument(
        "--twice", action="store_true", help="measure twice: Spearman of run 1 vs run 2 is "
        "the ceiling the noise of this host allows"
    )  # fmt: skip
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    target = get_target("cpu")
    print(f"target: {target.name} ({target.notes})")
    print(f"CPU steal now: {cpu_steal_fraction():.1%}; load average: {os.getloadavg()}")
    tiles = [16, 64, 256, 1024] if args.quick else [16, 32, 64, 128, 256, 512, 1024]
    tiles = [t for t in tiles if t <= args.seq]
    fused = fuse(attention("3pass", b=1, h=HEADS, e=HEAD_DIM, f=HEAD_DIM, p=args.seq, m=args.seq))
    attn_model = CostModel(fused, target)
    chain_model = CostModel(matmul_chain(2), target, {f"i{k}": args.n for k in range(4)})
    attention_family = (
        ("fused attention (blockwise stand-in)", attention_cases(args.seq, tiles, attn_model))
        if args.stand_in
        else ("fused attention (emitted)", emitted_attention_cases(args.seq, tiles, target))
    )
    families = [
        attention_family,
        ("matmul chain", matmul_cases(args.n, matmul_grid(args.n, args.quick), chain_model)),
    ]
    all_p, all_m, rhos = [], [], []
    for family, cases in families:
        cpu, wall = measure(cases, repeats)
        rhos.append(report(family, cases, cpu, wall))
        if args.twice:
            again, _ = measure(cases, repeats)
            print(f"{family}: Spearman(run 1, run 2) of CPU time = {spearman(cpu, again):.3f}")
        all_p += [c.predicted_s for c in cases]
        all_m += cpu
    rho_all = spearman(all_p, all_m)
    print(f"\nall {len(all_p)} schedules: Spearman(predicted, CPU time) = {rho_all:.3f}")
    rate = throughput(lambda: CostModel(fused, target), [c.schedule for c in families[0][1]])
    print(
        f"cost model fast path: {rate:.0f} distinct schedules per CPU-second, model "
        "construction included (fused attention)"
    )
    return 0 if min(rhos) >= 0.8 else 1


if __name__ == "__main__":
    raise SystemExit(main())
