"""``einfuse autotune MODULE:FUNCTION --objective pareto --metric M:FN --max-loss X``.

The options and the run of a Pareto search over pruning pipelines (`einfuse.autotune.pareto`):
the metric and the calibration calls are loaded from the user's modules, the front is
printed, and ``--plot DIR`` draws it.
"""

from __future__ import annotations

import argparse
from typing import Any

from einfuse.cli.errors import CliError


def add_pareto_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "pareto search (--objective pareto): prune where it pays, under a loss bound"
    )
    group.add_argument(
        "--metric",
        metavar="MODULE:FN",
        help="quality loss fn(outputs, dense_outputs) -> float (lists with one output per "
        "calibration call, NumPy, the model's own dtype); lower is better",
    )
    group.add_argument(
        "--max-loss", type=float, metavar="X", help="choose the fastest candidate with loss <= X"
    )
    group.add_argument(
        "--calibration",
        metavar="MODULE:FN",
        help="fn() -> list of calls (tuples of the function's arguments), all of one shape "
        "(default: the metric module's `calibration`)",
    )
    group.add_argument(
        "--time",
        choices=("measure", "model"),
        default="measure",
        help="measure (default): time candidates interleaved with the dense program; "
        "model: the cost model's price of the pruned regions",
    )
    group.add_argument(
        "--prune",
        default="tokens,heads",
        metavar="PASSES",
        help="which pruning passes to search: tokens, heads or both (default tokens,heads)",
    )


def run_pareto(args: argparse.Namespace, store: Any) -> int:
    """Run the search the command line asks for and print (and plot) its front."""
    from einfuse.cli.args import load_function

    if args.metric is None or args.max_loss is None:
        raise CliError("--objective pareto needs --metric MODULE:FN and --max-loss X")
    if not args.subject or ":" not in args.subject:
        raise CliError("--objective pareto tunes a function: give MODULE:FUNCTION")
    if args.args or args.sizes:
        raise CliError("--objective pareto takes its inputs from the calibration calls, not --args")
    if args.workers > 1:
        raise CliError("--objective pareto runs in one process (--workers 1)")
    function = load_function(args.subject)
    metric = load_function(args.metric)
    calls = _calibration(args.calibration, args.metric)
    from einfuse.autotune.pareto import pareto_search
    from einfuse.autotune.pareto_result import plot_front
    from einfuse.cost_model.target import get_target
    from einfuse.targets import resolve_target

    target: Any = resolve_target(args.target)
    if target == "cpu" and args.no_calibrate:
        target = get_target("cpu", calibrate=False)
    result = pareto_search(
        function,
        calls,
        metric,
        max_loss=args.max_loss,
        target=target,
        time_mode=args.time,
        prune=[p.strip() for p in args.prune.split(",") if p.strip()],
        trials=args.trials,
        timeout=args.timeout,
        storage=store,
        study=args.study,
        seed=args.seed,
        repeats=args.repeats,
        progress=not args.quiet,
        fresh=args.fresh,
        metric_name=args.metric,
        backend=args.backend,
    )
    print(result.table())
    if args.plot is not None:
        for line in plot_front(result, args.plot):
            print(line)
    return 0


def _calibration(spec: str | None, metric_spec: str) -> Any:
    """The calibration calls: ``spec``'s function, else the ``calibration`` function of the
    module ``--metric`` names (not the module that defined the metric: it may re-export it)."""
    from einfuse.cli.args import load_function, one_line

    if spec is None:
        spec = f"{metric_spec.rpartition(':')[0]}:calibration"
        try:
            make = load_function(spec)
        except CliError:
            raise CliError(
                f"no calibration inputs: {spec.rpartition(':')[0]} has no function "
                "`calibration`; give --calibration MODULE:FN"
            ) from None
    else:
        make = load_function(spec)
    try:
        return make()
    except Exception as exc:
        raise CliError(f"calibration {spec} raised {one_line(exc)}") from exc
