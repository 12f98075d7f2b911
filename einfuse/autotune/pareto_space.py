"""The pruning pipelines a Pareto search proposes: Optuna params -> one program pipeline.

``prune`` says which passes run: ``none`` (the dense program), ``tokens``, ``heads`` or
``tokens+heads``. Token pruning (``prune-tokens``) has three params: ``tokens.keep``, the
fraction of the tokens the last layer keeps (0.3-0.95 in steps of 0.05), ``tokens.start``,
the first layer that prunes, and ``tokens.shape``: ``flat`` keeps ``keep`` from ``start``
on (``keep=0.5,start=2``), ``linear`` shrinks step by step from ``start`` to ``keep`` at
the last layer (SpAtten's progressive pruning: six layers, start 1, keep 0.5 is
``keep=1:0.9:0.8:0.7:0.6:0.5``). Head pruning (``prune-heads``) has ``heads.keep``
(0.5-0.875 in steps of 0.125) and ``heads.start``, flat. Params that give one program give
one pipeline text (a flat schedule is always written ``keep=K,start=S``), so the search can
tell when it proposed a program it already measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from einfuse.ir.errors import EinfuseError

PRUNABLE = ("tokens", "heads")
TOKEN_KEEP = (0.3, 0.95, 0.05)  # low, high, step
HEAD_KEEP = (0.5, 0.875, 0.125)


class SpaceError(EinfuseError):
    """A pruning space that cannot be searched (unknown pass, no attention layer)."""


@dataclass(frozen=True, slots=True)
class PruningSpace:
    """The params of the passes named in ``prune`` for a program with ``layers`` attentions."""

    layers: int
    prune: tuple[str, ...] = PRUNABLE

    def __post_init__(self) -> None:
        unknown = [p for p in self.prune if p not in PRUNABLE]
        if unknown or not self.prune:
            raise SpaceError(
                f"--prune {','.join(self.prune) or '(empty)'}: choose from {', '.join(PRUNABLE)}"
            )
        if self.layers < 1:
            raise SpaceError("the program has no softmax attention layer to prune")

    def choices(self) -> tuple[str, ...]:
        """The values of the ``prune`` param: ``none`` (dense), each pass, both together."""
        both = ("+".join(self.prune),) if len(self.prune) > 1 else ()
        return ("none", *self.prune, *both)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask ``trial`` (an Optuna trial) for the params of one candidate."""
        params: dict[str, Any] = {"prune": trial.suggest_categorical("prune", self.choices())}
        if "tokens" in params["prune"]:
            params["tokens.keep"] = _suggest_ratio(trial, "tokens.keep", TOKEN_KEEP)
            params["tokens.start"] = trial.suggest_int("tokens.start", 0, self.layers - 1)
            params["tokens.shape"] = trial.suggest_categorical("tokens.shape", ("flat", "linear"))
        if "heads" in params["prune"]:
            params["heads.keep"] = _suggest_ratio(trial, "heads.keep", HEAD_KEEP)
            params["heads.start"] = trial.suggest_int("heads.start", 0, self.layers - 1)
        return params

    @staticmethod
    def dense_params() -> dict[str, Any]:
        """The params of the dense program (nothing pruned)."""
        return {"prune": "none"}

    def pipeline(self, params: Mapping[str, Any]) -> str:
        """The program pipeline of ``params`` (empty for the dense program)."""
        passes = []  # heads first: prune-tokens' top-k gathers at the heads then computed
        if "heads" in params["prune"]:
            passes.append(f"prune-heads{{{schedule_options(self._ratios(params, 'heads'))}}}")
        if "tokens" in params["prune"]:
            ratios = self._ratios(params, "tokens")
            passes.append(f"prune-tokens{{{schedule_options(ratios)}}}")
        return ",".join(passes)

    def _ratios(self, params: Mapping[str, Any], kind: str) -> list[float]:
        keep, start = float(params[f"{kind}.keep"]), int(params[f"{kind}.start"])
        shape = params.get(f"{kind}.shape", "flat")
        if shape == "flat":
            return [1.0] * start + [keep] * (self.layers - start)
        steps = self.layers - start
        return [1.0] * start + [1 - (1 - keep) * (i + 1) / steps for i in range(steps)]


def schedule_options(ratios: Sequence[float]) -> str:
    """``keep=K,start=S`` for a flat schedule, else ``keep=a:b:...`` (3 decimals at most)."""
    text = [f"{round(r, 3):g}" for r in ratios]
    start = next(i for i, r in enumerate(text) if r != "1")
    if len(set(text[start:])) == 1:
        return f"keep={text[start]},start={start}" if start else f"keep={text[start]}"
    return "keep=" + ":".join(text)


def _suggest_ratio(trial: Any, name: str, spec: tuple[float, float, float]) -> float:
    low, high, step = spec
    return round(trial.suggest_float(name, low, high, step=step), 3)
