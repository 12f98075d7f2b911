"""Scoring points with the cost model, thousands per second.

The model objective is too cheap to pay Optuna's per-trial bookkeeping (about 1 ms a trial
in memory, 30-200 ms in SQLite or a journal), so it runs here: each distinct pipeline is
applied once and gets one `CostModel`, then every point costs one ``estimate`` call. A space
no larger than the budget is swept exhaustively (the model's exact optimum); a larger one is
sampled at random (seeded) and then refined by steepest descent over one-param moves from the
best few. Only the results worth keeping go to the Optuna study (see `tuner`).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from einfuse.autotune.measure import describe_error
from einfuse.autotune.pallas_model import PallasPricer, Refused
from einfuse.autotune.space import Candidate, Point, SearchSpace
from einfuse.ir.cascade import Cascade, bind_sizes
from einfuse.ir.errors import EinfuseError


class ModelUnavailable(EinfuseError):
    """The cost model cannot be imported, so objectives that need it cannot run."""


def compute_dtype(cascade: Cascade) -> str | None:
    """The inputs' float dtype when they agree (the model prices that), else the default."""
    dtypes = {str(t.dtype) for t in cascade.inputs if "float" in str(t.dtype)}
    return dtypes.pop() if len(dtypes) == 1 else None


def program_cost_model(
    cascade: Cascade, target: object, sizes: Mapping[str, int], dtype: str | None = None
) -> Any:
    """The `CostModel` of the program the JAX backend emits for ``cascade``: priced in its
    inputs' dtype (or ``dtype``), with the blockwise loop's carry as wide as the loop runs it
    (where the target's vector unit has that dtype at all: not on FuseMax's 16-bit arrays)."""
    from einfuse.backends.jax_blockwise import carry_dtype
    from einfuse.cost_model.model import CostModel
    from einfuse.cost_model.target import canonical_dtype, get_target

    target = get_target(target) if isinstance(target, str) else target
    dtype = canonical_dtype(dtype) if dtype else compute_dtype(cascade)
    carry = None if dtype is None else carry_dtype(dtype).name
    if carry is not None and carry not in target.unit("vector").dtypes:  # type: ignore[attr-defined]
        carry = None
    return CostModel(cascade, target, sizes, dtype=dtype, carry_dtype=carry)


@dataclass(frozen=True, slots=True)
class Score:
    """A point's predicted seconds (inf when it does not fit or the model refused it)."""

    point: Point
    seconds: float
    reason: str = ""


class ModelEvaluator:
    """Predicted time of candidates: pipelines and cost models cached per pipeline."""

    def __init__(
        self, cascade: Cascade, target: object, sizes: Mapping[str, int], backend: str = "jax"
    ) -> None:
        try:
            import einfuse.cost_model.model  # noqa: F401
        except ImportError as exc:
            raise ModelUnavailable(
                f"the cost model (einfuse.cost_model.model) is not available: {exc}"
            ) from exc
        self.cascade = cascade
        self.target = target
        self.sizes = dict(sizes)
        # The Pallas backend's kernels are priced, and refused, as kernels of their own.
        self.pallas = PallasPricer(target, compute_dtype(cascade)) if backend == "pallas" else None
        self._models: dict[str, object | str] = {}
        self._by_cascade: dict[tuple[str, tuple[tuple[str, int], ...]], object] = {}
        self._overlap: dict[object, object] = {}  # overlap_space's cache

    def model(self, pipeline: str) -> object | str:
        """The `CostModel` of the cascade after ``pipeline``, or why there is none."""
        if pipeline not in self._models:
            from einfuse.autotune.overlap_space import overlap_model
            from einfuse.passes.manager import run_passes

            try:
                dtype = compute_dtype(self.cascade)
                args = (self.cascade, pipeline, self.sizes, self.target, dtype)
                overlap = overlap_model(*args, self._overlap)
                if overlap is not None:  # collectives: priced with the overlap passes' gains
                    self._models[pipeline] = overlap
                    return overlap
                transformed = run_passes(self.cascade, pipeline, check=False).cascade
                sizes = bind_sizes(transformed, self.sizes)
                same = (transformed.fingerprint(), tuple(sorted(sizes.items())))
                if same not in self._by_cascade:  # pipelines that change nothing share one
                    dtype = compute_dtype(self.cascade)
                    self._by_cascade[same] = program_cost_model(
                        transformed, self.target, sizes, dtype
                    )
                self._models[pipeline] = self._by_cascade[same]
            except Exception as exc:
                self._models[pipeline] = f"pipeline {pipeline!r}: {describe_error(exc)}"
        return self._models[pipeline]

    def estimate(self, candidate: Candidate) -> tuple[float, str]:
        model = self.model(candidate.pipeline)
        if isinstance(model, str):
            return math.inf, model
        try:
            kernels, without = self._kernels(candidate, model)
            seconds = kernels + float(model.estimate(candidate.schedule, without))  # type: ignore[attr-defined]
        except Refused as exc:
            return math.inf, f"does not fit: {exc}"
        except Exception as exc:
            return math.inf, f"cost model refused: {describe_error(exc)}"
        if not math.isfinite(seconds):
            return math.inf, self.why_not(candidate)
        return seconds, ""

    def _kernels(self, candidate: Candidate, model: Any) -> tuple[float, frozenset[str]]:
        """The backend's own kernels: their seconds and the cost-model kernels they replace."""
        if self.pallas is None:
            return 0.0, frozenset()
        return self.pallas.price(candidate.pipeline, model.cascade, model.sizes, candidate.schedule)

    def why_not(self, candidate: Candidate) -> str:
        """The model's reason a candidate scores infinity (does not fit, ...)."""
        model = self.model(candidate.pipeline)
        if isinstance(model, str):
            return model
        try:
            report = model.report(candidate.schedule)  # type: ignore[attr-defined]
        except Exception as exc:
            return f"cost model refused: {describe_error(exc)}"
        reason = getattr(report, "reason", "") or "predicted time is not finite"
        fits = getattr(report, "fits", True)
        return reason if fits else f"does not fit: {reason}"


