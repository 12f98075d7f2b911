"""Measured search: candidates compiled, checked and timed, every outcome an Optuna trial.

Only the params the backend reads are searched here (a loop order XLA ignores would only
re-time the same program), so the measured study's trials hold those params, whichever
objective (``measure`` or ``hybrid``) asked for them. Each trial records its candidate's key,
so a candidate measured before, by this process or another, is never measured again.

Timing is relative: each batch of candidates is timed interleaved with the default (the
*anchor*), so drift of a shared machine between batches cancels out of ``anchor_ratio``.
Times from different batches are not comparable, so they never decide: the winner is the
fastest of a final race in which every measured candidate (or the best ``finalists`` of
them) and the default are timed together, interleaved; its medians are what the result
reports for the chosen and the default candidate. A winner that looks suspiciously fast is
raced again, and candidates within `MIN_TIE` of the fastest are tied, the tie going to the
default, then to the smaller tiles.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from einfuse.autotune.measure import Bench, Failure, Prepared, consumed
from einfuse.autotune.screen import tile_weight
from einfuse.autotune.space import Candidate, Point, SearchSpace
from einfuse.autotune.store_locks import StudyLock
from einfuse.autotune.store_server import WORKER, Heartbeat, ask_quietly, fail_stale
from einfuse.autotune.timing import Timing

ANCHOR = "<default>"
MIN_TIE = 0.03  # candidates within 3% of the fastest are tied (the tie goes to the default)
SUSPICIOUS_GAIN = 0.75  # a winner racing 25% faster than it measured is raced again
BATCH = 4  # candidates timed together, interleaved with the anchor


@dataclass
class Tally:
    """What this call did: trials made, measurements taken, failures and their reasons."""

    trials: int = 0
    failed: int = 0
    measurements: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RaceResult:
    """The final race: its winner's key, every finalist's timing, full-space point and
    program (`hlo_fingerprint`), and the default's key."""

    winner: str
    timings: dict[str, Timing]
    points: dict[str, Point]
    raced_again: bool
    hlo: dict[str, str] = field(default_factory=dict)
    default: str = ""

    def rows(self, candidates: dict[str, Candidate]) -> list[dict[str, Any]]:
        """One row per racer, fastest first: what the study stores and ``--show`` prints."""
        order = sorted(self.timings, key=lambda k: (self.timings[k].median, k))
        return [
            {
                "candidate": k,
                "pipeline": candidates[k].pipeline,
                "schedule": str(candidates[k].schedule),
                "median_s": self.timings[k].median,
                "iqr_s": self.timings[k].iqr,
                "samples": len(self.timings[k].samples),
                "chosen": k == self.winner,
                "default": k == self.default,
            }
            for k in order
        ]


