"""Aligned text and Markdown tables, for benchmark scripts and the autotuner's reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _format_cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if fmt is not None:
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    formats: Mapping[str, str] | None = None,
    markdown: bool = False,
) -> str:
    """Aligned text table (or a Markdown table) of ``rows``, one column per key in ``columns``.

    Numbers are right-aligned, text left-aligned; a missing or None value prints as ``-``;
    ``formats`` maps a column to a format spec such as ``".3f"``.
    """
    formats = formats or {}
    cells = [[_format_cell(row.get(col), formats.get(col)) for col in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(col), int | float) or row.get(col) is None for row in rows)
        for col in columns
    ]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    if markdown:
        dashes = ["-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric)]
        rule = "|" + "|".join(dashes) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(columns)), rule, *(line(r) for r in cells)])