@dataclass(frozen=True, slots=True)
class Screening:
    """Every scored point, best first, and how fast they were scored."""

    scores: tuple[Score, ...]
    seconds: float
    exhaustive: bool

    @property
    def evaluated(self) -> int:
        return len(self.scores)

    @property
    def rate(self) -> float:
        """Candidates per second, pipeline and model construction included."""
        return self.evaluated / self.seconds if self.seconds > 0 else math.inf


def screen(
    space: SearchSpace,
    evaluate: Callable[[Point], tuple[float, str]],
    budget: int,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
    share: tuple[int, int] | None = None,
) -> Screening:
    """Score up to ``budget`` points: all of them if the space is that small, else search.

    ``share=(i, N)``: worker ``i`` of ``N`` scores every N-th point of a space the budget
    covers, else ``budget / N`` points searched from its own seed (see `shares`).
    """
    scores: dict[Point, Score] = {}
    start = time.perf_counter()

    def score(point: Point) -> Score:
        if point not in scores:
            seconds, reason = evaluate(point)
            scores[point] = Score(point, seconds, reason)
            if on_progress is not None and len(scores) % 256 == 0:
                on_progress(len(scores))
        return scores[point]

    exhaustive = space.size() <= budget
    index, count = share or (0, 1)
    if exhaustive:
        for point in itertools.islice(space.points(), index, None, count):
            score(point)
    else:
        share_budget = -(-budget // count)
        _sample_then_descend(space, score, scores, share_budget, random.Random(seed + index))
    elapsed = time.perf_counter() - start
    if on_progress is not None:
        on_progress(len(scores))
    return Screening(rank_scores(space, scores.values()), elapsed, exhaustive)


def rank_scores(space: SearchSpace, scores: Iterable[Score]) -> tuple[Score, ...]:
    """Best first; equal times in a deterministic order (see ``_order_key``).

    The tie-break is computed only among equal times: thousands of scores sort in
    milliseconds, where a full key per score costs more than scoring them did.
    """
    default = space.default_point()
    ranked: list[Score] = []
    for _, group in itertools.groupby(sorted(scores, key=_seconds), key=_seconds):
        tied = list(group)
        if len(tied) > 1:
            tied.sort(key=lambda s: _order_key(space, s.point, default))
        ranked += tied
    return tuple(ranked)


def _seconds(score: Score) -> float:
    return score.seconds


def _sample_then_descend(
    space: SearchSpace,
    score: Callable[[Point], Score],
    scores: Mapping[Point, Score],
    budget: int,
    rng: random.Random,
) -> None:
    score(space.default_point())
    misses = 0
    while len(scores) < budget // 2 and misses < 1000:  # the first half: random points
        before = len(scores)
        score(space.random_point(rng))
        misses = misses + 1 if len(scores) == before else 0
    starts = sorted(scores.values(), key=lambda s: s.seconds)[:4]
    for start in starts:  # the second half: steepest descent from the best few
        current = start
        while len(scores) < budget:
            best = current
            for point in space.neighbors(current.point):
                if len(scores) >= budget:
                    break
                candidate = score(point)
                if candidate.seconds < best.seconds:
                    best = candidate
            if best is current:
                break
            current = best


def _order_key(space: SearchSpace, point: Point, default: Point) -> tuple[bool, float, str]:
    """Deterministic tie-break among equal scores: the default first, then smaller tiles."""
    return (point != default, tile_weight(space, point), repr(point))


def tile_weight(space: SearchSpace, point: Point) -> float:
    """Sum of log2 of the point's numeric tile-like choices: smaller means smaller tiles."""
    total = 0.0
    for name, value in point:
        kind = space.param(name).kind
        if kind in ("tile", "pass_option") and isinstance(value, int) and value > 0:
            total += math.log2(value)
    return total
