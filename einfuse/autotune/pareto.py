"""``objective="pareto"``: choose a pruning pipeline by time and quality, under a loss bound.

Pruning changes results by design, so its keep ratios are chosen by a multi-objective Optuna
study (TPE) over the pipelines of `pareto_space`, with two objectives, both minimized:

- **time**, as a ratio to the dense program: ``measure`` times each batch of candidates
  interleaved with the dense program on the first calibration call (`timing.time_interleaved`,
  medians); ``model`` sums the cost model's price of every region of the pruned program
  (opaque ops, the top-k and gathers among them, are not priced).
- **loss**, from the user's quality metric ``metric(outputs, dense_outputs) -> float``: both
  are lists with one entry per calibration call, each the function's output as a pytree of
  NumPy arrays in the model's own dtype; ``dense_outputs`` come from the dense einfuse
  program. The calibration set is a list of calls (tuples of positional arguments), all with
  the shapes of the first (what the chosen program is tuned for).

The dense program is always a candidate. A candidate that fails (a pass refuses it, it does
not compile, the metric raises or gives NaN) is stored as a failed trial with its reason and
never chosen. The choice is the fastest candidate with loss <= ``max_loss``, else the dense
program; with measured time, the fastest few within the bound first race the dense program
once more, interleaved (a fast trial may have been noise), and the race decides. Trials
carry the digest of the metric, the calibration set and the timing, so a
second search with the same ones only measures what is new; the choice is stored under the
*program's* key (`program_key`), which ``einfuse.jit(f, autotune=...)`` looks up
(`tuned_program`) to run the chosen pipeline.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from einfuse.autotune.key import TuningKey, device_kind_for, library_versions
from einfuse.autotune.pareto_measure import (
    KIND,
    Metric,
    Search,
    metric_loss,
    numpy_outputs,
)
from einfuse.autotune.pareto_result import ParetoResult, choose, finalists, points_of
from einfuse.autotune.pareto_space import PRUNABLE, PruningSpace
from einfuse.autotune.store import (
    KEY_ATTR,
    BestRecord,
    StoreError,
    TuningStore,
    quiet_optuna,
    storage_exists,
)
from einfuse.ir.errors import EinfuseError

if TYPE_CHECKING:
    from einfuse.cost_model.target import Target
    from einfuse.einsum_cascade.lift import Program

PARETO_ATTR = "einfuse_pareto"  # study user attr: metric, digest, bound, choice of the last search
DEFAULT_PARETO_TRIALS = 12
TIMES = ("measure", "model")


class MetricError(EinfuseError):
    """The quality metric or its calibration set cannot be used (says which and why)."""


# --------------------------------------------------------------------------- keys
def program_fingerprint(program: Program) -> str:
    """A lifted program's structure: its inputs' shapes, every region's cascade fingerprint
    and every opaque op, in order (source lines left out: moving code keeps the key)."""
    from einfuse.einsum_cascade.lift import Opaque

    parts = [f"in {program.avals[v].str_short()}" for v in program.inputs]
    for seg in program.segments:
        if isinstance(seg, Opaque):
            parts.append(f"op {seg.primitive} {seg.eqn.invars} -> {seg.eqn.outvars}")
        else:
            parts.append(f"region {seg.cascade.fingerprint()} {seg.inputs} -> {seg.outputs}")
    parts.append(f"out {program.outputs}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def program_key(program: Program, target: Target, backend: str = "jax") -> TuningKey:
    """The key of a whole lifted program's pruning choice on ``target``."""
    counts = Counter(str(program.avals[v].dtype) for v in program.inputs)
    # One line for every input (the fingerprint holds each one's shape and dtype).
    dtypes = (("inputs", ", ".join(f"{n} {d}" for d, n in sorted(counts.items()))),)
    return TuningKey(
        fingerprint=program_fingerprint(program),
        sizes=(),
        dtypes=dtypes,
        target=target.name,
        device_kind=device_kind_for(target),
        versions=library_versions(),
        backend=backend,
    )


