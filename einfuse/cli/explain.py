"""`einfuse explain SPEC --target T [--sizes ...] [--schedule ...]`: the cost model's breakdown.

Loads a cascade spec, runs an optional pass pipeline (on the canonical form, as `einfuse.jit`
and `einfuse autotune` do: `einfuse.compile_path`; one line per pass says what it did), binds
the sizes and prints the cost model's
per-Einsum and per-kernel table (work, bytes per memory level, time, bound) and a paragraph that
names the bottleneck. Without `--schedule` the model picks tiles that fit the target
(`CostModel.default_tiles`); `--fusemax-mapping` uses FuseMax's mapping for a fused attention
cascade. A schedule that does not fit prints why and exits with status 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from einfuse.cli.errors import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="predict a cascade's time on a target and say what bounds it",
        description="Print the cost model's breakdown of a cascade spec on a target: per Einsum "
        "the MACs, vector and transcendental ops, bytes per memory level, time and bound; per "
        "kernel (fused loop nest) its steps and time; and one paragraph naming the bottleneck.",
    )
    parser.add_argument("spec", metavar="SPEC", help="a .ein or .yaml cascade spec")
    parser.add_argument(
        "--target",
        default="cpu",
        help="built-in target (cpu, h100, h200, a100, tpu_v5e, fusemax) or a target .toml file",
    )
    parser.add_argument(
        "--sizes", default="", metavar="R=N,...", help="rank sizes, e.g. e=64,m=4096,p=1024"
    )
    parser.add_argument(
        "--schedule",
        default=None,
        metavar="TEXT",
        help='a schedule in text form, e.g. "tile p=128, m=256; order b, h, p, m1"',
    )
    parser.add_argument("--pipeline", default="", help='passes to run first, e.g. "fuse"')
    parser.add_argument("--dtype", default=None, help="element type (default: the target's)")
    parser.add_argument(
        "--fusemax-mapping",
        action="store_true",
        help="use FuseMax's mapping of a fused attention cascade (with --target fusemax)",
    )
    parser.add_argument(
        "--nominal",
        action="store_true",
        help="for --target cpu: the nominal host figures instead of a (cached) calibration",
    )
    parser.set_defaults(run=run)


def parse_sizes(text: str) -> dict[str, int]:
    """`"e=64, m=4096"` -> `{"e": 64, "m": 4096}`; names may be ranks or their symbols (`M`)."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value.isdigit() or int(value) <= 0:
            raise CliError(f"--sizes: expected NAME=POSITIVE_INT, got {item!r}")
        if name in sizes:
            raise CliError(f"--sizes: {name} given twice")
        sizes[name] = int(value)
    return sizes


def run(args: argparse.Namespace) -> int:
    from einfuse.cli.load import load_spec
    from einfuse.compile_path import canonicalize, check_schedule, run_pipeline
    from einfuse.cost_model.model import CostModel
    from einfuse.cost_model.target import get_target, load_target
    from einfuse.ir.schedule import Schedule

    # the compile path of einfuse.jit and autotune: canonical form, then the pipeline
    compiled = run_pipeline(canonicalize(load_spec(args.spec)), args.pipeline or None)
    cascade = compiled.cascade
    if args.target.endswith(".toml"):
        if not Path(args.target).is_file():
            raise CliError(f"no such target file: {args.target}")
        target = load_target(args.target)
    else:
        target = get_target(args.target, calibrate=not args.nominal)
    sizes = parse_sizes(args.sizes)
    model = CostModel(cascade, target, sizes, args.dtype)
    if args.fusemax_mapping and args.schedule is not None:
        raise CliError("give either --schedule or --fusemax-mapping, not both")
    schedule = None
    if args.schedule is not None:
        schedule = Schedule.parse(args.schedule, file="--schedule")
        check_schedule(schedule, compiled.canonical, cascade)
    elif args.fusemax_mapping:
        from einfuse.cost_model.fusemax import fusemax_mapping

        schedule = fusemax_mapping(cascade, target, sizes)
    report = model.report(schedule)
    for step in compiled.steps:
        print(step.verdict())
    print(f"schedule: {schedule if schedule is not None else _default(model)}")
    print(report.table())
    print()
    print(report.why())
    return 0 if report.fits else 1


def _default(model: object) -> str:
    tiles = model.default_tiles()  # type: ignore[attr-defined]
    if not tiles:
        return "none (untiled)"
    return "default: tile " + ", ".join(f"{r}={t}" for r, t in sorted(tiles.items()))
