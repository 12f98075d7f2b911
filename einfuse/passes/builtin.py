"""Importing this module registers every built-in pass with the pass manager."""

from einfuse.passes import partition  # noqa: F401
