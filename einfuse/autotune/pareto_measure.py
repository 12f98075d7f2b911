"""The measuring half of a Pareto search (`pareto`): ask Optuna for candidates, measure
each one's loss and time, tell the figures, and race the finalists.

Candidates are measured in batches of `BATCH`: each compiled and run on every calibration
call (the loss), then timed interleaved with the dense program on the first call (or priced
by the cost model). A proposal of a pipeline measured before, under the same digest, gets
the earlier figures and is never measured again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from einfuse.autotune.measure import describe_error
from einfuse.autotune.pareto_result import DIGEST_ATTR, REFUSED, ParetoPoint, points_of
from einfuse.autotune.pareto_space import PruningSpace
from einfuse.autotune.store_server import ask_quietly
from einfuse.ir.errors import EinfuseError
from einfuse.passes.prune_attention import PruneError

if TYPE_CHECKING:
    from einfuse.cost_model.target import Target

KIND = "pareto"  # the study name's kind (and the progress bar's label)
BATCH = 4  # candidates timed in one interleaved round with the dense program

Metric = Callable[[list[Any], list[Any]], float]


class Search:
    """One search's fixed parts: the function, calibration calls, metric and dense program."""

    def __init__(
        self,
        function: Callable[..., Any],
        calls: list[tuple[Any, ...]],
        metric: Metric,
        name: str,
        dense: Any,
        dense_outputs: list[Any],
        space: PruningSpace,
        target: Target,
        time_mode: str,
        repeats: int,
    ) -> None:
        self.function, self.calls, self.metric, self.name = function, calls, metric, name
        self.dense, self.dense_outputs, self.space = dense, dense_outputs, space
        self.target, self.time_mode, self.repeats = target, time_mode, repeats
        self.dense_model_s = model_seconds(dense, calls[0], target) if time_mode == "model" else 0

    def run(self, study: Any, digest: str, budget: int, deadline: float | None, bar: bool) -> int:
        """Ask and measure until ``budget`` distinct candidates are stored under ``digest``;
        returns how many were measured now."""
        from einfuse.autotune.objectives import _progress_bar

        stored = points_of(study.get_trials(), digest)
        known = {p.pipeline: p.number for p in stored}
        ran = {p.pipeline for p in stored if not p.reason.startswith(REFUSED)}
        if "" not in known:
            study.enqueue_trial(self.space.dense_params())
        measured = asks = 0
        with _progress_bar(max(0, budget - len(ran)), bar, KIND) as progress:
            while len(ran) < budget and asks < 4 * budget:
                if deadline is not None and time.monotonic() > deadline and "" in known:
                    break  # the dense program is measured even past the deadline
                batch: list[tuple[Any, str]] = []
                while len(batch) < min(BATCH, budget - len(ran)) and asks < 4 * budget:
                    asks += 1
                    trial = ask_quietly(study)
                    pipeline = self.space.pipeline(self.space.suggest(trial))
                    trial.set_user_attr(DIGEST_ATTR, digest)
                    trial.set_user_attr("pipeline", pipeline)
                    same = known.get(pipeline)
                    if same is None and (twin := [t for t, p in batch if p == pipeline]):
                        same = twin[0].number
                    if same is not None:
                        _repeat(study, trial, same)
                        continue
                    batch.append((trial, pipeline))
                refused = self._measure(study, batch)
                for trial, pipeline in batch:
                    known[pipeline] = trial.number
                ran |= {p for _, p in batch} - refused
                measured += len(batch)
                progress.update(len(batch) - len(refused))
        return measured

    def _measure(self, study: Any, batch: list[tuple[Any, str]]) -> set[str]:
        """Quality (and model time) of each candidate, then the batch's times interleaved.
        Returns the pipelines a pass refused (they ran nothing, so they count no trial)."""
        from einfuse.autotune.timing import time_interleaved

        ready: dict[str, tuple[Any, Any, float]] = {}
        refused = set()
        for trial, pipeline in batch:
            outcome = self._evaluate(pipeline)
            if isinstance(outcome, str):
                trial.set_user_attr("reason", outcome)
                study.tell(trial, state=_failed())
                refused |= {pipeline} if outcome.startswith(REFUSED) else set()
            else:
                ready[pipeline] = (trial, *outcome)
        if self.time_mode == "model" or not ready:
            for trial, _, loss, seconds in ready.values():
                self._tell(study, trial, seconds / self.dense_model_s, seconds, loss)
            return refused
        first = self.calls[0]
        runs = {p: (lambda f=f: f(*first)) for p, (_, f, _, _) in ready.items()}
        runs.setdefault("", lambda: self.dense(*first))
        timings = time_interleaved(runs, warmup=1, repeats=self.repeats)
        base = timings[""].median
        for pipeline, (trial, _, loss, _) in ready.items():
            seconds = timings[pipeline].median
            self._tell(study, trial, seconds / base, seconds, loss)
        return refused

    def race(self, racers: list[ParetoPoint]) -> dict[str, float]:
        """The finalists' times as ratios to the dense program's, timed interleaved once more
        (twice the rounds of a trial); nothing to race without a finalist."""
        import einfuse
        from einfuse.autotune.timing import time_interleaved

        if not racers:
            return {}
        first, backend = self.calls[0], self.dense.backend.name
        runs = {"": lambda: self.dense(*first)}
        for p in racers:
            f = einfuse.jit(self.function, passes=p.pipeline, backend=backend)
            runs[p.pipeline] = lambda f=f: f(*first)
        timings = time_interleaved(runs, warmup=1, repeats=2 * self.repeats)
        return {p: t.median / timings[""].median for p, t in timings.items()}

    def _evaluate(self, pipeline: str) -> tuple[Any, float, float] | str:
        """The candidate's compiled function, loss and model seconds; or why it failed."""
        import einfuse

        if pipeline == "":
            f = self.dense
        else:
            try:
                f = einfuse.jit(self.function, passes=pipeline, backend=self.dense.backend.name)
                outputs = [numpy_outputs(f(*c)) for c in self.calls]
            except PruneError as exc:  # refused before anything ran
                return f"{REFUSED}{exc}"
            except Exception as exc:
                return describe_error(exc)
        outputs = self.dense_outputs if pipeline == "" else outputs
        loss = metric_loss(self.metric, outputs, self.dense_outputs, self.name)
        if isinstance(loss, str):
            return loss
        if self.time_mode != "model":
            return f, loss, math.nan
        try:
            return f, loss, model_seconds(f, self.calls[0], self.target)
        except Exception as exc:
            return f"cost model: {describe_error(exc)}"

    @staticmethod
    def _tell(study: Any, trial: Any, ratio: float, seconds: float, loss: float) -> None:
        trial.set_user_attr("time_s", seconds)
        study.tell(trial, [ratio, loss])


