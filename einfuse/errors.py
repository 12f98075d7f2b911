"""The base of every user-facing error, importable without loading the IR or jax."""


class EinfuseError(Exception):
    """An error caused by the user's input; the CLI prints these without a traceback."""
