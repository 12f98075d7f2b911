"""The objectives: how a `Job` (one cascade, its space, store and study) gets its choice.

- ``model``: `screen` scores the space; the best few and the default become trials of the
  key's ``model`` study, and the best becomes its record.
- ``measure``: Optuna's TPE sampler proposes candidates of the params the backend reads,
  until the key's ``measured`` study holds ``trials`` of them (a top-up: what was measured
  before, by any process, is never measured again); then the final race decides.
- ``hybrid``: the model screens, the best ``trials`` distinct programs (always including the
  default) are measured, and the race decides; params the backend ignores keep the model's
  choice within the winning program.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from einfuse.autotune import shares
from einfuse.autotune.key import TuningKey
from einfuse.autotune.measure import Bench
from einfuse.autotune.measured import BATCH, WORKER, MeasuredSearch
from einfuse.autotune.result import TuneResult
from einfuse.autotune.screen import ModelEvaluator, Screening, screen
from einfuse.autotune.space import Point, SearchSpace, SpaceOptions
from einfuse.autotune.store import BEST_ATTR, RACE_ATTR, BestRecord, TuningStore
from einfuse.backends.backend import Backend
from einfuse.ir.cascade import Cascade
from einfuse.ir.errors import EinfuseError

if TYPE_CHECKING:
    from einfuse.cost_model.target import Target

DEFAULT_MODEL_TRIALS = 20_000
DEFAULT_MEASURED_TRIALS = 8
MODEL_TRIALS_KEPT = 16


class TuningError(EinfuseError):
    """Tuning could not produce a valid choice (every candidate failed): lists the reasons."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The options of one `autotune` call (see its docstring)."""

    objective: str
    trials: int | None
    timeout: float | None
    study: str | None
    progress: bool
    seed: int
    space_options: SpaceOptions | None
    backend: Backend
    warmup: int
    repeats: int
    finalists: int | None
    model_trials: int
    compile_timeout: float
    fresh: bool | datetime  # a datetime: trials started before it are not this run's
    worker: tuple[int, int] | None = None  # this process's share (`shares`)
    workers: int = 1  # >1 with no worker: decide from the workers' trials


def _progress_bar(total: int, enabled: bool, label: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=label, unit="cand", leave=False)


@dataclass
class Job:
    """One cascade being tuned: everything the objectives share."""

    cascade: Cascade
    sizes: dict[str, int]
    target: Target
    key: TuningKey
    space: SearchSpace
    store: TuningStore
    study: Any
    settings: Settings
    evaluator: ModelEvaluator | None

    def predict(self, point: Point) -> float | None:
        if self.evaluator is None:
            return None
        seconds, _ = self.evaluator.estimate(self.space.candidate(point))
        return seconds if math.isfinite(seconds) else None

    def result(self, record: BestRecord, *, reused: bool, **counts: Any) -> TuneResult:
        point = self.space.point(record.params)
        default = self.space.candidate(self.space.default_point())
        race: list[dict[str, Any]] = []
        if record.objective != "model":
            with self.store.guard():
                race = list(self.study.user_attrs.get(RACE_ATTR, ()))
        return TuneResult(
            key=self.key,
            objective=record.objective,
            pipeline=record.pipeline,
            schedule=self.space.candidate(point).schedule,
            params=dict(record.params),
            predicted_s=record.predicted_s,
            measured_s=record.measured_s,
            default_pipeline=default.pipeline,
            default_schedule=default.schedule,
            default_predicted_s=self.predict(self.space.default_point())
            if record.objective != "model"
            else record.default_s,
            default_measured_s=record.default_s if record.objective != "model" else None,
            trials_done=counts.get("trials", 0),
            trials_failed=counts.get("failed", 0),
            measurements=counts.get("measurements", 0),
            reused=reused,
            space_size=self.space.size(),
            study=self.study,
            failures=tuple(counts.get("failures", ())),
            candidates_per_s=counts.get("rate"),
            race=tuple(race),
            hlo=record.hlo,
            cascade=self.cascade,
            sizes=dict(self.sizes),
        )