def _repeat(study: Any, trial: Any, number: int) -> None:
    """A proposal of a candidate measured before: its figures again, never re-measured."""
    earlier = study.get_trials(deepcopy=False)[number]
    trial.set_user_attr("duplicate_of", number)
    if earlier.state.name == "COMPLETE":
        study.tell(trial, list(earlier.values))
    else:
        study.tell(trial, state=_failed())


def _failed() -> Any:
    from optuna.trial import TrialState

    return TrialState.FAIL


def numpy_outputs(outputs: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(np.asarray, outputs)


def metric_loss(metric: Metric, outputs: list[Any], dense: list[Any], name: str) -> float | str:
    """The metric's value as a finite float, or why there is none (one line)."""
    try:
        value = metric(outputs, dense)
    except Exception as exc:
        return f"metric {name} raised {describe_error(exc)}"
    if isinstance(value, bool) or not isinstance(value, int | float | np.number | np.ndarray):
        return f"metric {name} returned {type(value).__name__} {value!r:.60}, not a number"
    if np.ndim(value) != 0:
        return f"metric {name} returned an array of shape {np.shape(value)}, not a number"
    value = float(value)
    return value if math.isfinite(value) else f"metric {name} returned {value}"


def model_seconds(f: Any, call: tuple[Any, ...], target: Target) -> float:
    """The cost model's price of every region of ``f``'s program at ``call``'s shapes."""
    from einfuse.autotune.screen import program_cost_model
    from einfuse.compile_path import region_sizes

    program = f.trace(*call).program
    total = 0.0
    for k, region in enumerate(program.regions):
        sizes = region_sizes(program, region)
        seconds = float(program_cost_model(region.cascade, target, sizes).estimate(None))
        if not math.isfinite(seconds):
            raise EinfuseError(f"the cost model cannot price region {k}")
        total += seconds
    return total
