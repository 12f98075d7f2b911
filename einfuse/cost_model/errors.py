"""The cost model's error: a schedule or request it cannot price."""

from __future__ import annotations

from einfuse.errors import EinfuseError


class CostModelError(EinfuseError, ValueError):
    """A schedule or request the cost model cannot price (unknown level, unit, rank, ...)."""