# --------------------------------------------------------------------------- model
def tune_model(job: Job) -> TuneResult:
    space, study, store = job.space, job.study, job.store
    budget = job.settings.trials or DEFAULT_MODEL_TRIALS
    with store.guard():
        attrs = study.user_attrs
    stored = attrs.get(BEST_ATTR)
    same_space = attrs.get("space_digest") == space.digest()
    done = attrs.get("evaluated", 0) >= min(budget, space.size())
    worker = job.settings.worker
    if worker is None and job.settings.workers > 1:  # after the workers: decide
        return shares.finish_model(job, job.settings.workers)
    if stored is not None and same_space and done and not job.settings.fresh:
        return job.result(BestRecord.from_dict(stored), reused=True)
    screening = _screen(job, budget, "model", worker)
    best = screening.scores[0]
    if not math.isfinite(best.seconds):
        raise TuningError(f"the cost model refused every candidate; the best: {best.reason}")
    default_point = space.default_point()
    default = next((x for x in screening.scores if x.point == default_point), None)
    with store.guard():
        _store_model_trials(study, space, screening.scores, default_point)
        study.set_user_attr("space_digest", space.digest())
        evaluated = "evaluated" if worker is None else shares.evaluated_attr(worker)
        study.set_user_attr(evaluated, screening.evaluated)
        study.set_user_attr("candidates_per_s", screening.rate)
    record = model_record(job, best, default)
    if worker is None:  # a worker's best is its own: the deciding process stores the study's
        store.save_best(study, record)
    failed = [x for x in screening.scores if not math.isfinite(x.seconds)]
    return job.result(
        record,
        reused=False,
        trials=screening.evaluated,
        failed=len(failed),
        failures=[(space.candidate(x.point).key, x.reason) for x in failed[:10]],
        rate=screening.rate,
    )


def _screen(job: Job, budget: int, label: str, share: shares.Worker | None = None) -> Screening:
    space, evaluator = job.space, job.evaluator
    assert evaluator is not None
    bar = _progress_bar(min(budget, space.size()), job.settings.progress, label)
    with bar:
        return screen(
            space,
            lambda point: evaluator.estimate(space.candidate(point)),
            budget,
            job.settings.seed,
            lambda n: bar.update(n - bar.n),
            share,
        )


def _store_model_trials(study: Any, space: SearchSpace, scores: Any, default: Point) -> None:
    """Keep the best few and the default as trials (for plots, importances, inspection)."""
    from optuna.trial import TrialState, create_trial

    keep = list(scores[:MODEL_TRIALS_KEPT])
    keep += [x for x in scores if x.point == default and x not in keep]
    trials = []
    for x in keep:
        finite = math.isfinite(x.seconds)
        trials.append(
            create_trial(
                state=TrialState.COMPLETE if finite else TrialState.FAIL,
                value=x.seconds if finite else None,
                params=dict(x.point),
                distributions=space.distributions(x.point),
                user_attrs={
                    "candidate": space.candidate(x.point).key,
                    "objective": "model",
                    "reason": x.reason,
                    "worker": WORKER,
                },
            )
        )
    study.add_trials(trials)


