"""The CLI's notion of a user error: printed as `einfuse: error: ...`, exit code 2, no traceback."""

from __future__ import annotations


class CliError(Exception):
    """Bad user input to a command (a path, a function name, an --args spec)."""


def is_user_error(exc: BaseException) -> bool:
    """CliError, or the library's EinfuseError (bad specs, pipelines, partitions, ...).

    The library's error module is imported only here, when something has already gone wrong,
    so that `einfuse --help` does not pay for importing the IR.
    """
    from einfuse.errors import EinfuseError

    return isinstance(exc, CliError | EinfuseError)
