"""The overlap passes' reports by pass name, for ``explain``, ``passes --why`` and the tuner."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from einfuse.ir.cascade import Cascade

# In the order they compose: split-tokens first (reorder-norm leaves no single token rank)
OVERLAP_PASSES = ("split-tokens", "reorder-norm", "chunk-collective")
# Those that split one collective into several, which XLA's combiners would merge back.
SPLITTING_PASSES = ("split-tokens", "chunk-collective")


def with_report(name: str) -> Callable[..., Any]:
    """The ``*_with_report`` function of overlap pass ``name`` (it takes the pass's options)."""
    from einfuse.passes.chunk_collective import chunk_collective_with_report
    from einfuse.passes.reorder_norm import reorder_norm_with_report
    from einfuse.passes.split_tokens import split_tokens_with_report

    return {
        "reorder-norm": reorder_norm_with_report,
        "split-tokens": split_tokens_with_report,
        "chunk-collective": chunk_collective_with_report,
    }[name]


def overlap_explain(before: Cascade, name: str, options: Mapping[str, object]) -> str:
    """What overlap pass ``name`` did to ``before`` and why, one line per collective (run
    again: explain is not a hot path)."""
    return with_report(name)(before, **dict(options))[1].explain()