# --------------------------------------------------------------------------- measured
def tune_measured(job: Job) -> TuneResult:
    import optuna

    s, store, study = job.settings, job.store, job.study
    _check_measurable(job.target)
    trials = s.trials or DEFAULT_MEASURED_TRIALS
    index = s.worker[0] if s.worker else 0
    study.sampler = optuna.samplers.TPESampler(seed=s.seed + index, constant_liar=True)
    bench = Bench(
        job.cascade,
        job.sizes,
        backend=s.backend,
        seed=s.seed,
        compile_timeout_s=s.compile_timeout,
    )
    bar = _progress_bar(trials, s.progress, s.objective)  # an upper bound: a top-up
    search = MeasuredSearch(
        study,
        job.space,
        bench,
        warmup=s.warmup,
        repeats=s.repeats,
        seed=s.seed,
        deadline=None if s.timeout is None else time.monotonic() + s.timeout,
        on_trial=lambda: bar.update(1),
        fresh=s.fresh,
        heartbeat=store.heartbeat,
        lock=store.lock,
    )
    model_points: dict[str, Point] = {}
    with store.guard(), bar:
        if s.objective == "hybrid":
            model_points = _hybrid_round(job, search, trials)
        else:
            search.top_up(trials, s.worker)
        if s.worker is not None:  # the deciding process races, on one device
            counts = dict(trials=search.tally.trials, failed=search.tally.failed)
            counts.update(measurements=search.tally.measurements, failures=search.tally.failures)
            return shares.share_result(job, search.finalists(1), counts)
        stored = study.user_attrs.get(BEST_ATTR)
        reuse = s.workers == 1  # after workers, what they measured races
        if search.tally.trials == 0 and stored is not None and not s.fresh and reuse:
            return job.result(BestRecord.from_dict(stored), reused=True)
        race = search.race(search.finalists(s.finalists))
    if race is None:
        reasons = "; ".join(f"{k}: {r}" for k, r in search.tally.failures[:5]) or "none measured"
        raise TuningError(f"no candidate compiled and passed the numeric check ({reasons})")
    point = model_points.get(race.winner) or race.points[race.winner]
    default_timing = race.timings.get(search.default.key)
    candidate = job.space.candidate(point)
    record = BestRecord(
        key=job.key,
        pipeline=candidate.pipeline,
        schedule=str(candidate.schedule),
        params=dict(point),
        objective=s.objective,
        predicted_s=job.predict(point),
        measured_s=race.timings[race.winner].median,
        default_s=default_timing.median if default_timing else None,
        hlo=race.hlo.get(race.winner),
    )
    with store.guard():
        study.set_user_attr(RACE_ATTR, race.rows(search.racers))
    store.save_best(study, record)
    tally = search.tally
    return job.result(
        record,
        reused=False,
        trials=tally.trials,
        failed=tally.failed,
        measurements=tally.measurements,
        failures=tally.failures,
    )


def _check_measurable(target: Target) -> None:
    """Measuring times this machine, so the target must be what JAX runs on here."""
    import jax

    platform = jax.default_backend()
    if target.device_kind != platform:
        raise EinfuseError(
            f"objective measure/hybrid times programs on this machine (JAX platform "
            f"{platform}), but target {target.name!r} is a {target.device_kind}: results would "
            "be stored under the wrong device. Use --objective model for other targets."
        )


def _hybrid_round(job: Job, search: MeasuredSearch, trials: int) -> dict[str, Point]:
    """Screen with the model, then measure the best ``trials`` distinct programs it found.

    Returns, per measured program, the best model point that compiles to it: params the
    backend ignores (placement, loop order) keep the model's choice.
    """
    screening = _screen(job, job.settings.model_trials, "screen")
    if not math.isfinite(screening.scores[0].seconds):  # measuring the default alone is no search
        raise TuningError(
            "objective hybrid: the cost model refused every candidate, so it cannot screen "
            f"(the best: {screening.scores[0].reason}); use objective measure"
        )
    best_point: dict[str, Point] = {}
    for scored in screening.scores:
        if not math.isfinite(scored.seconds):
            continue
        key = search.candidate(search.searched_point(scored.point)).key
        best_point.setdefault(key, scored.point)
    ordered = [search.default.key, *(k for k in best_point if k != search.default.key)]
    known = search.known()
    # dealt before dropping what is known: a share must not shift as others finish theirs
    todo = [k for k in shares.dealt(ordered[:trials], job.settings.worker) if k not in known]
    for start in range(0, len(todo), BATCH):
        if search.expired():
            break
        batch = []
        for key in todo[start : start + BATCH]:
            point = best_point.get(key) or job.space.default_point()
            batch.append((None, search.candidate(search.searched_point(point))))
        search.measure(batch)
    return best_point


def model_record(job: Job, best: Any, default: Any) -> BestRecord:
    """The stored choice of a model search: ``best``'s program, priced against the default's."""
    candidate = job.space.candidate(best.point)
    return BestRecord(
        key=job.key,
        pipeline=candidate.pipeline,
        schedule=str(candidate.schedule),
        params=dict(best.point),
        objective="model",
        predicted_s=best.seconds,
        default_s=default.seconds if default and math.isfinite(default.seconds) else None,
    )
