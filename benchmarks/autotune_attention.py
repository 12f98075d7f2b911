"""Does the autotuner find what an exhaustive sweep finds, with a quarter of the measurements?

For each case (single-head attention, causal and not, at each sequence length; and every
distinct cascade of the all-MiniLM-L6-v2 encoder that has more than one program to choose
from), on this CPU:

1. **model rate**: the cost-model objective scores a large space (tiles of every rank of size
   >= 8, loop orders); candidates per second of wall and of process CPU time, setup included,
   and the marginal rate of one more estimate (issue target: >= 1,000 candidates/s);
2. **sweep**: every distinct program of the measured space (the params the JAX backend reads)
   is compiled, checked against the float64 reference and timed, interleaved with the
   default, and the best few are raced: the exhaustive best;
3. **hybrid**: the model screens the whole space and measures its best ``sweep/4`` programs
   (issue target: within 10% of the exhaustive best with <= 1/4 of its measurements);
4. **final**: default, hybrid's choice and the sweep's best timed together, interleaved.

    python -m benchmarks.autotune_attention --quick            # seq 1024, 2048: minutes
    python -m benchmarks.autotune_attention                    # seq 4096, 16384 + MiniLM
    python -m benchmarks.autotune_attention --seqs 4096 --causal yes --no-minilm
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from einfuse.autotune.measure import Bench, Prepared, consumed
from einfuse.autotune.measured import MeasuredSearch
from einfuse.autotune.screen import ModelEvaluator
from einfuse.autotune.space import Candidate, SearchSpace, SpaceOptions, build_space
from einfuse.autotune.store import quiet_optuna
from einfuse.autotune.timing_steal import cpu_steal_fraction
from einfuse.autotune.timing_table import format_table
from einfuse.autotune.tuner import autotune
from einfuse.cost_model.target import Target, get_target
from einfuse.einsum_cascade import attention
from einfuse.ir.cascade import Cascade, bind_sizes

HEAD_DIM = 64
RATE_SPACE = SpaceOptions(min_tiled_size=8, max_loop_ranks=3)


def attention_cases(seqs: list[int], causal: list[bool]) -> Iterator[tuple[str, Cascade]]:
    for seq in seqs:
        for c in causal:
            cascade = attention(
                "3pass", causal=c, heads=False, batch=False, p=seq, m=seq, e=HEAD_DIM, f=HEAD_DIM
            )
            yield f"attention{'-causal' if c else ''} s={seq}", cascade


def minilm_cases(seq: int) -> Iterator[tuple[str, Cascade]]:
    """Distinct cascades of the MiniLM encoder (random token ids; the weights are real)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from einfuse.backends.reference import infer_sizes
    from einfuse.einsum_cascade.lift import lift
    from examples import minilm

    params = minilm.load_params()
    ids = jnp.ones((1, seq), jnp.int32)
    program = lift(jax.make_jaxpr(minilm.encode)(params, ids, jnp.ones((1, seq), jnp.int32)))
    seen = set()
    for index, region in enumerate(program.regions):
        shapes = {
            n: tuple(program.avals[v].shape) for n, v in zip(region.input_tensors, region.inputs)
        }
        sizes = infer_sizes(region.cascade, shapes)
        cascade = region.cascade.with_sizes(**sizes)
        if cascade.fingerprint() not in seen:
            seen.add(cascade.fingerprint())
            yield f"minilm region {index} ({len(cascade.einsums)} einsums)", cascade


def model_rate(cascade: Cascade, target: Target) -> dict[str, Any]:
    """Scoring rate of the model objective on a large space, and of one more estimate."""
    start_cpu = time.process_time()
    result = autotune(
        cascade,
        target=target,
        objective="model",
        storage="memory",
        progress=False,
        trials=20_000,
        space_options=RATE_SPACE,
    )
    cpu = time.process_time() - start_cpu
    sizes = bind_sizes(cascade)
    space = build_space(cascade, target, sizes, RATE_SPACE)
    evaluator = ModelEvaluator(cascade, target, sizes)
    points = [p for _, p in zip(range(2000), space.points())]
    for p in points[:50]:
        evaluator.estimate(space.candidate(p))  # build the pipelines' models first
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for p in points:
        evaluator.estimate(space.candidate(p))
    wall, cpu_marginal = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "space": result.space_size,
        "scored": result.trials_done,
        "rate_wall": result.candidates_per_s,
        "rate_cpu": result.trials_done / cpu if cpu > 0 else math.inf,
        "marginal_wall": len(points) / wall,
        "marginal_cpu": len(points) / cpu_marginal if cpu_marginal > 0 else math.inf,
    }


