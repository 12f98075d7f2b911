"""Loading a spec file for a command, with file errors as one-line CLI errors."""

from __future__ import annotations

from pathlib import Path

from einfuse.cli.errors import CliError


def load_spec(path: str):  # -> Cascade (kept untyped so the CLI imports no IR at start-up)
    p = Path(path)
    if not p.is_file():
        raise CliError(f"no such spec file: {path}")
    try:
        from einfuse.ir.yaml_spec import load
    except ImportError:  # the YAML loader is optional; plain text specs need only the parser
        from einfuse.ir import parse

        return parse(p.read_text(), file=str(p))
    return load(str(p))
