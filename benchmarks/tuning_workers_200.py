"""The issue's 4 workers x 50 measured trials: 200 distinct candidates compiled, checked and
timed by 4 processes on one PostgreSQL study; the study must end with exactly 200, none
measured twice, none left RUNNING or WAITING, and one stored best.

A measured study holds only distinct programs, and the JAX backend's measured space of
attention is small at sizes the CLI offers (at most ~70 programs); this one widens it with
more divisor tiles (``SpaceOptions(max_divisor_choices=100)``) at ``p=520, m=40320``: 225
programs, each ~0.3-1.5 s of XLA compile and check on a CPU. So it is a benchmark (minutes),
not a test; `tests/test_autotune_workers.py` checks the same with 4 workers x 2.

    python -m benchmarks.tuning_workers_200                  # 4 x 50: ~5 min on 2 cores
    python -m benchmarks.tuning_workers_200 --trials 20      # a quick look
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.tuning_scale import REPO, stores


def tune(url: str, trials: int, worker: tuple[int, int] | None, workers: int) -> None:
    """One worker's share (``worker``), or the deciding process (its race: 4 finalists)."""
    from einfuse.autotune.space import SpaceOptions
    from einfuse.autotune.tuner import autotune
    from einfuse.einsum_cascade import attention

    cascade = attention("3pass", heads=False, batch=False, e=8, f=8, p=520, m=40320)
    options = dict(target="cpu", objective="measure", trials=trials, repeats=1, progress=False)
    share = {"worker": worker} if worker else {"workers": workers, "finalists": 4}
    wide = SpaceOptions(max_divisor_choices=100)
    autotune(cascade, storage=url, space_options=wide, **options, **share)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=200, help="the study's total")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # I/N URL: one worker process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        index, count = (int(x) for x in args.worker.split("/"))
        tune(args.url, args.trials, (index, count), count)
        return 0
    from optuna.trial import TrialState

    from einfuse.autotune.store import TuningStore

    with stores(["postgres"]) as fresh:
        url = fresh("postgres", 0)
        command = [sys.executable, "-m", "benchmarks.tuning_workers_200", "--url", url]
        command += ["--trials", str(args.trials)]
        start = time.perf_counter()
        procs = [
            subprocess.Popen([*command, "--worker", f"{i}/{args.workers}"], cwd=REPO)
            for i in range(args.workers)
        ]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a worker failed")
        shared = time.perf_counter() - start
        tune(url, args.trials, None, args.workers)
        total = time.perf_counter() - start
        store = TuningStore(url)
        (row,) = store.studies()
        trials = store.find_study(row["study"]).trials
    measured = [t.user_attrs["candidate"] for t in trials if "median_s" in t.user_attrs]
    by_worker = [t.user_attrs["worker"] for t in trials if "median_s" in t.user_attrs]
    left = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    duplicates = sum("duplicate_of" in t.user_attrs for t in trials)
    print(
        f"{args.workers} workers, --trials {args.trials}: {len(measured)} measured "
        f"({len(set(measured))} distinct; per worker "
        f"{sorted(by_worker.count(w) for w in set(by_worker))}), {duplicates} duplicate "
        f"proposals recorded, {len(left)} left running or waiting; workers {shared:.1f} s, "
        f"with the deciding race {total:.1f} s; best {row['best']['pipeline']} "
        f"{row['best']['schedule']}"
    )
    assert len(measured) == len(set(measured)) == args.trials and not left
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
