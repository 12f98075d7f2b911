"""The `einfuse` command line.

Each command lives in its own module of this package, named in `COMMAND_MODULES`. A command
module exposes `register(subparsers)`, which adds its parser and sets `run` (a function from
the parsed `argparse.Namespace` to an exit code) with `parser.set_defaults(run=...)`. Adding a
command is one new file plus one name below.

Command modules import nothing heavy (jax, optuna) at module level, so `einfuse --help` and
`einfuse --version` start in a blink; they import what they need inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from einfuse.cli.errors import CliError, is_user_error

__all__ = ["COMMAND_MODULES", "CliError", "build_parser", "main"]

COMMAND_MODULES: tuple[str, ...] = ("hlo", "passes", "explain", "autotune")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command in `COMMAND_MODULES` registered."""
    from einfuse import __version__

    parser = argparse.ArgumentParser(
        prog="einfuse",
        description="Einsum-cascade compiler and autotuner for JAX/XLA and Pallas.",
    )
    parser.add_argument("--version", action="version", version=f"einfuse {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print `einfuse: error: ...` and return 2, never a traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors: argparse has printed
        return _exit_code(exit_.code)
    try:
        return int(args.run(args))
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"einfuse: error: {exc}", file=sys.stderr)
        return 2


def _exit_code(code: object) -> int:
    """SystemExit's code as argparse and sys.exit use it: None is success, a message failure."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 2
