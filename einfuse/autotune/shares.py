"""Several workers on one study: each takes a share, one of them decides.

``einfuse autotune --workers N`` runs N workers on one study (`autotune`'s ``worker=(i, N)``:
itself as worker 0, N-1 processes started); the same command started on several machines
against one database URL cooperates the same way. A worker never records the study's
choice; afterwards one process (``workers=N``) does, from what all of them stored:

- model: worker ``i`` scores every N-th point of a space the budget covers, or samples its
  ``1/N`` of the budget with its own seed; the deciding process ranks all stored model
  trials (`finish_model`).
- measure: each worker's TPE (own seed) tops the study up to exactly ``trials``
  candidates, claiming them one at a time under the study's lock
  (`MeasuredSearch.top_up`); a candidate another worker is measuring right now is skipped
  (`claimed_elsewhere`), one finished before is never measured again; the deciding process
  races the finalists on its one device, as a single process would.
- hybrid: the model's ordered list of programs to measure is dealt out round-robin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from einfuse.autotune.screen import Score, rank_scores
from einfuse.autotune.store import BestRecord

if TYPE_CHECKING:
    from einfuse.autotune.objectives import Job
    from einfuse.autotune.result import TuneResult

Worker = tuple[int, int]  # (index, count)
_T = TypeVar("_T")


def check_worker(worker: Worker | None) -> None:
    from einfuse.ir.errors import EinfuseError

    if worker is not None and not (worker[1] >= 1 and 0 <= worker[0] < worker[1]):
        raise EinfuseError(f"worker {worker[0]}/{worker[1]}: need 0 <= index < count")


def dealt(items: Sequence[_T], worker: Worker | None) -> list[_T]:
    """Worker ``i`` of ``N``'s round-robin share of ``items`` (all of them alone)."""
    if worker is None:
        return list(items)
    return list(items[worker[0] :: worker[1]])


def evaluated_attr(worker: Worker) -> str:
    return f"evaluated_{worker[0]}_of_{worker[1]}"


def claimed_elsewhere(
    study: Any, trial: Any, key: str, current: Callable[[Any], bool] = lambda t: True
) -> Any:
    """Claim ``key`` for ``trial``; the trial that has it already, if any, else None.

    That is a ``current`` finished trial (of this run, with ``--fresh``), or a running one:
    claims are made one at a time under the study's lock (`store_locks`), so a running trial
    with the key claimed it first. Trials of dead workers and duplicates don't count.
    """
    from optuna.trial import TrialState

    trial.set_user_attr("candidate", key)
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or other.user_attrs.get("candidate") != key:
            continue
        if "duplicate_of" in other.user_attrs or other.state == TrialState.WAITING:
            continue
        if other.state == TrialState.RUNNING:
            return other
        died = other.state == TrialState.FAIL and "reason" not in other.user_attrs
        if current(other) and not died:
            return other
    return None


def finish_model(job: Job, workers: int) -> TuneResult:
    """The model's choice from every worker's stored trials (the best, ties as `screen`)."""
    from optuna.trial import TrialState

    from einfuse.autotune.objectives import model_record

    space, study, store = job.space, job.study, job.store
    with store.guard():
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        attrs = study.user_attrs
    scores = [
        Score(space.point(t.params), t.value)
        for t in trials
        if t.user_attrs.get("objective") == "model" and t.value is not None
    ]
    if not scores:
        from einfuse.autotune.objectives import TuningError

        raise TuningError(f"no worker stored a model trial in study {study.study_name!r}")
    ranked = rank_scores(space, scores)
    best, default_point = ranked[0], space.default_point()
    default = next((s for s in ranked if s.point == default_point), None)
    evaluated = sum(attrs.get(evaluated_attr((i, workers)), 0) for i in range(workers))
    record = model_record(job, best, default)
    with store.guard():
        study.set_user_attr("space_digest", space.digest())
        study.set_user_attr("evaluated", evaluated)
    store.save_best(study, record)
    return job.result(record, reused=False, trials=evaluated)


def share_result(job: Job, finalists: list[tuple[str, Any]], counts: dict[str, Any]) -> TuneResult:
    """A measuring worker's report: its best by ratio to the default, not stored, no race."""
    point = finalists[0][1] if finalists else job.space.default_point()
    candidate = job.space.candidate(job.space.point(dict(point)))
    record = BestRecord(
        key=job.key,
        pipeline=candidate.pipeline,
        schedule=str(candidate.schedule),
        params=dict(candidate.point),
        objective=job.settings.objective,
    )
    return job.result(record, reused=False, **counts)
