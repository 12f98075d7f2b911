"""What a tuning call returns, and the table the CLI prints from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from einfuse.autotune.store import TuningKey
from einfuse.autotune.timing_table import format_table


@dataclass(frozen=True)
class TuneResult:
    """The choice for one key, with the default's figures beside it for comparison.

    ``trials_done`` and ``trials_failed`` count this call's candidates (failed includes those
    pruned before compiling); ``measurements`` counts those compiled, checked and timed.
    ``reused`` is True when the stored choice was returned without any new trial.
    ``candidates_per_s`` is the model's scoring rate (model objective only).
    Measured: ``measured_s`` and ``default_measured_s`` are medians of one final race,
    whose rows (every racer, fastest first) are ``race``; ``hlo`` is the chosen program's
    `hlo_fingerprint`, which ``einfuse.jit(autotune=...)`` replays (`program_hlo` gives it
    for any candidate of ``cascade``).
    """

    key: TuningKey
    objective: str
    pipeline: str
    schedule: Any
    params: dict[str, Any]
    predicted_s: float | None
    measured_s: float | None
    default_pipeline: str
    default_schedule: Any
    default_predicted_s: float | None
    default_measured_s: float | None
    trials_done: int
    trials_failed: int
    measurements: int
    reused: bool
    space_size: int
    study: Any = None
    failures: tuple[tuple[str, str], ...] = ()
    candidates_per_s: float | None = None
    race: tuple[dict[str, Any], ...] = ()
    hlo: str | None = None
    cascade: Any = None  # the canonical cascade tuned (`einfuse.compile_path`)
    sizes: dict[str, int] | None = None

    @property
    def speedup(self) -> float | None:
        """Default time over chosen time: measured when both were, else predicted."""
        for best, default in (
            (self.measured_s, self.default_measured_s),
            (self.predicted_s, self.default_predicted_s),
        ):
            if best and default:
                return default / best
        return None

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "": "tuned",
                "pipeline": self.pipeline or "(none)",
                "schedule": str(self.schedule),
                "predicted_ms": _ms(self.predicted_s),
                "measured_ms": _ms(self.measured_s),
            },
            {
                "": "default",
                "pipeline": self.default_pipeline or "(none)",
                "schedule": str(self.default_schedule),
                "predicted_ms": _ms(self.default_predicted_s),
                "measured_ms": _ms(self.default_measured_s),
            },
        ]

    def table(self) -> str:
        columns = ["", "pipeline", "schedule", "predicted_ms", "measured_ms"]
        lines = [format_table(self.rows(), columns, formats=_FORMATS)]
        speedup = self.speedup
        summary = (
            f"objective {self.objective}; space {self.space_size} points; "
            f"trials {self.trials_done} done, {self.trials_failed} failed; "
            f"{self.measurements} measured"
        )
        if self.reused:
            summary += "; reused the stored result (no new trials)"
        if speedup is not None:
            summary += f"; speedup over default {speedup:.2f}x"
        if self.candidates_per_s is not None:
            summary += f"; model scored {self.candidates_per_s:,.0f} candidates/s"
        if self.study is not None:
            summary += f"; study {self.study.study_name}"
        lines.append(summary)
        if self.race:
            lines.append(race_table(self.race))
        for key, reason in self.failures[:10]:
            lines.append(f"  failed: {key}: {reason}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ProgramTuneResult:
    """One `TuneResult` per distinct cascade of a tuned function."""

    results: tuple[TuneResult, ...]

    def table(self) -> str:
        if not self.results:
            return "the function holds no cascade to tune"
        parts = []
        for index, result in enumerate(self.results):
            parts.append(f"cascade {index} ({result.key.fingerprint}):\n{result.table()}")
        return "\n\n".join(parts)


_FORMATS = {"predicted_ms": ".4g", "measured_ms": ".4g"}


def race_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The final race (stored rows, fastest first): the numbers the result reports, for the
    run's summary and ``einfuse autotune --show`` alike."""
    shown = [
        {
            "": " ".join(k for k in ("chosen", "default") if r[k]),
            "pipeline": r["pipeline"] or "(none)",
            "schedule": r["schedule"],
            "race_ms": r["median_s"] * 1e3,
            "iqr_ms": r["iqr_s"] * 1e3,
            "runs": r["samples"],
        }
        for r in rows
    ]
    columns = ["", "pipeline", "schedule", "race_ms", "iqr_ms", "runs"]
    table = format_table(shown, columns, formats={"race_ms": ".4g", "iqr_ms": ".2g"})
    head = "final race (interleaved; chosen: the fastest, a near-tie going to the default):"
    return f"{head}\n{table}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3