def sweep(cascade: Cascade, target: Target, bench: Bench, repeats: int) -> dict[str, Any]:
    """Measure every distinct program of the measured space; race them all, as the tuner does."""
    import optuna

    space = build_space(cascade, target, bench.sizes)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    search = MeasuredSearch(
        study,
        space,
        bench,
        warmup=1,
        repeats=repeats,
        seed=0,
        deadline=None,
        on_trial=lambda: print(".", end="", flush=True),  # one dot per measured program
    )
    todo = [search.candidate(p) for p in search.searched.points()]
    for start in range(0, len(todo), 4):
        search.measure([(None, c) for c in todo[start : start + 4]])
    race = search.race(search.finalists())
    if race is None:
        raise RuntimeError(f"every candidate failed: {search.tally.failures}")
    return {
        "space": space,
        "measured": search.tally.measurements + search.tally.failed,
        "failed": search.tally.failed,
        "best": space.candidate(race.points[race.winner]),
        "default": search.default,
    }


def final_times(
    bench: Bench, space: SearchSpace, named: dict[str, Candidate], repeats: int
) -> dict[str, float]:
    """Median seconds per name. Candidates that emit one program (they differ only in params
    the backend ignores) share one timing, so no noise separates them."""
    prepared: dict[str, Prepared] = {}
    program = {}
    for name, candidate in named.items():
        projected = space.candidate(space.project(candidate.point, consumed(bench.backend)))
        program[name] = projected.key
        p = bench.prepare(projected)
        if isinstance(p, Prepared):
            prepared.setdefault(projected.key, p)
    timings = bench.time(prepared, warmup=1, repeats=repeats, seed=7)
    return {name: timings[key].median for name, key in program.items() if key in timings}


def run_case(name: str, cascade: Cascade, target: Target, args: argparse.Namespace) -> dict:
    sizes = bind_sizes(cascade)
    row: dict[str, Any] = {"case": name}
    rate = model_rate(cascade, target)
    row |= {
        "model_cand/s": rate["rate_wall"],
        "model_cand/cpu-s": rate["rate_cpu"],
        "marginal/s": rate["marginal_wall"],
    }
    bench = Bench(cascade, sizes, seed=0)
    swept = sweep(cascade, target, bench, args.repeats)
    row["programs"] = swept["measured"]
    if swept["measured"] < 2:
        row["note"] = "one program only: nothing to tune for the JAX backend"
        return row
    budget = max(1, swept["measured"] // 4)
    tuned = autotune(
        cascade,
        target=target,
        objective="hybrid",
        trials=budget,
        storage="memory",
        progress=False,
        repeats=args.repeats,
    )
    row["hybrid_measured"] = tuned.measurements + tuned.trials_failed
    space = swept["space"]
    hybrid = Candidate(tuned.pipeline, tuned.schedule, space.point(tuned.params))
    named = {"default": swept["default"], "hybrid": hybrid, "sweep": swept["best"]}
    times = final_times(bench, space, named, 9)
    row |= {
        "default_ms": times.get("default", math.nan) * 1e3,
        "hybrid_ms": times.get("hybrid", math.nan) * 1e3,
        "sweep_best_ms": times.get("sweep", math.nan) * 1e3,
        "hybrid/best": times.get("hybrid", math.nan) / times.get("sweep", math.nan),
        "hybrid_pick": _pick(tuned.pipeline, hybrid.point),
        "sweep_pick": _pick(swept["best"].pipeline, swept["best"].point),
    }
    return row


def _pick(pipeline: str, point: Any) -> str:
    """The pipeline, and the query tile where fusion is on (the schedule's only emitted part)."""
    query_tile = dict(point).get("fuse.query_tile")
    if not pipeline:
        return "(none)"
    return f"{pipeline} q={query_tile}" if query_tile else pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="4096,16384")
    parser.add_argument("--causal", default="no,yes", help="no, yes or no,yes")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--minilm-seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="seq 1024 and 2048, no MiniLM")
    parser.add_argument("--nominal", action="store_true", help="nominal cpu figures")
    args = parser.parse_args(argv)
    seqs = [1024, 2048] if args.quick else [int(s) for s in args.seqs.split(",") if s.strip()]
    causal = [c.strip() == "yes" for c in args.causal.split(",")]
    target = get_target("cpu", calibrate=not args.nominal)
    print(f"CPU steal right now: {cpu_steal_fraction():.1%}", flush=True)
    cases = list(attention_cases(seqs, causal))
    if not (args.no_minilm or args.quick):
        cases += list(minilm_cases(args.minilm_seq))
    rows = []
    for name, cascade in cases:
        start = time.perf_counter()
        with quiet_optuna():
            rows.append(run_case(name, cascade, target, args))
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["case", "programs", "hybrid_measured", "default_ms", "hybrid_ms", "sweep_best_ms"]
    columns += ["hybrid/best", "hybrid_pick", "sweep_pick", "model_cand/s", "model_cand/cpu-s"]
    columns += ["marginal/s", "note"]
    print()
    print(format_table(rows, columns, formats={"hybrid/best": ".3f"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