def tuned_program(
    program: Program, target: str | Target | None, storage: Any, backend: str = "jax"
) -> tuple[TuningKey, BestRecord | None]:
    """The program key and the pruning choice stored for it (None: nothing stored).

    For ``einfuse.jit``: never searches; a store file that does not exist is not created.
    """
    from einfuse.autotune.tuner import _target

    key = program_key(program, _target(target, calibrate=False), backend)
    if isinstance(storage, str | None) and not storage_exists(storage):
        return key, None
    with quiet_optuna():
        store = storage if isinstance(storage, TuningStore) else TuningStore(storage)
        # the search's own choice, else one imported from an export (filed as measured)
        return key, store.best(key, kinds=(KIND, "measured", "model"))


# --------------------------------------------------------------------------- search
def pareto_search(
    function: Callable[..., Any],
    calibration: Sequence[Any],
    metric: Metric,
    *,
    max_loss: float,
    target: str | Target | None = None,
    time_mode: str = "measure",
    prune: Sequence[str] = PRUNABLE,
    trials: int | None = None,
    timeout: float | None = None,
    storage: Any = None,
    study: str | None = None,
    seed: int = 0,
    repeats: int = 5,
    progress: bool = True,
    fresh: bool = False,
    metric_name: str | None = None,
    backend: str = "jax",
) -> ParetoResult:
    """Search pruning pipelines of ``function`` (see the module docstring); store and
    return the front and the choice. ``trials`` counts distinct candidates, the dense one
    included (default 12); ``fresh`` measures again instead of reusing stored candidates."""
    import einfuse
    from einfuse.autotune.tuner import _target

    if time_mode not in TIMES:
        raise EinfuseError(f"time {time_mode!r}: choose one of {', '.join(TIMES)}")
    if not math.isfinite(max_loss):
        raise MetricError(f"max loss must be a finite number, got {max_loss}")
    if trials is not None and trials < 1:
        raise EinfuseError(f"trials must be >= 1 (the dense program is one), got {trials}")
    name = metric_name or f"{metric.__module__}:{getattr(metric, '__qualname__', metric)}"
    calls = _calls(calibration, name)
    target_obj = _target(target, calibrate=time_mode == "model")
    dense = einfuse.jit(function, backend=backend)
    lifted = dense.trace(*calls[0]).lifted
    space = PruningSpace(_layers(lifted), tuple(prune))
    key = program_key(lifted, target_obj, backend)
    dense_outputs = [numpy_outputs(dense(*c)) for c in calls]
    dense_loss = metric_loss(metric, dense_outputs, dense_outputs, name)
    if isinstance(dense_loss, str):
        raise MetricError(f"metric {name} on the dense program's own outputs: {dense_loss}")
    digest = _digest(name, calls, time_mode, fresh)
    store = storage if isinstance(storage, TuningStore) else TuningStore(storage)
    search = Search(
        function, calls, metric, name, dense, dense_outputs, space, target_obj, time_mode, repeats
    )
    with quiet_optuna():
        optuna_study = _open_study(store, study or key.study_name(KIND), key, seed, trials)
        with store.guard():
            new = search.run(
                optuna_study,
                digest,
                trials or DEFAULT_PARETO_TRIALS,
                None if timeout is None else time.monotonic() + timeout,
                progress,
            )
            points = points_of(optuna_study.get_trials(deepcopy=False), digest)
            last = optuna_study.user_attrs.get(PARETO_ATTR, {})
        race: dict[str, float] = {}
        if time_mode == "measure":
            same = new == 0 and "race" in last and last.get("digest") == digest
            same = same and last.get("max_loss") == max_loss  # nothing new: the stored race
            race = last.get("race", {}) if same else search.race(finalists(points, max_loss))
        chosen, message = choose(points, max_loss, race)
        record = BestRecord(
            key=key,
            pipeline=chosen.pipeline,
            schedule="",
            params=dict(chosen.params),
            objective=KIND,
            predicted_s=chosen.time_s if time_mode == "model" else None,
            measured_s=chosen.time_s if time_mode == "measure" else None,
            default_s=next((p.time_s for p in points if p.pipeline == "" and p.ok), None),
        )
        store.save_best(optuna_study, record)
        with store.guard():
            optuna_study.set_user_attr(
                PARETO_ATTR,
                {
                    "metric": name,
                    "digest": digest,
                    "max_loss": max_loss,
                    "time": time_mode,
                    "chosen": chosen.number,
                    "message": message,
                    "race": race,
                },
            )
    return ParetoResult(
        key, tuple(points), chosen, max_loss, name, time_mode, message, optuna_study, new, race
    )


