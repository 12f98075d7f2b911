"""What a Pareto search returns: every candidate's (time, loss), the front, the choice.

One code path for a search's summary and for ``einfuse autotune --show`` of a stored study:
`points_of` reads the candidates back from the study's trials, `choose` picks, and
`ParetoResult.table` prints. ``time`` is the candidate's time as a ratio to the dense
program's (measured in the same interleaved rounds, or both priced by the cost model), so
trials measured in different rounds or processes compare; ``time_s`` is the absolute figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from einfuse.autotune.key import TuningKey
from einfuse.autotune.timing_table import format_table

DIGEST_ATTR = "digest"  # trial user attr: which metric, calibration set and timing it was under
REFUSED = "refused by a pass: "  # a failure that ran nothing (counts no trial)
RACERS = 4  # finalists in the final race (with the dense program)


@dataclass(frozen=True, slots=True)
class ParetoPoint:
    """One candidate program: its pipeline and objectives, or why it failed (``reason``)."""

    number: int
    pipeline: str
    time: float | None  # ratio to the dense program
    loss: float | None
    time_s: float | None = None
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.time is not None and self.loss is not None and not self.reason

    def dominates(self, other: ParetoPoint) -> bool:
        """No worse on both objectives and better on one."""
        assert self.time is not None and self.loss is not None
        assert other.time is not None and other.loss is not None
        no_worse = self.time <= other.time and self.loss <= other.loss
        return no_worse and (self.time < other.time or self.loss < other.loss)


def pareto_front(points: Iterable[ParetoPoint]) -> list[ParetoPoint]:
    """The non-dominated candidates that did not fail, fastest first (one per pipeline)."""
    ok = [p for p in points if p.ok]
    front = [p for p in ok if not any(q.dominates(p) for q in ok)]
    unique: dict[str, ParetoPoint] = {}
    for p in sorted(front, key=lambda p: (p.time, p.loss, p.number)):
        unique.setdefault(p.pipeline, p)
    return list(unique.values())


def finalists(points: Sequence[ParetoPoint], max_loss: float) -> list[ParetoPoint]:
    """The fastest few pruned candidates within the bound, by their trial times: they race
    the dense program once more before one is chosen (a fast time may have been noise)."""
    feasible = [p for p in points if p.ok and p.pipeline and p.loss <= max_loss]  # type: ignore[operator]
    return sorted(feasible, key=lambda p: (p.time, p.loss, p.number))[:RACERS]


def choose(
    points: Sequence[ParetoPoint], max_loss: float, race: Mapping[str, float] | None = None
) -> tuple[ParetoPoint, str]:
    """The fastest candidate with loss <= ``max_loss`` (a tie goes to the lower loss, then
    to the dense program); if none qualifies, the dense program, and a message saying so.
    With a ``race`` (pipeline -> time as a ratio to dense), only its racers compete, by it."""
    dense = next((p for p in points if p.pipeline == "" and p.ok), None)
    if dense is None:
        raise ValueError("the dense program must be a measured candidate")
    feasible = [p for p in points if p.ok and p.loss <= max_loss]  # type: ignore[operator]
    if not feasible:
        best = min((p.loss for p in points if p.ok), default=math.nan)  # type: ignore[type-var]
        return dense, (
            f"no candidate has loss <= {max_loss:g} (the lowest is {best:.4g}, the dense "
            "program's own); chose the dense program"
        )
    how = f"the fastest candidate with loss <= {max_loss:g}"
    if race:
        feasible = [p for p in feasible if p.pipeline in race]
        how += f" in a final race of {len(race)} (interleaved)"

    def speed(p: ParetoPoint) -> float:
        return race[p.pipeline] if race else p.time  # type: ignore[return-value]

    chosen = min(feasible, key=lambda p: (speed(p), p.loss, p.pipeline != "", p.number))
    return chosen, f"chosen: {how}"


def points_of(trials: Iterable[Any], digest: str) -> list[ParetoPoint]:
    """The candidates stored as ``trials`` under ``digest``, one per pipeline (a trial that
    repeats an earlier candidate is left out), by trial number."""
    points = []
    for t in trials:
        attrs = t.user_attrs
        if attrs.get(DIGEST_ATTR) != digest or "duplicate_of" in attrs or "pipeline" not in attrs:
            continue
        if t.state.name not in ("COMPLETE", "FAIL"):  # a search that died measuring it
            continue
        values = t.values if t.state.name == "COMPLETE" else None
        reason = attrs.get("reason", "") or ("" if values else f"trial {t.state.name.lower()}")
        points.append(
            ParetoPoint(
                number=t.number,
                pipeline=attrs["pipeline"],
                time=None if not values else float(values[0]),
                loss=None if not values else float(values[1]),
                time_s=attrs.get("time_s"),
                reason=reason,
                params=dict(t.params),
            )
        )
    return points


@dataclass(frozen=True)
class ParetoResult:
    """A Pareto search's candidates (this metric's, stored ones included) and its choice."""

    key: TuningKey
    points: tuple[ParetoPoint, ...]
    chosen: ParetoPoint
    max_loss: float
    metric: str
    time_mode: str  # "measure" or "model"
    message: str
    study: Any = None
    new_trials: int = 0
    race: Mapping[str, float] = field(default_factory=dict)  # pipeline -> ratio to dense

    @property
    def front(self) -> list[ParetoPoint]:
        return pareto_front(self.points)

    @property
    def failed(self) -> list[ParetoPoint]:
        return [p for p in self.points if not p.ok]

    def table(self) -> str:
        rows = []
        front = self.front
        extra = [p for p in self.points if p.ok and (p.pipeline == "" or p == self.chosen)]
        shown = front + [p for p in extra if p not in front]  # dense and the choice, always
        for p in shown:
            marks = (
                "chosen" if p.number == self.chosen.number else "",
                "dense" if p.pipeline == "" else "",
            )
            rows.append(
                {
                    "": " ".join(m for m in marks if m),
                    "pipeline": p.pipeline or "(dense)",
                    "time_x_dense": p.time,
                    f"{'predicted' if self.time_mode == 'model' else 'measured'}_ms": (
                        None if p.time_s is None else p.time_s * 1e3
                    ),
                    "loss": p.loss,
                    "race_x_dense": self.race.get(p.pipeline),
                }
            )
        columns = [c for c in rows[0] if c != "race_x_dense" or self.race] if rows else []
        formats = {"time_x_dense": ".3f", "loss": ".4g", "measured_ms": ".4g"}
        formats["race_x_dense"] = ".3f"
        formats["predicted_ms"] = ".4g"
        kind = "cost-model time" if self.time_mode == "model" else "measured time (interleaved)"
        lines = [
            f"Pareto front ({kind} as a ratio to the dense program, loss by {self.metric}):",
            format_table(rows, columns, formats=formats),
            f"{len(self.points)} candidate(s) ({self.new_trials} new, {len(self.failed)} "
            f"failed), {len(front)} on the front; {self.message}: "
            f"{self.chosen.pipeline or '(dense)'}"
            + (f"; study {self.study.study_name}" if self.study is not None else ""),
        ]
        refused = [p for p in self.failed if p.reason.startswith(REFUSED)]
        ran = [p for p in self.failed if p not in refused]
        lines += [f"  failed: {p.pipeline or '(dense)'}: {p.reason}" for p in ran[:10]]
        if refused:
            lines.append(
                f"  {len(refused)} refused before running (no trial counted), e.g. "
                f"{refused[0].pipeline}: {refused[0].reason.removeprefix(REFUSED)}"
            )
        return "\n".join(lines)


def candidates_table(result: ParetoResult) -> str:
    """Every candidate of the search, by trial number (``einfuse autotune --show``)."""
    front = {p.number for p in result.front}
    rows = [
        {
            "#": p.number,
            "": "chosen"
            if p.number == result.chosen.number
            else "front"
            if p.number in front
            else "",
            "pipeline": p.pipeline or "(dense)",
            "time_x_dense": p.time,
            "loss": p.loss,
            "note": p.reason,
        }
        for p in sorted(result.points, key=lambda p: p.number)
    ]
    columns = ["#", "", "pipeline", "time_x_dense", "loss", "note"]
    return format_table(rows, columns, formats={"time_x_dense": ".3f", "loss": ".4g"})


def plot_front(result: ParetoResult, directory: Path) -> list[str]:
    """Time against loss for every candidate, the front as a line, the finalists where the
    final race put them, the chosen one marked, the loss bound dashed: ``DIR/<study>-front.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    name = result.study.study_name if result.study is not None else "pareto"
    path = directory / f"{name}-front.png"
    ok = [p for p in result.points if p.ok]
    front = result.front
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.scatter([p.time for p in ok], [p.loss for p in ok], c="0.6", s=18, label="candidate")
        ax.plot([p.time for p in front], [p.loss for p in front], "o-", c="C0", label="front")
        raced = [p for p in ok if p.pipeline in result.race]
        if raced:  # where the final race put the finalists: the choice is made there
            times = [result.race[p.pipeline] for p in raced]
            ax.scatter(times, [p.loss for p in raced], marker="x", c="C1", label="final race")
        c = result.chosen
        x = result.race.get(c.pipeline, c.time)
        ax.scatter([x], [c.loss], marker="*", s=220, c="C3", zorder=3, label="chosen")
        ax.axhline(result.max_loss, ls="--", c="C3", lw=1, label=f"max loss {result.max_loss:g}")
        ax.set_xlabel(
            "time / dense time" + (" (cost model)" if result.time_mode == "model" else "")
        )
        ax.set_ylabel(f"loss ({result.metric})")
        ax.legend(fontsize=8)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return [f"wrote {path}"]
