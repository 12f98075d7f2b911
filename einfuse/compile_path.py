"""One compile path: how a region becomes what runs, for every front end alike.

``einfuse.jit``, ``einfuse.autotune`` (function and cascade forms), ``einfuse explain`` and
``einfuse hlo`` all go through these functions, so what the tuner prices and measures is the
program ``jit`` replays:

1. `canonicalize` (and `lift_canonical` / `trace_canonical` for JAX functions): a region's
   cascade with one name per axis (``unify-ranks``). Tuning keys, pipelines and Schedules
   are all about this canonical cascade.
2. `region_key`: the tuning key of a canonical cascade at its sizes.
3. `run_pipeline`: a pipeline run on the canonical cascade, with a Schedule that must name
   only its ranks and tensors (`ScheduleMismatch` otherwise, never a silent mis-application),
   and a one-line verdict per pass (`PassStep`) for ``explain``.

Backend-neutral: nothing here emits code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from einfuse.ir.cascade import Cascade
from einfuse.ir.errors import EinfuseError
from einfuse.ir.schedule import Schedule

if TYPE_CHECKING:
    from jax._src import core

    from einfuse.autotune.key import TuningKey
    from einfuse.cost_model.target import Target
    from einfuse.einsum_cascade.lift import Program, Region
    from einfuse.passes.manager import Steps

CANONICAL = "unify-ranks"


class ScheduleMismatch(EinfuseError):
    """A stored or given Schedule names ranks or tensors its cascade does not have."""


def canonicalize(cascade: Cascade) -> Cascade:
    """The canonical form every front end tunes and runs: one rank name per axis."""
    from einfuse.passes.manager import run_passes

    return run_passes(cascade, CANONICAL, check=False).cascade


def lift_canonical(closed: core.ClosedJaxpr, *, check: bool = True) -> Program:
    """Lift a closed jaxpr, every region canonicalized."""
    from einfuse.einsum_cascade.lift import lift

    program = lift(closed, check=check)
    return program.with_regions([r.with_cascade(canonicalize(r.cascade)) for r in program.regions])


def trace_canonical(fun: Callable[..., Any], args: Sequence[Any]) -> Program:
    """Trace ``fun`` at ``args`` (arrays or ``ShapeDtypeStruct``s) and lift it canonically."""
    import jax

    return lift_canonical(jax.make_jaxpr(fun)(*args))


def region_sizes(program: Program, region: Region) -> dict[str, int]:
    """Every rank's size of a region's cascade, from the traced shapes of its inputs."""
    from einfuse.backends.reference import infer_sizes

    shapes = {
        name: tuple(program.avals[value].shape)
        for name, value in zip(region.input_tensors, region.inputs)
    }
    if region.mesh is not None:  # a shard_map's arguments: device dims merged into the next
        from einfuse.backends.jax_shard import declared_shape

        c = region.cascade
        shapes = {
            k: declared_shape(c, k, v, lambda r: region.mesh.shape[c.device_axis(r)])
            for k, v in shapes.items()
        }
    return infer_sizes(region.cascade, shapes)


def region_key(
    cascade: Cascade, sizes: Mapping[str, int], target: Target, backend: str = "jax"
) -> TuningKey:
    """The tuning key of a canonical cascade at ``sizes`` on ``target``, emitted by ``backend``."""
    from einfuse.autotune.key import make_key

    return make_key(cascade, sizes, target, backend=backend)


@dataclass(frozen=True, slots=True)
class PassStep:
    """One pass of a pipeline run: its spec, the cascade before and after."""

    spec: str
    before: Cascade
    after: Cascade
    steps: Steps = ()  # the named rewrites the pass made on the way (fuse's four)

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def verdict(self) -> str:
        """``fuse: fused m (tile 512)`` or ``fuse: unchanged — <reason>``, for ``explain``."""
        from einfuse.passes.manager import parse_pipeline

        (spec,) = parse_pipeline(self.spec)
        if spec.name == "fuse":
            return _fuse_verdict(self.before, dict(spec.options), self.changed)
        from einfuse.passes.overlap_report import OVERLAP_PASSES, overlap_explain

        if spec.name in OVERLAP_PASSES:
            return overlap_explain(self.before, spec.name, dict(spec.options))
        return f"{self.spec}: {'changed' if self.changed else 'unchanged'}"


def _fuse_verdict(before: Cascade, options: dict[str, Any], changed: bool) -> str:
    """What ``fuse`` did, from its own report (run again: explain is not a hot path)."""
    from einfuse.passes.fuse import fuse_with_report

    _, report = fuse_with_report(before, **options)
    tile = options.get("tile", 512)
    fused = [r.rank for r in report.ranks if r.fused]
    if fused:
        return f"fuse: fused {', '.join(fused)} (tile {tile})"
    reasons = "; ".join(f"{r.rank}: {r.reason}" for r in report.ranks)
    reason = reasons or "no rank takes more than one pass"
    return f"fuse: {'changed' if changed else 'unchanged'} — {reason}"


@dataclass(frozen=True, slots=True)
class Compiled:
    """A canonical cascade after a pipeline, with the Schedule the backend will follow."""

    canonical: Cascade
    cascade: Cascade
    pipeline: str
    schedule: Schedule | None
    steps: tuple[PassStep, ...]

    def history(self) -> tuple[tuple[str, str], ...]:
        """``(pass, cascade text)`` after each pass, and after each rewrite inside one."""
        out: list[tuple[str, str]] = []
        for s in self.steps:
            out.extend((f"{s.spec}: {name}", str(c)) for name, c in s.steps)
            out.append((s.spec, str(s.after)))
        return tuple(out)


def run_pipeline(
    canonical: Cascade,
    pipeline: str | None,
    schedule: Schedule | None = None,
    *,
    check: bool = True,
) -> Compiled:
    """Run ``pipeline`` on a canonical cascade; ``schedule`` must fit the result."""
    from einfuse.passes.manager import run_passes

    steps: list[PassStep] = []
    cascade = canonical
    if pipeline:
        result = run_passes(canonical, pipeline, check=check)
        cascade = result.cascade
        pairs = itertools.pairwise(result.history)
        for ((_, before), (spec, after)), inner in zip(pairs, result.steps[1:], strict=True):
            steps.append(PassStep(spec, before, after, inner))
    if schedule is not None:
        check_schedule(schedule, canonical, cascade)
    return Compiled(canonical, cascade, pipeline or "", schedule, tuple(steps))


def check_schedule(schedule: Schedule, canonical: Cascade, after: Cascade) -> None:
    """Refuse a Schedule naming a rank or tensor neither the canonical cascade nor its
    transformed form has (a schedule tuned on another cascade would silently not apply)."""
    ranks = set(canonical.all_ranks()) | set(after.all_ranks())
    for c in (canonical, after):
        ranks |= {r for p in c.partitions for r in (p.rank, p.outer, p.inner)}
    named = [r for r, _ in schedule.tiles] + list(schedule.loop_order)
    named += [r for r, _ in schedule.parallel]
    unknown = sorted({r for r in named if r not in ranks})
    if unknown:
        raise ScheduleMismatch(
            f"schedule {str(schedule)!r} names rank(s) {', '.join(unknown)} that the cascade "
            f"does not have (its ranks: {', '.join(sorted(ranks))}); it was tuned on another "
            "cascade: tune again"
        )
    tensors = _tensors(canonical) | _tensors(after)
    missing = sorted({t for t, _ in schedule.placement if t not in tensors})
    if missing:
        raise ScheduleMismatch(
            f"schedule {str(schedule)!r} places tensor(s) {', '.join(missing)} that the "
            "cascade does not have; it was tuned on another cascade: tune again"
        )


def _tensors(c: Cascade) -> set[str]:
    return {t.name for t in c.inputs} | {e.output for e in c.einsums}
