"""The overlap passes in the autotuner: their params, and their price in the model objective.

For a cascade with device ranks and a reduction over one (an all-reduce or reduce-scatter),
on a target whose collectives run asynchronously, the ``overlap`` provider offers each
overlap pass that is legal there (its report applies with no cost model asked) and that the
model can price, in the order they compose (``OVERLAP_PASSES``; the pipeline lists them so):

* ``split-tokens`` on/off and ``split-tokens.offset`` (the cost model's offset, 0, and 64
  tokens either side of it);
* ``reorder-norm`` on/off;
* ``chunk-collective`` on/off, ``chunk-collective.chunks`` (1, 2, 4, 8, 16 and the model's
  pick) and ``chunk-collective.bidirectional``.

Defaults are what the cost model picks (``einfuse.cost_model.overlap_choice``): a pass that
does not pay is off by default. The model objective prices a candidate as the program's
compute per device (the `CostModel` of the cascade after the pipeline's other passes, device
ranks at size 1), plus every all-reduce / reduce-scatter run serially, minus what each overlap
pass of the pipeline saves where its report says it applied (``chunk_gain`` at the given
chunk count, ``split_gain`` at the given offset, ``reorder_norm_gain``), each priced on the
cascade the pass was given. The savings add up: an approximation where passes combine. A
rewrite the model says does not pay (below ``MIN_GAIN``) costs one launch, so the search
leaves it off rather than breaking a tie at random.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from einfuse.autotune.space import Param, SpaceContext, register_space
from einfuse.ir.cascade import Cascade, bind_sizes
from einfuse.ir.errors import EinfuseError
from einfuse.passes.overlap_report import OVERLAP_PASSES, with_report

CHUNKS = (1, 2, 4, 8, 16)
NARROWED = "read only at its own shards"  # reorder-norm's reduce-scatter with no gather


def _reductions(c: Cascade, *kinds: str) -> list[str]:
    """The collectives that sum over devices (of ``kinds`` when given)."""
    from einfuse.ir.devices import collectives

    kinds = kinds or ("all_reduce", "reduce_scatter")
    return [m.einsum for m in collectives(c) if m.kind in kinds]


def bound(cascade: Cascade, sizes: dict[str, int]) -> Cascade:
    """The cascade with every rank's size an integer (the passes need concrete counts)."""
    ranks = set(cascade.all_ranks())
    return cascade.with_sizes(**{r: n for r, n in sizes.items() if r in ranks})


def _interconnect(target: Any) -> Any:
    from einfuse.cost_model.overlap_choice import as_target

    return as_target(target).interconnect


def priced(target: Any) -> bool:
    """Whether overlap can pay on ``target``: its devices run collectives asynchronously
    (XLA:CPU does not: nothing to search there, every overlap pass would cost launches)."""
    interconnect = _interconnect(target)
    return interconnect is not None and bool(interconnect.asynchronous)


@register_space("overlap")
def overlap_params(ctx: SpaceContext) -> Sequence[Param]:
    """The overlap passes legal on this cascade and priced by the model, in the order they
    compose (split-tokens, reorder-norm, chunk-collective); each default is the model's
    choice on the cascade the earlier passes' defaults make."""
    if not ctx.cascade.devices or not priced(ctx.target) or not _reductions(ctx.cascade):
        return ()
    from einfuse.cost_model import overlap_choice as oc

    first = cur = bound(ctx.cascade, dict(ctx.sizes))
    split, reorder, chunk = (with_report(n) for n in OVERLAP_PASSES)
    params: list[Param] = []
    report = split(first, 0)[1]
    rank = report.decisions[0].target
    if report.applied and _prices(oc.layer_shape, first, [rank]):
        offset, _ = oc.offset_for(ctx.target)(first, rank)
        params.append(_toggle("split-tokens", offset is not None))
        best = int(offset or 0)  # type: ignore[call-overload]
        choices = tuple(sorted({0, best, best - 64, best + 64}))
        params.append(_option("split-tokens", "offset", choices, best))
        if offset is not None:
            cur = split(cur, best)[0]
    if _legal(reorder, first, cur) and _prices(oc.norm_shape, cur, _reductions(cur)):
        pays = oc.pays_for(ctx.target)
        on = any(pays(cur, name)[0] for name in _reductions(cur, "all_reduce"))
        params.append(_toggle("reorder-norm", on))
        if on:
            cur = reorder(cur, pays)[0]
    if _legal(chunk, first, cur) and _prices(oc.collective_shape, cur, _reductions(cur)):
        choose = oc.chunks_for(ctx.target)
        picks = [n for name in _reductions(cur) if (n := choose(cur, name)[0]) is not None]
        best = int(max(picks)) if picks else 1  # type: ignore[call-overload]
        params.append(_toggle("chunk-collective", bool(picks)))
        params.append(_option("chunk-collective", "chunks", tuple(sorted({*CHUNKS, best})), best))
        params.append(_option("chunk-collective", "bidirectional", (False, True), False))
    return params


def _legal(report: Callable[..., Any], *cascades: Cascade) -> bool:
    """Whether the pass applies (its defaults, no cost model asked) to one of ``cascades``."""
    return any(report(c)[1].applied for c in cascades)


