"""What ``explain`` says about token pruning: how many tokens each layer kept, and which.

A pruned program (``prune-tokens``) holds one top-k op per pruning point, named
``prune_tokens_layer<i>_keep<k>``; its second output is the original positions of the kept
tokens (``[batch, kept]``, or ``[kept]`` for a causal model, the same for every row). The
counts are static; which tokens a call pruned needs the call's values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from einfuse.einsum_cascade.lift import Opaque, Program
from einfuse.passes.prune_heads import OP_PREFIX as HEAD_PREFIX
from einfuse.passes.prune_tokens import OP_PREFIX

ROWS_SHOWN = 4


@dataclass(frozen=True, slots=True)
class PruningPoint:
    layer: int
    before: int  # tokens per row entering the op
    kept: int
    positions: int  # value id of the kept tokens' original positions [batch, kept]


def pruning_points(program: Program, prefix: str = OP_PREFIX) -> list[PruningPoint]:
    """The top-k ops of prune-tokens (or, with ``prefix``, prune-heads), in order."""
    out = []
    for seg in program.segments:
        name = seg.eqn.params.get("name", "") if isinstance(seg, Opaque) else ""
        if not str(name).startswith(prefix):
            continue
        layer = int(str(name)[len(prefix) :].split("_")[0])
        acc, pos = seg.eqn.outvars[0], seg.eqn.outvars[1]
        before = program.avals[seg.eqn.invars[0]].shape[-1]  # type: ignore[index]
        kept = program.avals[acc].shape[-1]  # type: ignore[index]
        out.append(PruningPoint(layer, before, kept, pos))  # type: ignore[arg-type]
    return out


def kept_positions(
    points: Sequence[PruningPoint], environment: Callable[..., Mapping[int, Any]], args: Sequence
) -> list[np.ndarray]:
    """Per pruning point, the original positions each row kept, for these arguments."""
    import jax

    ids = [p.positions for p in points]
    values = jax.jit(lambda *xs: [environment(*xs)[v] for v in ids])(*args)
    return [np.asarray(v) for v in values]


def _counts(points: Sequence[PruningPoint]) -> str:
    return ", ".join(f"layer {p.layer} keeps {p.kept} of {p.before}" for p in points)


def describe_pruning(
    points: Sequence[PruningPoint], kept: Sequence[np.ndarray] | None = None
) -> list[str]:
    """``explain``'s lines: per token pruning point the counts, and with ``kept`` which tokens
    went."""
    if not points:
        return []
    lines = [f"token pruning (tokens per row after each layer's attention): {_counts(points)}"]
    if kept is None:
        return [*lines, "  (call explain with arrays, not shapes, to see which tokens went)"]
    before = [set(range(points[0].before))] * ROWS_SHOWN
    for p, positions in zip(points, kept):
        if positions.ndim == 1:  # causal models: the same tokens for every row
            lines.append(
                f"  pruned by layer {p.layer} (every row): "
                f"{sorted(before[0] - set(positions.tolist()))}"
            )
            before = [set(positions.tolist())] * ROWS_SHOWN
            continue
        rows = []
        for b, row in enumerate(positions[:ROWS_SHOWN]):
            rows.append(f"row {b}: {sorted(before[b] - set(row.tolist()))}")
            before[b] = set(row.tolist())
        more = (
            f" (first {ROWS_SHOWN} of {len(positions)} rows)" if len(positions) > ROWS_SHOWN else ""
        )
        lines.append(f"  pruned by layer {p.layer}{more}: " + "; ".join(rows))
    return lines


def pruning_lines(
    program: Program, environment: Callable[..., Mapping[int, Any]], leaves: Sequence[Any]
) -> str:
    """``explain``'s pruning section: which tokens this call pruned (with arrays for
    arguments), or the counts alone (with shapes)."""
    import jax
    from jax._src import core

    points = pruning_points(program)
    heads = pruning_points(program, HEAD_PREFIX)
    if not points and not heads:
        return ""
    concrete = all(not isinstance(x, jax.ShapeDtypeStruct | core.Tracer) for x in leaves)
    kept = kept_positions(points, environment, leaves) if concrete and points else None
    lines = describe_pruning(points, kept)
    if heads:
        lines.append(f"head pruning (heads after each layer's attention): {_counts(heads)}")
        if concrete:
            for p, which in zip(heads, kept_positions(heads, environment, leaves)):
                lines.append(f"  heads kept by layer {p.layer}: {which.tolist()}")
    return "\n" + "\n".join(lines) + "\n"
