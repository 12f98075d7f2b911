"""`einfuse autotune SPEC_OR_MODULE:FUNCTION ...`: tune, and look at what is stored.

Tunes a cascade spec (bound by ``--sizes``) or a function (traced with ``--args``) and prints
the chosen pipeline and schedule beside the default's, with predicted and measured times and
the trial counts; ``--plot DIR`` writes the optimization history and parameter importances.
``--list`` and ``--show STUDY`` read the store; ``--export`` / ``--import`` move the best
choices as JSON. Also runnable as ``python -m einfuse.cli.autotune``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from einfuse.autotune.store_server import DEFAULT_HEARTBEAT_S  # imports no optuna
from einfuse.cli.args import add_backend_argument, add_sizes_argument, check_sizes, parse_sizes
from einfuse.cli.errors import CliError, is_user_error

OBJECTIVES = ("model", "measure", "hybrid", "pareto")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "autotune",
        help="tune a cascade's pipeline and schedule (cost model, measurement, or both)",
        description="Search pass pipelines and schedules for a cascade spec or a JAX function "
        "with Optuna, and store the best per cascade, shapes, dtypes, target and versions.",
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backend_argument(parser)
    parser.add_argument(
        "subject",
        nargs="?",
        metavar="SPEC_OR_MODULE:FUNCTION",
        help="a .ein/.yaml cascade spec, or path/to/file.py:function or pkg.module:function",
    )
    parser.add_argument("--args", default="", metavar="SPECS", help='e.g. "f32[1,8,512,64] ..."')
    add_sizes_argument(parser)
    parser.add_argument(
        "--target",
        default=None,
        help="cpu, h100, h200, a100, tpu_v5e, fusemax, or gpu/tpu (default: the device JAX "
        "runs on here); measuring needs the target to be this machine's device",
    )
    parser.add_argument(
        "--no-calibrate",
        action="store_true",
        help="use the cpu target's nominal figures instead of measuring this host once",
    )
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="hybrid",
        help="model: cost model only; measure: time candidates; hybrid (default): both; "
        "pareto: prune where it pays, time x a quality metric (see below)",
    )
    parser.add_argument("--trials", type=int, help="points scored (model) or candidates measured")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop measuring after S s")
    parser.add_argument(
        "--storage",
        help="postgresql://user:pw@host/db (pip install 'einfuse[postgres]'), sqlite:///FILE, "
        "journal:PATH or memory (default: a per-user SQLite file)",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=DEFAULT_HEARTBEAT_S,
        metavar="S",
        help="database stores: a worker beats every S s while it measures a trial; a trial "
        f"silent for 2*S s (its worker died) is failed (default {DEFAULT_HEARTBEAT_S})",
    )
    parser.add_argument("--study", help="study name (default: derived from the tuning key)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N worker processes share the study (each its share of the screening or the "
        "measuring; --trials is the study's total), then this one decides",
    )
    parser.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)  # one of them
    # with --fresh: the run's start, so a worker that starts late counts the others' trials
    parser.add_argument("--fresh-since", metavar="ISO", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write history/importance PNGs")
    parser.add_argument(
        "--fresh", action="store_true", help="tune again even if a result is stored (adds trials)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from einfuse.cli.pareto import add_pareto_arguments

    add_pareto_arguments(parser)
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("--list", action="store_true", help="list the stored studies")
    actions.add_argument("--show", metavar="STUDY", help="print one stored study")
    actions.add_argument("--export", type=Path, metavar="JSON", help="write the best choices")
    actions.add_argument("--import", dest="import_", type=Path, metavar="JSON", help="read them")


def run(args: argparse.Namespace) -> int:
    from einfuse.autotune.store import TuningStore

    if args.heartbeat < 1:
        raise CliError(f"--heartbeat must be a whole number of seconds >= 1, got {args.heartbeat}")
    reading = args.list or args.show or args.export or args.import_
    if not reading and not args.subject:
        raise CliError("give a SPEC or MODULE:FUNCTION to tune, or --list / --show STUDY")
    worker = _worker(args)
    store = TuningStore(args.storage, heartbeat_s=args.heartbeat)
    if reading:
        if args.list:
            print(_list_table(store))
        elif args.show:
            print(_show_study(store, args.show))
        elif args.export:
            print(f"exported {store.export_best(args.export)} record(s) to {args.export}")
        else:
            print(f"imported {store.import_best(args.import_)} record(s) from {args.import_}")
        return 0
    if args.objective == "pareto":
        from einfuse.cli.pareto import run_pareto

        return run_pareto(args, store)
    if worker is not None:
        results = _tune(args, store, worker=worker)
        for r in getattr(results, "results", (results,)):
            name = r.study.study_name if r.study is not None else "-"
            print(f"worker {worker[0]}/{worker[1]}: {r.trials_done} trial(s) in study {name}")
        return 0
    if args.workers > 1:
        _run_workers(args, store)
    result = _tune(args, store, workers=args.workers)
    print(result.table())
    if args.plot is not None:
        for line in _plot(result, args.plot):
            print(line)
    return 0


def _worker(args: argparse.Namespace) -> tuple[int, int] | None:
    """The hidden ``--worker I/N`` of a worker process; checks ``--workers`` too."""
    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    shared = args.storage is None or not (
        args.storage == "memory" or args.storage.endswith(".json")
    )
    if args.workers > 1 and not shared:
        raise CliError(f"--workers share a study: --storage {args.storage} cannot be shared")
    if args.worker is None:
        return None
    index, _, count = args.worker.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise CliError(f"--worker must be I/N with 0 <= I < N, got {args.worker!r}")
    return int(index), int(count)


def _run_workers(args: argparse.Namespace, store: Any) -> None:
    """Start ``--workers`` - 1 processes on the study and be worker 0 meanwhile (one process
    start and one import fewer); wait for them. One failing is an error."""
    import subprocess
    import tempfile
    from contextlib import ExitStack

    count, failed = args.workers, []
    if args.fresh:  # one start for every worker of this run (see `MeasuredSearch.current`)
        args.fresh_since = datetime.now().isoformat()
    with ExitStack() as files:
        procs = []
        for i in range(1, count):
            err = files.enter_context(tempfile.TemporaryFile("w+"))
            command = [*_worker_command(args), "--worker", f"{i}/{count}"]
            procs.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err), err))
        try:
            _tune(args, store, worker=(0, count))
        except Exception as exc:
            if not is_user_error(exc):
                raise
            failed.append(f"worker 0/{count}: {exc}")
        for i, (proc, err) in enumerate(procs, start=1):
            if proc.wait() != 0:
                err.seek(0)
                last = (err.read().strip().splitlines() or ["(no message)"])[-1]
                failed.append(f"worker {i}/{count} exited {proc.returncode}: {last}")
    if failed:
        raise CliError("; ".join(failed) + " (what the others finished is stored)")


def _worker_command(args: argparse.Namespace) -> list[str]:
    """This command as one worker process runs it (quiet; ``--worker`` to be added)."""
    options = {
        "--args": args.args or None,
        "--sizes": args.sizes,
        "--target": args.target,
        "--objective": args.objective,
        "--trials": args.trials,
        "--timeout": args.timeout,
        "--storage": args.storage,
        "--study": args.study,
        "--seed": args.seed,
        "--repeats": args.repeats,
        "--backend": args.backend,
        "--heartbeat": args.heartbeat,
    }
    command = [sys.executable, "-m", "einfuse.cli.autotune", args.subject, "--quiet"]
    command += [str(x) for name, v in options.items() if v is not None for x in (name, v)]
    flags = (("--no-calibrate", args.no_calibrate), ("--fresh", args.fresh))
    since = ["--fresh-since", args.fresh_since] if args.fresh_since else []
    return command + [flag for flag, on in flags if on] + since


def _fresh(args: argparse.Namespace, share: dict[str, Any]) -> bool | datetime:
    """--fresh for this process: a worker's is its run's start; the deciding process after
    the workers uses what they measured (not fresh)."""
    if not args.fresh or share.get("workers", 1) > 1:
        return False
    return datetime.fromisoformat(args.fresh_since) if args.fresh_since else True


def _tune(args: argparse.Namespace, store: Any, **share: Any) -> Any:
    from einfuse.autotune.tuner import autotune
    from einfuse.cost_model.target import get_target
    from einfuse.targets import resolve_target

    target: Any = resolve_target(args.target)
    if target == "cpu" and args.no_calibrate:
        target = get_target("cpu", calibrate=False)
    options = dict(
        target=target,
        objective=args.objective,
        trials=args.trials,
        timeout=args.timeout,
        storage=store,
        study=args.study,
        progress=not args.quiet,
        seed=args.seed,
        repeats=args.repeats,
        fresh=_fresh(args, share),
        backend=args.backend,
        **share,
    )
    sizes = parse_sizes(args.sizes)
    if Path(args.subject).is_file():
        from einfuse.cli.load import load_spec

        spec = load_spec(args.subject)
        check_sizes(sizes, spec, spec=args.subject)
        return autotune(spec, sizes=sizes, **options)
    if ":" not in args.subject:
        raise CliError(f"no such spec file: {args.subject} (nor MODULE:FUNCTION)")
    if sizes:
        raise CliError("--sizes binds a spec's ranks; a function's sizes come from --args")
    from einfuse.cli.args import load_function, parse_arg_specs

    if not args.args:
        raise CliError("tuning a function needs --args with its argument shapes")
    return autotune(load_function(args.subject), *parse_arg_specs(args.args), **options)


def _list_table(store: Any) -> str:
    from einfuse.autotune.timing_table import format_table

    rows = []
    for row in store.studies():
        best = row["best"] or {}
        measured, predicted = best.get("measured_s"), best.get("predicted_s")
        rows.append(
            {
                "study": row["study"],
                "trials": row["trials"],
                "objective": best.get("objective"),
                "pipeline": best.get("pipeline"),
                "schedule": best.get("schedule"),
                "measured_ms": None if measured is None else measured * 1e3,
                "predicted_ms": None if predicted is None else predicted * 1e3,
            }
        )
    if not rows:
        return f"no studies in {store.where}"
    columns = ["study", "trials", "objective", "pipeline", "schedule"]
    return format_table(rows, [*columns, "measured_ms", "predicted_ms"])


def _show_study(store: Any, name: str) -> str:
    import json

    from einfuse.autotune.result import race_table
    from einfuse.autotune.store import BEST_ATTR, KEY_ATTR, RACE_ATTR
    from einfuse.autotune.timing_table import format_table

    study = store.find_study(name)
    if study is None:
        names = ", ".join(row["study"] for row in store.studies()) or "none"
        raise CliError(f"no study {name!r} in {store.where}; studies: {names}")
    with store.guard():
        attrs, trials = study.user_attrs, study.get_trials(deepcopy=False)
    lines = [f"study {name} in {store.where}"]
    if KEY_ATTR in attrs:
        lines.append("key " + json.dumps(attrs[KEY_ATTR], sort_keys=True))
    from einfuse.autotune.pareto import stored_result
    from einfuse.autotune.pareto_result import candidates_table

    pareto = stored_result(study)
    if pareto is not None:  # two objectives: its own tables
        return "\n".join([*lines, pareto.table(), candidates_table(pareto)])
    best = attrs.get(BEST_ATTR)
    if best:
        lines.append(f"best pipeline: {best['pipeline'] or '(none)'}; schedule: {best['schedule']}")
        figures = [
            f"{label} {best[field] * 1e3:.4g} ms"
            for label, field in (("measured", "measured_s"), ("default", "default_s"))
            if best.get(field) is not None and best.get("objective") != "model"
        ]
        if figures:
            lines.append("in the final race: " + ", ".join(figures))
    if attrs.get(RACE_ATTR):
        lines.append(race_table(attrs[RACE_ATTR]))
        lines.append("trials (each timed in its own batch beside the default; the race decides):")
    rows = [
        {
            "#": t.number,
            "state": t.state.name,
            "params": ", ".join(f"{k}={v}" for k, v in t.params.items()),
            "value_ms": None if t.value is None else t.value * 1e3,
            "note": _note(t),
        }
        for t in trials
    ]
    lines.append(format_table(rows, ["#", "state", "params", "value_ms", "note"]))
    return "\n".join(lines)


def _note(trial: Any) -> str:
    """Why a trial failed, or which earlier trial it repeats."""
    if trial.user_attrs.get("reason"):
        return str(trial.user_attrs["reason"])
    if "duplicate_of" in trial.user_attrs:
        return f"same candidate as #{trial.user_attrs['duplicate_of']}"
    return ""


def _plot(result: Any, directory: Path) -> list[str]:
    """Optimization history and parameter importances as PNG, one pair per study."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as ovm

    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    results = getattr(result, "results", (result,))
    for r in results:
        if r.study is None:
            continue
        stem = r.study.study_name
        for kind, plot in (("history", ovm.plot_optimization_history), ("importance", None)):
            path = directory / f"{stem}-{kind}.png"
            try:
                with warnings.catch_warnings():  # optuna marks its matplotlib plots experimental
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    if plot is None:
                        ovm.plot_param_importances(r.study)
                    else:
                        plot(r.study)
                plt.gcf().savefig(path, dpi=100, bbox_inches="tight")
                lines.append(f"wrote {path}")
            except Exception as exc:  # e.g. importances need two finished trials
                lines.append(f"no {kind} plot for {stem}: {type(exc).__name__}: {exc}")
            finally:
                plt.close("all")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m einfuse.cli.autotune ...``: the command alone, with the CLI's error rules."""
    parser = argparse.ArgumentParser(prog="einfuse autotune")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return run(args)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"einfuse: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
