"""How tuning scales with workers and stores: finished trials per second and wall time.

For each store (an SQLite file, Optuna's journal file, a PostgreSQL server: a throwaway
cluster started here as the tests do, see ``tests/pg_server.py``) and each worker count,
one fresh ``einfuse autotune --workers N`` run (its own process, a new empty store):

- **model**: the design's attention (``examples/specs/attention_3pass.ein``) at each size,
  ``--trials`` points scored; "finished" is the points scored (the study's ``evaluated``);
- **measure**: the same attention at a small size; "finished" is the candidates compiled,
  checked and timed (trials with a median), none measured twice, never more than
  ``--measure-trials`` (the study's total, however many workers).

Wall time is the whole command: process starts, imports, the workers, and the deciding
process (the model's ranking, or the measured final race).

    python -m benchmarks.tuning_scale --markdown                 # all of it: minutes
    python -m benchmarks.tuning_scale --stores postgres --workers 1,4 --no-measure
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "examples" / "specs" / "attention_3pass.ein"
STORES = ("sqlite", "journal", "postgres")


@contextmanager
def stores(names: list[str]) -> Iterator[Any]:
    """A function from (store name, run number) to a fresh storage argument."""
    server = None
    with tempfile.TemporaryDirectory(prefix="einfuse-scale-") as folder:
        try:
            if "postgres" in names:
                sys.path.insert(0, str(REPO))
                from tests.pg_server import PgServer

                server = PgServer().start()

            def fresh(name: str, run: int) -> str:
                if name == "sqlite":
                    return f"sqlite:///{folder}/run{run}.db"
                if name == "journal":
                    return f"journal:{folder}/run{run}.log"
                import psycopg

                assert server is not None
                dsn = f"host=127.0.0.1 port={server.port} user={server.user} dbname=postgres"
                with psycopg.connect(dsn, autocommit=True) as connection:
                    connection.execute(f"CREATE DATABASE run{run}")
                return server.url.rsplit("/", 1)[0] + f"/run{run}"

            yield fresh
        finally:
            if server is not None:
                server.stop()


def run(storage: str, workers: int, options: list[str]) -> tuple[float, int]:
    """One tuning command: its wall seconds and the trials it finished."""
    from einfuse.autotune.store import TuningStore

    command = [sys.executable, "-m", "einfuse.cli.autotune", str(SPEC), "--quiet"]
    command += [*options, "--workers", str(workers), "--storage", storage]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr}")
    store = TuningStore(storage)
    (row,) = store.studies()
    study = store.find_study(row["study"])
    if "--objective" in options and options[options.index("--objective") + 1] == "model":
        return wall, int(study.user_attrs["evaluated"])
    measured = [t.user_attrs["candidate"] for t in study.trials if "median_s" in t.user_attrs]
    assert len(measured) == len(set(measured)), "a candidate was measured twice"
    assert len(measured) <= int(options[options.index("--trials") + 1]), "more than --trials"
    return wall, len(measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--sizes", default="1024,4096", help="model: sequence lengths")
    parser.add_argument("--model-trials", type=int, default=4000)
    parser.add_argument("--measure-size", type=int, default=256)
    parser.add_argument("--measure-trials", type=int, default=8)
    parser.add_argument("--no-measure", action="store_true")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server
    names = args.stores.split(",")
    counts = [int(n) for n in args.workers.split(",")]
    model = ["--objective", "model", "--no-calibrate", "--target", "cpu"]
    cases: list[tuple[str, int, list[str]]] = [
        ("model", n, [*model, "--sizes", f"p={n},m={n}", "--trials", str(args.model_trials)])
        for n in (int(s) for s in args.sizes.split(","))
        if not args.no_model
    ]
    if not args.no_measure:
        n = args.measure_size
        measure = ["--objective", "measure", "--target", "cpu", "--sizes", f"p={n},m={n}"]
        cases.append(
            ("measure", n, [*measure, "--trials", str(args.measure_trials), "--repeats", "3"])
        )
    rows = []
    with stores(names) as fresh:
        number = 0
        for objective, size, options in cases:
            for name in names:
                for workers in counts:
                    number += 1
                    wall, finished = run(fresh(name, number), workers, options)
                    rows.append((objective, size, name, workers, finished, wall))
                    print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    header = "| objective | seq | store | workers | finished | wall s | finished/s |"
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|---|---:|---|---:|---:|---:|---:|")
    for objective, size, name, workers, finished, wall in rows:
        line = f"| {objective} | {size} | {name} | {workers} | {finished} | {wall:.1f} | "
        print(line + f"{finished / wall:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
