"""`einfuse explain SPEC --target T [--sizes ...] [--schedule ...]`: the cost model's breakdown.

Loads a cascade spec, runs an optional pass pipeline (on the canonical form, as `einfuse.jit`
and `einfuse autotune` do: `einfuse.compile_path`; one line per pass says what it did), binds
the sizes and prices the program the JAX backend would run (the spec's declared dtype unless
`--dtype`, the blockwise loop's float32 carry, float32 dots as JAX's matmul precision runs them
on the target); prints the cost model's
per-Einsum and per-kernel table (work, bytes per memory level, time, bound) and a paragraph that
names the bottleneck. Without `--schedule` the model picks tiles that fit the target
(`CostModel.default_tiles`); `--fusemax-mapping` uses FuseMax's mapping for a fused attention
cascade. A schedule that does not fit prints why and exits with status 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from einfuse.cli.args import (
    add_backend_argument,
    add_passes_argument,
    add_sizes_argument,
    check_sizes,
    parse_sizes,
)
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
        default=None,
        help="cpu, h100, h200, a100, tpu_v5e, fusemax, gpu/tpu, or a target .toml file "
        "(default: the device JAX runs on here)",
    )
    add_sizes_argument(parser)
    parser.add_argument(
        "--schedule",
        default=None,
        metavar="TEXT",
        help='a schedule in text form, e.g. "tile p=128, m=256; order b, h, p, m1"',
    )
    add_passes_argument(parser, 'passes to run first, e.g. "fuse"')
    add_backend_argument(parser)
    parser.add_argument("--dtype", default=None, help="element type (default: the spec's)")
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


def run(args: argparse.Namespace) -> int:
    from einfuse.autotune.screen import compute_dtype, program_cost_model
    from einfuse.backends.backend import get_backend
    from einfuse.cli.load import load_spec
    from einfuse.compile_path import canonicalize, check_schedule, run_pipeline
    from einfuse.cost_model.errors import CostModelError
    from einfuse.cost_model.target import get_target, load_target
    from einfuse.ir.schedule import Schedule
    from einfuse.passes.overlap_common import cost_target

    get_backend(args.backend)  # the model prices the program this backend emits: JAX's
    sizes = parse_sizes(args.sizes)
    spec = load_spec(args.spec)
    if args.target is None:
        from einfuse.targets import resolve_target

        args.target = resolve_target(None)
    if args.target.endswith(".toml"):
        if not Path(args.target).is_file():
            raise CliError(f"no such target file: {args.target}")
        target = load_target(args.target)
    else:
        target = get_target(args.target, calibrate=not args.nominal)
    # Passes that read sizes (the overlap passes' legality and cost) see the given ones, as
    # autotune's do; their `auto` options are priced on --target.
    ranks = set(spec.all_ranks())
    spec = spec.with_sizes(**{r: n for r, n in sizes.items() if r in ranks})
    # the compile path of einfuse.jit and autotune: canonical form, then the pipeline
    with cost_target(target):
        compiled = run_pipeline(canonicalize(spec), args.passes or None)
    cascade = compiled.cascade
    check_sizes(sizes, spec, cascade, spec=args.spec)
    dtype = args.dtype or compute_dtype(spec)
    model = program_cost_model(cascade, target, sizes, dtype)
    if args.fusemax_mapping and args.schedule is not None:
        raise CliError("give either --schedule or --fusemax-mapping, not both")
    schedule = None
    if args.schedule is not None:
        schedule = Schedule.parse(args.schedule, file="--schedule")
        check_schedule(schedule, compiled.canonical, cascade)
    elif args.fusemax_mapping:
        from einfuse.cost_model.fusemax import fusemax_mapping

        schedule = fusemax_mapping(cascade, target, sizes)
    try:
        report = model.report(schedule)
    except CostModelError as exc:
        given = "--dtype" if args.dtype else f"{args.spec}'s declared dtype"
        raise CliError(f"cannot price {given} {model.dtype} on {target.name}: {exc}") from exc
    with cost_target(target):
        for step in compiled.steps:
            print(step.verdict())
    print(f"schedule: {schedule if schedule is not None else _default(model)}")
    print(f"dtype: {model.dtype}; float32 dots at JAX matmul precision {model.precision!r}")
    print(report.table())
    print()
    print(report.why())
    kernels = _pallas_kernels(args.backend, cascade, model, schedule)
    for line, _ in kernels:
        print(line)
    return 0 if report.fits and all(fits for _, fits in kernels) else 1


def _pallas_kernels(backend: str, cascade: object, model: object, schedule: object) -> list:
    """The Pallas backend's kernels: what one program holds and its price (see
    ``autotune.pallas_model``); the table above prices the loop as the JAX backend runs it."""
    if backend != "pallas":
        return []
    from einfuse.autotune.pallas_model import describe_kernels

    m: Any = model
    return describe_kernels(cascade, m.sizes, schedule, m.target, m.dtype)


def _default(model: object) -> str:
    tiles = model.default_tiles()  # type: ignore[attr-defined]
    if not tiles:
        return "none (untiled)"
    return "default: tile " + ", ".join(f"{r}={t}" for r, t in sorted(tiles.items()))