def _prices(shape: Callable[[Cascade, str], object], c: Cascade, names: list[str]) -> bool:
    """Whether the model can read the shape it prices off one of ``names``."""
    for name in names:
        try:
            shape(c, name)
            return True
        except EinfuseError:
            continue
    return False


def _toggle(name: str, on: bool) -> Param:
    return Param(name, "pass", name, (True, False), on)


def _option(name: str, option: str, choices: tuple, default: Any) -> Param:
    return Param(f"{name}.{option}", "pass_option", name, choices, default, option=option,
                 when=(name, True))  # fmt: skip


# --------------------------------------------------------------------------- pricing
class OverlapPriced:
    """A `CostModel` of the per-device compute plus the collectives' time after overlap."""

    def __init__(self, compute: Any, comm_s: float, notes: tuple[str, ...]) -> None:
        self.compute = compute
        self.comm_s = comm_s
        self.notes = notes

    def estimate(self, schedule: object = None, without: frozenset[str] = frozenset()) -> float:
        """A schedule that tiles nothing (a space of the overlap passes alone) is priced at
        the model's default tiles, which fit the target, as untuned code runs."""
        if schedule is not None and not getattr(schedule, "tiles", True):
            schedule = None
        return float(self.compute.estimate(schedule, without)) + self.comm_s

    def __getattr__(self, name: str) -> Any:  # report, cascade, sizes: the compute's
        return getattr(self.compute, name)


def overlap_model(
    cascade: Cascade,
    pipeline: str,
    sizes: dict[str, int],
    target: Any,
    dtype: str | None,
    cache: dict[Any, Any] | None = None,
) -> OverlapPriced | None:
    """The model objective's price of ``pipeline`` on a cascade with collectives (on a target
    that runs them), or None where the cascade has none: the plain model.
    ``cache`` (one per evaluator) keeps compute models per other-passes pipeline and
    collective times per overlap pipeline."""
    if not cascade.devices or _interconnect(target) is None or not _reductions(cascade):
        return None
    from einfuse.autotune.screen import program_cost_model
    from einfuse.passes.manager import parse_pipeline, run_passes

    cache = {} if cache is None else cache
    specs = parse_pipeline(pipeline) if pipeline else []
    rest = ",".join(str(s) for s in specs if s.name not in OVERLAP_PASSES)
    overlap = ",".join(str(s) for s in specs if s.name in OVERLAP_PASSES)
    if ("comm", overlap) not in cache:
        chosen = [s for s in specs if s.name in OVERLAP_PASSES]
        cache["comm", overlap] = overlap_comm_s(bound(cascade, sizes), chosen, target, cache)
    if ("compute", rest) not in cache:
        compute = run_passes(cascade, rest, check=False).cascade if rest else cascade
        one = {r: 1 for r, _ in compute.devices}
        per_device = compute.with_sizes(**one)
        cache["compute", rest] = program_cost_model(
            per_device, target, bind_sizes(per_device, {**sizes, **one}), dtype
        )
    comm, notes = cache["comm", overlap]
    return OverlapPriced(cache["compute", rest], comm, notes)


def overlap_comm_s(
    c: Cascade, specs: list[Any], target: Any, cache: dict[Any, Any] | None = None
) -> tuple[float, tuple[str, ...]]:
    """Collective seconds left after the overlap passes ``specs``, and each pass's verdicts
    (``cache`` keeps every prefix of the passes: pipelines share their first rewrites)."""
    from einfuse.cost_model.overlap_choice import serial_comm_s
    from einfuse.passes.overlap_common import cost_target

    cache = {} if cache is None else cache
    key: tuple[str, ...] = ()
    if ("prefix", key) not in cache:
        cache["prefix", key] = (c, serial_comm_s(c, target), ())
    for k, spec in enumerate(specs):
        before, total, notes = cache["prefix", key]
        key = (*key, str(spec))
        if ("prefix", key) in cache:
            continue
        options = dict(spec.options)
        if spec.name == "chunk-collective" and k == len(specs) - 1:
            options["plan_only"] = True  # last: its decisions are priced, its ring unused
        with cost_target(target):
            after, report = with_report(spec.name)(before, **options)
        for d in report.decisions:
            if d.applied:
                narrowed = d.reason.startswith(NARROWED)
                opts = {**dict(spec.options), "narrowed": narrowed}
                total -= _saving(before, spec.name, d.target, opts, target)
        cache["prefix", key] = (after, total, (*notes, report.explain()))
    _, total, notes = cache["prefix", key]
    return max(total, 0.0), notes


def _saving(c: Cascade, name: str, what: str, options: dict[str, Any], target: Any) -> float:
    """What one applied rewrite saves; one that does not pay (the model's verdict: below its
    ``MIN_GAIN``, or a shape it cannot price) costs a launch, so the search leaves it off."""
    from einfuse.cost_model import overlap_choice as oc
    from einfuse.cost_model.overlap import launch_s

    try:
        saved = oc.saving_s(c, name, what, options, target)
    except EinfuseError:  # a shape the model does not price (no producer matmul, ...)
        saved = None
    return -launch_s(oc.as_target(target)) if saved is None else saved