def stored_result(study: Any) -> ParetoResult | None:
    """The last search of a stored Pareto study (for ``--show``), or None if it is not one."""
    attrs = study.user_attrs
    info = attrs.get(PARETO_ATTR)
    if info is None or KEY_ATTR not in attrs:
        return None
    points = points_of(study.get_trials(deepcopy=False), info["digest"])
    chosen = next(p for p in points if p.number == info["chosen"])
    key = TuningKey.from_dict(attrs[KEY_ATTR])
    return ParetoResult(
        key, tuple(points), chosen, info["max_loss"], info["metric"], info["time"],
        info["message"], study, 0, info.get("race", {}),
    )  # fmt: skip


def _open_study(
    store: TuningStore, name: str, key: TuningKey, seed: int, trials: int | None
) -> Any:
    """The study of this program's key: two objectives, TPE (random for the first half of
    a small budget, so a few trials still spread over the space)."""
    import optuna

    budget = trials or DEFAULT_PARETO_TRIALS
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, budget // 2)))
    study = store.study(name, key, sampler, directions=["minimize", "minimize"])
    with store.guard():
        stored = study.user_attrs.get(KEY_ATTR)
    if len(study.directions) != 2 or TuningKey.from_dict(stored) != key:
        raise StoreError(
            f"study {name!r} in {store.where} holds another search (not this program's "
            "Pareto search); pick another --study"
        )
    return study


# --------------------------------------------------------------------------- helpers
def _calls(calibration: Sequence[Any], name: str) -> list[tuple[Any, ...]]:
    """The calibration calls as argument tuples, every one with the first one's shapes."""
    import jax

    try:
        calls = [c if isinstance(c, tuple) else (c,) for c in calibration]
    except TypeError:
        raise MetricError(
            f"the calibration set of {name} is a {type(calibration).__name__}, not a list of "
            "calls (tuples of arguments)"
        ) from None
    if not calls:
        raise MetricError(f"the calibration set of {name} is empty; give at least one call")

    def signature(call: tuple[Any, ...]) -> Any:
        leaves, tree = jax.tree_util.tree_flatten(call)
        return tree, [(np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves]

    first = signature(calls[0])
    for i, call in enumerate(calls[1:], start=1):
        if signature(call) != first:
            raise MetricError(
                f"calibration call {i} has other shapes or dtypes than call 0; every call "
                "must have the shapes the program is tuned for (pad them alike)"
            )
    return calls


def _digest(name: str, calls: list[tuple[Any, ...]], time_mode: str, fresh: bool) -> str:
    """What a candidate's figures depend on beyond the key: the metric, the calibration
    values (each distinct array once) and the timing. ``fresh`` starts a new generation."""
    import jax

    h = hashlib.sha256(f"{name}|{time_mode}".encode())
    seen: set[int] = set()
    for leaf in jax.tree_util.tree_leaves(calls):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            array = np.asarray(leaf)
            h.update(f"{array.shape}{array.dtype}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
    if fresh:
        h.update(str(time.time_ns()).encode())
    return h.hexdigest()[:16]


def _layers(program: Program) -> int:
    from einfuse.passes.prune_attention import attention_sites

    return sum(len(attention_sites(r.cascade)) for r in program.regions)


__all__ = [
    "DEFAULT_PARETO_TRIALS",
    "MetricError",
    "ParetoResult",
    "pareto_search",
    "program_key",
    "stored_result",
    "tuned_program",
]
