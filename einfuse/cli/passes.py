"""`einfuse passes SPEC [--passes P] [--print-after-all]`: a cascade through its passes.

Prints the cascade (after the pipeline, or after every pass) and the FuseMax lower
bound on the passes it makes over each rank, so a user sees what fusion bought.
`einfuse passes FILE.py:FUNCTION --args SPECS` lifts a function instead and prints its
program, after every program pass (``prune-tokens``) and region pass with ``--print-after-all``.
"""

from __future__ import annotations

import argparse
import itertools

from einfuse.cli.args import add_passes_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "passes",
        help="print a cascade through a pass pipeline, with its pass count per rank",
        description="Load a cascade spec (.ein text or TeAAL-style .yaml), run a pass pipeline "
        "on it, and print the result with the number of passes it makes over each rank.",
    )
    parser.add_argument(
        "spec", metavar="SPEC", help="a .ein or .yaml cascade spec, or MODULE:FUNCTION"
    )
    parser.add_argument(
        "--args", default="", metavar="SPECS", help="with MODULE:FUNCTION: argument shapes"
    )
    add_passes_argument(parser, 'passes to run, e.g. "partition{rank=m,tile=512},fuse"')
    parser.add_argument(
        "--print-after-all", action="store_true", help="print the cascade after every pass"
    )
    parser.add_argument(
        "--why", action="store_true", help="explain each rank's count, Einsum by Einsum"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from einfuse.cli.load import load_spec
    from einfuse.passes.manager import run_passes
    from einfuse.passes.pass_count import explain_passes, pass_counts

    if ":" in args.spec and not args.spec.endswith((".ein", ".yaml", ".yml")):
        return _run_function(args)
    result = run_passes(load_spec(args.spec), args.passes)
    if args.print_after_all:
        print(result.print_after_all(), end="")
    else:
        print(result.cascade, end="")
    counts = pass_counts(result.cascade)
    width = max([4, *(len(r) for r in counts)])
    print(f"\n{'rank':<{width}}  passes")
    for rank, n in counts.items():
        print(f"{rank:<{width}}  {n}")
    if args.why:
        print()
        print(explain_passes(result.cascade))
        _overlap_reports(result.history)
    return 0


def _overlap_reports(history: tuple) -> None:
    """Each overlap pass's report (what it did per collective, and why)."""
    from einfuse.passes.manager import parse_pipeline
    from einfuse.passes.overlap_report import OVERLAP_PASSES, overlap_explain

    for (_, before), (text, _) in itertools.pairwise(history):
        (spec,) = parse_pipeline(text)
        if spec.name in OVERLAP_PASSES:
            print(overlap_explain(before, spec.name, dict(spec.options)))


def _run_function(args: argparse.Namespace) -> int:
    """The lifted program of a function through the pipeline: program passes, then regions."""
    from einfuse.cli.args import load_function, parse_arg_specs
    from einfuse.frontend import jit

    traced = jit(load_function(args.spec), passes=args.passes).trace(*parse_arg_specs(args.args))
    if not args.print_after_all:
        print(traced.cascade(), end="")
        return 0
    for name, program in traced.program_passes or (("input", traced.lifted),):
        print(f"// ----- after {name}\n{program}", end="")
    for k, history in enumerate(traced.pass_history):
        for name, text in history:
            print(f"// ----- region {k} after {name}\n{text}", end="")
    return 0
