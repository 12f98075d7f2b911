"""`autotune`: choose the pipeline and Schedule of a cascade, and remember the choice.

Three objectives (see `objectives`): ``"model"`` (the cost model scores the space, thousands
of candidates a second), ``"measure"`` (compile, check against the float64 reference, time)
and ``"hybrid"`` (the model screens, measurement decides the best few).

A call whose key already has a stored choice and nothing new to measure returns that choice
without a single new trial. `lookup_best` and `tuned_pipeline` read choices back for
``einfuse.jit``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from einfuse.autotune.key import TuningKey
from einfuse.autotune.objectives import (
    DEFAULT_MODEL_TRIALS,
    Job,
    Settings,
    tune_measured,
    tune_model,
)
from einfuse.autotune.providers import parse_schedule
from einfuse.autotune.result import ProgramTuneResult, TuneResult
from einfuse.autotune.screen import ModelEvaluator, ModelUnavailable
from einfuse.autotune.shares import check_worker
from einfuse.autotune.space import SpaceOptions, build_space
from einfuse.autotune.store import (
    BEST_ATTR,
    IMPORTED_ATTR,
    KEY_ATTR,
    BestRecord,
    StoreError,
    TuningStore,
    quiet_optuna,
    storage_exists,
)
from einfuse.backends.backend import Backend, get_backend
from einfuse.compile_path import canonicalize, region_key, region_sizes, trace_canonical
from einfuse.ir.cascade import Cascade, bind_sizes
from einfuse.ir.errors import EinfuseError
from einfuse.targets import check_measurable, resolve_target

if TYPE_CHECKING:
    from einfuse.cost_model.target import Target

Objective = Literal["model", "measure", "hybrid"]
OBJECTIVES = ("model", "measure", "hybrid")


def autotune(
    cascade_or_function: Cascade | Callable[..., Any],
    *args: Any,
    target: str | Target | None = None,
    objective: Objective = "model",
    trials: int | None = None,
    timeout: float | None = None,
    storage: Any = None,
    study: str | None = None,
    sizes: Mapping[str, int] | None = None,
    progress: bool = True,
    seed: int = 0,
    space_options: SpaceOptions | None = None,
    backend: Backend | str | None = None,
    warmup: int = 1,
    repeats: int = 5,
    finalists: int | None = None,
    model_trials: int = DEFAULT_MODEL_TRIALS,
    compile_timeout: float = 300.0,
    fresh: bool | datetime = False,
    worker: tuple[int, int] | None = None,
    workers: int = 1,
) -> TuneResult | ProgramTuneResult:
    """Tune a cascade (bound by ``sizes``) or a JAX function (traced with ``args``).

    ``trials`` is the number of points the model scores (``model``, default 20,000) or of
    candidates measured (``measure``/``hybrid``, default 8); ``model_trials`` is the hybrid's
    screening budget. ``finalists`` caps the final race to the best few measured candidates
    (and the default); by default every measured candidate races. ``storage`` is a storage
    URL, ``journal:PATH``, ``memory``, a ``.json`` export to replay, or None for the per-user
    SQLite file. ``timeout`` bounds the
    measuring (seconds). ``fresh`` tunes again even where a choice is stored (stored trials
    are kept; new ones are added); a datetime: the start of the run this worker is part of.
    A function is lifted and each distinct cascade tuned.
    ``backend`` (a name, default ``jax``) emits the candidates; it is part of the key.
    ``worker=(i, N)`` does worker ``i``'s share of a study N processes share and stores no
    choice; ``workers=N`` then decides from what they stored (see `shares`).
    """
    if objective == "pareto":  # a whole program's pruning, under a quality bound
        raise EinfuseError(
            "objective pareto searches a program's pruning against a quality metric: call "
            "einfuse.autotune.pareto.pareto_search(f, calibration, metric, max_loss=...)"
        )
    if objective not in OBJECTIVES:
        raise EinfuseError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    settings = Settings(
        objective=objective,
        trials=trials,
        timeout=timeout,
        study=study,
        progress=progress,
        seed=seed,
        space_options=space_options,
        backend=get_backend(backend),
        warmup=warmup,
        repeats=repeats,
        finalists=finalists,
        model_trials=model_trials,
        compile_timeout=compile_timeout,
        fresh=fresh,
        worker=worker,
        workers=worker[1] if worker else workers,
    )
    check_worker(worker)
    target_obj = _target(target, calibrate=objective != "measure")
    if objective != "model":
        check_measurable(target_obj.name, objective)
    store = storage if isinstance(storage, TuningStore) else TuningStore(storage)
    if isinstance(cascade_or_function, Cascade):
        return _tune(*_canonical(cascade_or_function, sizes), target_obj, store, settings)
    if not callable(cascade_or_function):
        raise EinfuseError(f"autotune needs a Cascade or a function, got {cascade_or_function!r}")
    results = [
        _tune(cascade, bound, target_obj, store, settings)
        for cascade, bound in _regions(cascade_or_function, args)
    ]
    return ProgramTuneResult(tuple(results))


def _target(target: str | Target | None, calibrate: bool) -> Target:
    """A target by name (``einfuse.targets``); None is the device JAX runs on here."""
    from einfuse.cost_model.target import get_target

    if target is None:
        target = resolve_target(None)
    return get_target(target, calibrate=calibrate) if isinstance(target, str) else target


def _bind(cascade: Cascade, sizes: Mapping[str, int] | None) -> tuple[Cascade, dict[str, int]]:
    """The cascade at ``sizes`` and every rank's size. A size given for a rank the cascade
    declares at another number replaces it (tuning a spec at another size), so the emitted
    programs and the model see the same sizes."""
    sizes = dict(sizes or {})
    ranks = set(cascade.all_ranks())
    resized = {
        r: int(n)
        for r, n in sizes.items()
        if r in ranks and isinstance(cascade.size(r), int) and cascade.size(r) != int(n)
    }
    if resized:
        cascade = cascade.with_sizes(**resized)
    try:
        return cascade, bind_sizes(cascade, sizes)
    except ValueError as exc:
        raise EinfuseError(f"autotune needs every size bound: {exc} (pass sizes=...)") from exc


def _canonical(cascade: Cascade, sizes: Mapping[str, int] | None) -> tuple[Cascade, dict[str, int]]:
    """The canonical form (`compile_path`) of a cascade bound to ``sizes``, and its sizes."""
    bound, bound_sizes = _bind(cascade, sizes)
    canonical = canonicalize(bound)
    ranks = set(canonical.all_ranks())
    return canonical, {r: n for r, n in bound_sizes.items() if r in ranks}


def _regions(function: Callable[..., Any], args: tuple[Any, ...]) -> Iterator[tuple[Cascade, dict]]:
    """Each distinct canonical region of a traced function (as ``einfuse.jit`` compiles it),
    with its sizes from the trace."""
    program = trace_canonical(function, args)
    seen: set[tuple[str, tuple]] = set()
    for region in program.regions:
        bound = region_sizes(program, region)
        marker = (region.cascade.fingerprint(), tuple(sorted(bound.items())))
        if marker not in seen:
            seen.add(marker)
            yield region.cascade, bound


def _tune(
    cascade: Cascade, sizes: dict[str, int], target: Target, store: TuningStore, s: Settings
) -> TuneResult:
    key = region_key(cascade, sizes, target, s.backend.name)
    space = build_space(cascade, target, sizes, _for_backend(s.space_options, s.backend))
    name = s.study or key.study_name("model" if s.objective == "model" else "measured")
    with quiet_optuna():
        study = store.study(name, key)
        with store.guard():
            stored_key = study.user_attrs.get(KEY_ATTR)
        if stored_key is not None and TuningKey.from_dict(stored_key) != key:
            raise StoreError(
                f"study {name!r} in {store.where} holds results for another key "
                f"({TuningKey.from_dict(stored_key).to_dict()}); pick another --study"
            )
        evaluator = _evaluator(
            cascade, target, sizes, required=s.objective != "measure", backend=s.backend.name
        )
        job = Job(cascade, sizes, target, key, space, store, study, s, evaluator)
        with store.guard():
            attrs = study.user_attrs
        if attrs.get(IMPORTED_ATTR) and BEST_ATTR in attrs and not s.fresh:
            return job.result(BestRecord.from_dict(attrs[BEST_ATTR]), reused=True)
        if s.objective == "model":
            return tune_model(job)
        return tune_measured(job)


def _for_backend(options: SpaceOptions | None, backend: Backend) -> SpaceOptions:
    """The space a backend can carry out: no placement params where it places nothing
    (JAX: XLA decides where tensors live), so no stored Schedule claims a placement."""
    options = replace(options or SpaceOptions(), backend=backend.name)
    if backend.placements:
        return options
    from einfuse.autotune.space import space_providers

    names = options.providers if options.providers is not None else tuple(space_providers())
    return replace(options, providers=tuple(n for n in names if n != "placement"))


def _evaluator(
    cascade: Cascade, target: Target, sizes: dict[str, int], *, required: bool, backend: str
) -> ModelEvaluator | None:
    try:
        return ModelEvaluator(cascade, target, sizes, backend)
    except ModelUnavailable:
        if required:
            raise
        return None


# --------------------------------------------------------------------------- reuse
def lookup_best(key: TuningKey, storage: Any = None) -> Any:
    """The stored Schedule for ``key`` (measured preferred over model), or None."""
    record = _lookup(key, storage)
    return None if record is None else parse_schedule(record.schedule)


def tuned_pipeline(
    cascade: Cascade,
    sizes: Mapping[str, int] | None = None,
    target: str | Target | None = None,
    storage: Any = None,
    backend: str = "jax",
) -> tuple[str, Any] | None:
    """``(pipeline, Schedule)`` stored for this cascade, sizes, target and backend, or None.

    For ``einfuse.jit``: never tunes, never measures, never calibrates; ``storage`` as in
    `autotune` (a ``.json`` export replays it). The key is that of the canonical cascade,
    as `autotune` stored it; the Schedule names that cascade's ranks.
    """
    return tuned_lookup(cascade, sizes, target, storage, backend)[1]


def tuned_lookup(
    cascade: Cascade,
    sizes: Mapping[str, int] | None = None,
    target: str | Target | None = None,
    storage: Any = None,
    backend: str = "jax",
) -> tuple[TuningKey, tuple[str, Any] | None]:
    """The key `tuned_pipeline` looks up, and what it finds (so a miss can name the key)."""
    key = region_key(*_canonical(cascade, sizes), _target(target, calibrate=False), backend)
    record = _lookup(key, storage)
    return key, None if record is None else (record.pipeline, parse_schedule(record.schedule))


def _lookup(key: TuningKey, storage: Any) -> BestRecord | None:
    """A stored record; a store file that does not exist yet is not created by looking."""
    if isinstance(storage, str | None) and not storage_exists(storage):
        return None
    with quiet_optuna():
        store = storage if isinstance(storage, TuningStore) else TuningStore(storage)
        return store.best(key)
