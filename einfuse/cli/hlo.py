"""`einfuse hlo MODULE:FUNCTION --args SPECS`: what XLA makes of a function, in one command.

Prints the StableHLO or the optimized HLO, or (`--summary`) a table of fusions, collectives and
XLA's cost and memory figures. `--dump DIR` reruns the command in a subprocess with XLA's dump
flags, because XLA reads them only once, when jax initializes its backend.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from einfuse.cli.args import add_backend_argument, add_passes_argument
from einfuse.cli.errors import CliError, is_user_error

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import jax

# Mirrors einfuse.backends.inspection.STAGES (a test keeps them equal); importing it from there
# would import jax, and `einfuse --help` must not.
STAGES = ("stablehlo", "optimized")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "hlo",
        help="print a function's StableHLO, optimized HLO, or a summary of it",
        description="Print what XLA makes of a function: its StableHLO, its optimized HLO, "
        "or a summary of fusions, collectives and XLA's cost and memory analyses.",
    )
    parser.add_argument(
        "target", metavar="MODULE:FUNCTION", help="path/to/file.py:function or pkg.module:function"
    )
    parser.add_argument(
        "--args",
        default="",
        metavar="SPECS",
        help='argument shapes and dtypes, e.g. "f32[2,8,128,64] bf16[16] i32[]"',
    )
    add_passes_argument(parser, 'einfuse passes to run first, e.g. "fuse{tile=512}"')
    add_backend_argument(parser)
    parser.add_argument("--stage", choices=STAGES, default="optimized", help="default: optimized")
    parser.add_argument(
        "--platform",
        choices=PLATFORMS,
        default=None,
        help="lower for this platform (cuda, rocm, tpu: StableHLO only, as nothing here "
        "compiles for it); default: the device JAX runs on",
    )
    parser.add_argument(
        "--summary", action="store_true", help="print a summary table of the optimized HLO"
    )
    parser.add_argument(
        "--dump", metavar="DIR", type=Path, help="also write XLA's pass-by-pass HLO dump to DIR"
    )
    # Set on the --dump subprocess: XLA dumps only what it compiles, even for --stage stablehlo.
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import jax

    if args.dump is not None:
        if args.platform not in (None, jax.default_backend()):
            raise CliError(f"--dump compiles; this machine cannot compile for {args.platform}")
        return _run_with_dump(args)
    from einfuse.backends.inspection import hlo_text, inspect_hlo
    from einfuse.cli.args import load_function, one_line, parse_arg_specs

    specs = parse_arg_specs(args.args)
    fn = load_function(args.target)
    foreign = args.platform is not None and args.platform != jax.default_backend()
    if foreign and (args.summary or args.stage == "optimized" or args.compile):
        raise CliError(
            f"--platform {args.platform}: this machine cannot compile for it; "
            "give --stage stablehlo (no --summary)"
        )
    try:
        lowered = _lower(fn, specs, args.passes, args.backend, args.platform)
    except Exception as exc:
        if is_user_error(exc):  # already says what is wrong, maybe with a caret under it
            raise
        message = f"cannot trace {args.target} with --args {args.args!r}: {one_line(exc)}"
        raise CliError(message) from exc
    compiled = None
    if args.summary or args.stage == "optimized" or args.compile:
        try:
            compiled = lowered.compile()
        except Exception as exc:
            raise CliError(f"XLA cannot compile {args.target}: {one_line(exc)}") from exc
    if args.summary:
        print(inspect_hlo(compiled).table())
    else:
        text = hlo_text(lowered if args.stage == "stablehlo" else compiled, args.stage)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _lower(
    fn: Callable[..., Any],
    specs: Sequence[jax.ShapeDtypeStruct],
    passes: str | None = None,
    backend: str = "jax",
    platform: str | None = None,
) -> jax.stages.Lowered:
    """The one place that turns the user's function into a Lowered: through einfuse.jit."""
    from einfuse.frontend import jit

    platforms = None if platform is None else (platform,)
    return jit(fn, passes=passes or None, backend=backend).lower(
        *specs, lowering_platforms=platforms
    )


def _run_with_dump(args: argparse.Namespace) -> int:
    from einfuse.backends.inspection import xla_dump_flags

    directory = args.dump.resolve()
    try:
        flags = xla_dump_flags(str(directory))
        directory.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot dump to {str(args.dump)!r}: {exc}") from exc
    before = _files_under(directory)
    command = [sys.executable, "-m", "einfuse", "hlo", args.target, "--args", args.args]
    command += ["--passes", args.passes, "--stage", args.stage, "--compile"]
    command += ["--backend", args.backend]
    command += ["--summary"] if args.summary else []
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    child = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        prefix = "einfuse: error: "
        if child.returncode == 2 and prefix in child.stderr:  # the child's user error, relayed
            raise CliError(child.stderr.rpartition(prefix)[2].strip())
        last = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CliError(f"the dump run failed (exit {child.returncode}): {last}")
    sys.stdout.write(child.stdout)
    sys.stderr.write(child.stderr)
    written = sorted(p for p, stamp in _files_under(directory).items() if before.get(p) != stamp)
    if not written:
        raise CliError(f"XLA wrote no files to {directory}; does XLA_FLAGS override the dump?")
    optimized = [p for p in written if p.name.endswith("after_optimizations.txt")]
    print(f"einfuse: XLA wrote {len(written)} dump files to {directory}", file=sys.stderr)
    for path in optimized:
        print(f"einfuse: optimized HLO: {path}", file=sys.stderr)
    return 0


def _files_under(directory: Path) -> dict[Path, int]:
    """Files and their modification times: a rerun into the same DIR rewrites the same names."""
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}
