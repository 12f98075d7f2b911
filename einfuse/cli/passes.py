"""`einfuse passes SPEC [--passes P] [--print-after-all]`: a cascade through its passes.

Prints the cascade (after the pipeline, or after every pass) and the FuseMax lower
bound on the passes it makes over each rank, so a user sees what fusion bought.
"""

from __future__ import annotations

import argparse

from einfuse.cli.args import add_passes_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "passes",
        help="print a cascade through a pass pipeline, with its pass count per rank",
        description="Load a cascade spec (.ein text or TeAAL-style .yaml), run a pass pipeline "
        "on it, and print the result with the number of passes it makes over each rank.",
    )
    parser.add_argument("spec", metavar="SPEC", help="a .ein or .yaml cascade spec")
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
    return 0