class MeasuredSearch:
    """One measured study on one bench; see the module docstring for the protocol."""

    def __init__(
        self,
        study: Any,
        space: SearchSpace,
        bench: Bench,
        *,
        warmup: int,
        repeats: int,
        seed: int,
        deadline: float | None,
        on_trial: Callable[[], None] | None = None,
        fresh: bool | datetime = False,
        heartbeat: Heartbeat | None = None,
        lock: StudyLock | None = None,
    ) -> None:
        self.study, self.space, self.bench = study, space, bench
        kinds = consumed(bench.backend)
        self.searched = SearchSpace(tuple(p for p in space.params if p.consumed_by(kinds)))
        self.warmup, self.repeats, self.seed = warmup, repeats, seed
        self.deadline = deadline
        self.on_trial = on_trial or (lambda: None)
        self.default = self.candidate(self.searched.default_point())
        self.prepared: dict[str, Prepared | Failure] = {}
        self.racers: dict[str, Candidate] = {}  # the last race's candidates by key
        self._keys: dict[Point, str] | None = None  # candidate key of each searched point
        self.tally = Tally()
        self.heartbeat = heartbeat  # beats for asked trials until told (`store_server`)
        self.lock = lock or (lambda name: nullcontext())  # the study's (`store_locks`)
        # fresh: trials started before this run are ignored (kept, but measured again). Workers
        # of one run get its start time (`--workers`), so one that starts late still counts
        # what the others measured in the same run.
        self.since: datetime | None = None
        if fresh:
            self.since = fresh if isinstance(fresh, datetime) else datetime.now()

    def current(self, trial: Any) -> bool:
        """A trial of this run (with ``fresh``), or any trial."""
        start = trial.datetime_start
        return self.since is None or (start is not None and start >= self.since)

    # -- candidates -------------------------------------------------------------
    def candidate(self, searched_point: Point) -> Candidate:
        """The full-space candidate of a searched point (unsearched params at defaults)."""
        return self.space.candidate(self.space.point(dict(searched_point)))

    def searched_point(self, point: Point) -> Point:
        names = {p.name for p in self.searched.params}
        return self.searched.point({k: v for k, v in point if k in names})

    def known(self, trials: Sequence[Any] | None = None) -> dict[str, Any]:
        """Finished, first-hand trials of the study (or of ``trials``, all of its trials) by
        candidate key (any process, any run)."""
        from optuna.trial import TrialState

        if trials is None:
            trials = self.study.get_trials(deepcopy=False)
        out: dict[str, Any] = {}
        for t in trials:
            key = t.user_attrs.get("candidate")
            fresh = self.current(t)
            # failed with no reason: its worker died (`store_server.fail_stale`): measure again
            died = t.state == TrialState.FAIL and "reason" not in t.user_attrs
            done = t.state.is_finished() and not died and "duplicate_of" not in t.user_attrs
            if key is not None and fresh and done:
                out.setdefault(key, t)
        return out

    def held(self) -> set[str]:
        """Candidates the study holds (`known`) or has a worker measuring right now."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        keys = set(self.known(trials))
        for t in trials:
            if t.state == TrialState.RUNNING and "duplicate_of" not in t.user_attrs:
                keys.add(t.user_attrs.get("candidate"))
        return keys - {None}

    def unheld(self) -> list[Point]:
        """Searched points whose candidate nobody holds (`held`), in the space's order."""
        if self._keys is None:
            self._keys = {p: self.candidate(p).key for p in self.searched.points()}
        held = self.held()
        return [point for point, key in self._keys.items() if key not in held]

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def prepare(self, candidate: Candidate) -> Prepared | Failure:
        if candidate.key not in self.prepared:
            self.prepared[candidate.key] = self.bench.prepare(candidate)
        return self.prepared[candidate.key]

    # -- trials -----------------------------------------------------------------
    def top_up(self, trials: int, worker: tuple[int, int] | None) -> None:
        """Propose and measure until the study holds ``trials`` candidates (a top-up).

        Claims are made one at a time under the study's lock (`store_locks`): below the
        total (what the study holds, and what workers are measuring, `held`) a worker asks
        for a trial and claims its candidate; at the total it stops, the rest being measured
        by others, so the study's total is exact. A proposal measured before (by anyone) is
        recorded as a duplicate, one another worker is measuring is skipped.
        """
        total = min(trials, self.searched.size())
        if self.default.key not in self.known() and (worker is None or worker[0] == 0):
            self.study.enqueue_trial(dict(self.searched.default_point()))
        asks = 0
        while not self.expired():
            batch: list[tuple[Any, Candidate]] = []
            while len(batch) < BATCH and asks < 4 * trials:
                with self.lock(self.study.study_name):
                    fail_stale(self.study)  # a dead worker's claim is not taken
                    if len(self.held()) >= total:
                        break
                    asks += 1
                    self.propose(batch)
            if not batch:
                return
            self.measure(batch)

    def propose(self, batch: list[tuple[Any, Candidate]]) -> None:
        """Ask for a trial and add it to ``batch``. A proposal someone has already (finished,
        or being measured: `shares.claimed_elsewhere`) is recorded as a duplicate of that
        trial, and a candidate nobody has is taken instead (a seeded pick): as a discrete
        space runs out the sampler mostly repeats itself, and asking it again and again would
        fill the study with duplicates (thousands, seen with 4 workers x 50 trials)."""
        from optuna.trial import TrialState

        from einfuse.autotune.shares import claimed_elsewhere

        tries = 3  # an ask pops an older WAITING trial (the enqueued default) first
        for attempt in range(tries):
            trial, candidate = self.ask()
            other = claimed_elsewhere(self.study, trial, candidate.key, self.current)
            if other is None:
                batch.append((trial, candidate))
                return
            if other.state.is_finished():
                self.tell_duplicate(trial, other)
            else:
                trial.set_user_attr("duplicate_of", other.number)
                self.tell(trial, state=TrialState.PRUNED)
            free = self.unheld()
            if not free or attempt == tries - 1:
                return
            self.study.enqueue_trial(dict(random.Random(trial.number).choice(free)))

    def ask(self) -> tuple[Any, Candidate]:
        """A new trial and its candidate; it beats until told and names its worker, should
        it die (`store_server`)."""
        trial = ask_quietly(self.study)
        if self.heartbeat is not None:
            self.heartbeat.add(trial._trial_id)
        trial.set_user_attr("worker", WORKER)
        return trial, self.candidate(self.searched.suggest(trial))

    def tell(self, trial: Any, value: float | None = None, state: Any = None) -> None:
        """Finish an asked trial (a value, or a state) and stop its heartbeat. One failed
        meanwhile (by others, who took its worker for dead) stays failed."""
        if value is None:
            self.study.tell(trial, state=state, skip_if_finished=True)
        else:
            self.study.tell(trial, value, skip_if_finished=True)
        if self.heartbeat is not None:
            self.heartbeat.discard(trial._trial_id)

    def tell_duplicate(self, trial: Any, original: Any) -> None:
        """A sampler proposal measured before: record its earlier outcome, measure nothing."""
        trial.set_user_attr("duplicate_of", original.number)
        trial.set_user_attr("candidate", original.user_attrs.get("candidate"))
        if original.value is not None:
            self.tell(trial, original.value)
        else:
            trial.set_user_attr("reason", original.user_attrs.get("reason", "failed before"))
            self.tell(trial, state=original.state)

    def _finish(
        self, trial: Any, candidate: Candidate, value: float | None, attrs: dict[str, Any]
    ) -> None:
        """Record an outcome: tell an asked trial, or add a finished one (``trial`` None).

        Model-chosen candidates (hybrid) are added as finished trials rather than enqueued,
        so a concurrent worker's ``ask`` can never pick them up.
        """
        from optuna.trial import TrialState, create_trial

        attrs = {
            "candidate": candidate.key,
            "pipeline": candidate.pipeline,
            "schedule": str(candidate.schedule),
            "worker": WORKER,
            **attrs,
        }
        state = TrialState.COMPLETE
        if value is None:
            state = TrialState.PRUNED if attrs.pop("pruned", False) else TrialState.FAIL
        if trial is None:
            point = self.searched_point(candidate.point)
            self.study.add_trial(
                create_trial(
                    state=state,
                    value=value,
                    params=dict(point),
                    distributions=self.searched.distributions(point),
                    user_attrs=attrs,
                )
            )
            return
        from optuna.exceptions import UpdateFinishedTrialError

        # failed by others meanwhile (they took its worker for dead): its candidate is free
        with contextlib.suppress(UpdateFinishedTrialError):
            for name, v in attrs.items():
                trial.set_user_attr(name, v)
        self.tell(trial, value, state)

    def measure(self, batch: Sequence[tuple[Any, Candidate]]) -> None:
        """Prepare (compile + check) then time a batch interleaved with the anchor.

        Each item is ``(trial, candidate)`` with an asked trial, or None to add one.
        """
        ready: dict[str, tuple[Any, Prepared]] = {}
        for trial, candidate in batch:
            self.tally.trials += 1
            outcome: Prepared | Failure
            if self.expired():
                outcome = Failure("not measured: the tuning timeout ran out", "pruned")
            else:
                outcome = self.prepare(candidate)
            if isinstance(outcome, Failure):
                attrs = {"reason": outcome.reason, "pruned": outcome.state == "pruned"}
                self._finish(trial, candidate, None, attrs)
                self.tally.failed += 1
                self.tally.failures.append((candidate.key, outcome.reason))
                self.on_trial()
            else:
                ready[candidate.key] = (trial, outcome)
        if not ready:
            return
        group = {key: p for key, (_, p) in ready.items()}
        anchor = self.prepare(self.default)
        if isinstance(anchor, Prepared) and self.default.key not in group:
            group[ANCHOR] = anchor
        timings = self.bench.time(group, warmup=self.warmup, repeats=self.repeats, seed=self.seed)
        reference = timings.get(ANCHOR, timings.get(self.default.key))
        for key, (trial, prepared) in ready.items():
            t = timings[key]
            attrs = {
                "median_s": t.median,
                "iqr_s": t.iqr,
                "hlo": prepared.hlo,
                "compile_s": prepared.compile_s,
                "check": prepared.check,
                "check_error": prepared.check_error,
            }
            if reference is not None:
                attrs["anchor_ratio"] = t.median / reference.median
            self._finish(trial, prepared.candidate, t.median, attrs)
            self.tally.measurements += 1
            self.on_trial()

    # -- the decision -----------------------------------------------------------
    def finalists(self, count: int | None = None) -> list[tuple[str, Point]]:
        """The best ``count`` measured candidates (by ratio to the default; all of them when
        ``count`` is None), with their points."""
        from optuna.trial import TrialState

        done = [
            t
            for t in self.known().values()
            if t.state == TrialState.COMPLETE and t.value is not None
        ]
        done.sort(key=lambda t: (t.user_attrs.get("anchor_ratio", t.value), t.number))
        chosen = done if count is None else done[:count]
        return [(t.user_attrs["candidate"], tuple(t.params.items())) for t in chosen]

    def race(self, finalists: Sequence[tuple[str, Point]]) -> RaceResult | None:
        """Time the finalists and the default together; re-race a suspiciously fast winner."""
        group: dict[str, Prepared] = {}
        points: dict[str, Point] = {}
        self.racers = {}
        for _, searched in [*finalists, ("", self.searched.default_point())]:
            candidate = self.candidate(self.searched.point(dict(searched)))
            prepared = self.prepare(candidate)
            if isinstance(prepared, Prepared) and candidate.key not in group:
                group[candidate.key] = prepared
                points[candidate.key] = candidate.point
                self.racers[candidate.key] = candidate
        if not group:
            return None
        repeats = 2 * self.repeats
        timings = self.bench.time(group, warmup=self.warmup, repeats=repeats, seed=self.seed + 1)
        winner = self.pick(timings, points)
        earlier = {k: t.user_attrs.get("median_s") for k, t in self.known().items()}
        suspicious = winner != self.default.key and (
            earlier.get(winner) is not None
            and timings[winner].median < SUSPICIOUS_GAIN * earlier[winner]
        )
        if suspicious:
            again = self.bench.time(group, warmup=0, repeats=repeats, seed=self.seed + 2)
            timings = {k: Timing.from_samples(timings[k].samples + again[k].samples) for k in group}
            winner = self.pick(timings, points)
        hlo = {k: p.hlo for k, p in group.items()}
        return RaceResult(winner, timings, points, suspicious, hlo, self.default.key)

    def pick(self, timings: dict[str, Timing], points: dict[str, Point]) -> str:
        """The fastest, unless others are within `MIN_TIE` of it: then the default, then
        smaller tiles. The window is fixed, not the samples' spread: a noisy race must not
        let a clearly slower candidate win (a 120 ms "best" beside a 109 ms one)."""
        fastest = min(t.median for t in timings.values())
        tied = [k for k, t in timings.items() if t.median <= fastest * (1 + MIN_TIE)]
        return min(
            tied,
            key=lambda k: (
                k != self.default.key,
                tile_weight(self.space, points[k]),
                k,
            ),
        )
