"""``einfuse.jit``: compile a JAX function through the Einsum-cascade IR, used like ``jax.jit``.

The compiled object *is* a ``jax.jit`` of a staging function, so argument handling, static
and donated arguments, the compile cache and per-call dispatch are JAX's own (and cost what
they cost ``jax.jit``). When JAX traces it for a new signature, the staging function traces
the user's function to a jaxpr, lifts it to a Program (cascades plus opaque equations), runs
the pipeline's program passes on the whole Program and its region passes on every region,
and emits the result into JAX's trace, so the whole program is one XLA computation and
``grad``/``vmap`` apply to the emitted code.

Every stage can be stopped at: ``.trace(...)`` (the jaxpr and Program), ``.cascade(...)``
(the program as text), ``.lower(...)`` (jax's ``Lowered``), ``.hlo(...)`` and ``.explain(...)``.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
from jax._src import core

from einfuse.backends.backend import get_backend
from einfuse.backends.program import ProgramRunner
from einfuse.compile_path import Compiled, lift_canonical, region_sizes, run_pipeline
from einfuse.einsum_cascade.lift import Program, Region, format_program
from einfuse.ir.errors import EinfuseError
from einfuse.targets import RUNNABLE, resolve_target


@dataclass(frozen=True)
class Traced:
    """One specialization: the jaxpr, the lifted (canonical) and the passed Program, the runner.

    ``compiled`` holds, per region, the pipeline run on its canonical cascade (`compile_path`).
    """

    jaxpr: core.ClosedJaxpr
    lifted: Program
    program: Program
    out_tree: Any
    runner: ProgramRunner
    seconds: dict[str, float] = field(default_factory=dict)
    compiled: tuple[Compiled, ...] = ()
    tuning: tuple[str, ...] = ()  # per region, with autotune: what was looked up and found
    program_passes: tuple[tuple[str, Program], ...] = ()  # after each program pass (pruning)
    program_tuning: str = ""  # with autotune: the stored pruning choice of the whole program

    @property
    def pass_history(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        """Per region, ``(pass, cascade text)`` after each pass of its pipeline."""
        return tuple(c.history() for c in self.compiled)

    def cascade(self) -> str:
        return format_program(self.program)


class NoTunedResultWarning(UserWarning):
    """``autotune`` was asked for, but the store holds no result for some regions."""


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int


def jit(
    fun: Callable[..., Any] | None = None,
    *,
    passes: str | None = None,
    target: str | None = None,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
    autotune: Any = None,
    backend: str = "jax",
) -> Any:
    """Compile ``fun`` through einfuse; usable as ``@einfuse.jit`` or ``@einfuse.jit(...)``.

    ``passes`` is a pipeline (``"fuse{tile=256}"``) run on every lifted region, after any
    program passes that lead it (``"prune-tokens{keep=0.5,start=2},fuse"``) ran on the
    whole lifted program; ``target``
    (a name of ``einfuse.targets``: ``cpu``, ``h100``, ``h200``, ``a100``, ``tpu_v5e``, or
    ``gpu``/``tpu`` for the device JAX runs on; None: that device) names the hardware whose
    tuned results are reused (placement follows JAX's default device, as with ``jax.jit``);
    the static and donated arguments mean what they mean to ``jax.jit``.
    ``autotune`` (True for the default tuning database, or a storage URL, ``journal:PATH``
    or an exported ``.json``) reuses what ``einfuse autotune`` stored for each region with
    these shapes and target, in place of ``passes``, and the pruning pipeline an
    ``--objective pareto`` search stored for the whole program (where ``passes`` names no
    program pass); it never searches at compile time.
    ``backend`` names what emits the regions (``einfuse.backends.backend``; ``jax``).
    """
    options = dict(
        passes=passes,
        target=target,
        static_argnums=static_argnums,
        static_argnames=static_argnames,
        donate_argnums=donate_argnums,
        autotune=autotune,
        backend=backend,
    )
    if fun is None:
        return lambda f: JitFunction(f, **options)
    return JitFunction(fun, **options)


def _tuple(x: Any) -> tuple:
    return (x,) if isinstance(x, int | str) else tuple(x)


class JitFunction:
    """The compiled callable ``einfuse.jit`` returns."""

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        passes: str | None,
        target: str | None,
        static_argnums: int | Sequence[int],
        static_argnames: str | Sequence[str],
        donate_argnums: int | Sequence[int],
        autotune: Any,
        backend: str = "jax",
    ) -> None:
        if target is not None and target not in RUNNABLE:
            raise EinfuseError(
                f"unknown target {target!r} for einfuse.jit; one of {', '.join(RUNNABLE)}"
            )
        from einfuse.passes.manager import split_pipeline

        # Fails at decoration time on a bad pipeline. Program passes (prune-tokens) run on the
        # whole lifted program first; the region pipeline then runs on each region.
        self.program_passes, self.region_passes = split_pipeline(passes)
        functools.update_wrapper(self, fun)
        self.fun, self.passes, self.target = fun, passes or None, target
        self.backend = get_backend(backend)  # an unknown name fails at decoration time
        # None: no tuning database; True: the default one; else a storage spec or URL.
        self.autotune = autotune
        self.static_argnums, self.static_argnames = _resolve_statics(
            fun, _tuple(static_argnums), _tuple(static_argnames)
        )
        self._entries: dict[Any, Traced] = {}
        self._hits = self._misses = 0
        self._warned: set[str] = set()  # key digests already warned about

        @functools.wraps(fun)
        def staged(*args: Any, **kwargs: Any) -> Any:
            return self._staged(args, kwargs)

        jit_args: dict[str, Any] = {
            "static_argnums": self.static_argnums,
            "static_argnames": tuple(sorted(self.static_argnames)),
            "donate_argnums": _tuple(donate_argnums),
        }
        self._staged_fn, self._jit_args = staged, jit_args
        self._jitted = jax.jit(staged, **jit_args)

    @functools.cached_property
    def _top(self) -> Any:
        """The jit a top-level call uses: with the options that let collectives overlap compute
        and, where the pipeline (or a stored one) may split them, keep them apart
        (xla_overlap); None where there are none (this CPU, nothing split). Built at the first
        call, not at decoration: the options depend on the backend JAX initializes. JAX takes
        compiler options only on a top-level jit, so a call under a transformation uses the
        plain one."""
        from einfuse.backends.xla_overlap import top_level_options
        from einfuse.passes.manager import parse_pipeline
        from einfuse.passes.overlap_report import SPLITTING_PASSES

        split = any(s.name in SPLITTING_PASSES for s in parse_pipeline(self.region_passes))
        apart = split or self.autotune is not None
        options = top_level_options(keep_collectives_apart=apart)
        if not options:
            return None
        return jax.jit(self._staged_fn, compiler_options=options, **self._jit_args)

    # -- calling ---------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        misses = self._misses
        out = self._for_call(args, kwargs)(*args, **kwargs)
        self._hits += self._misses == misses
        return out

    def _for_call(self, args: tuple, kwargs: dict) -> Any:
        """The jit with the compile options at top level; the plain one under a trace."""
        if self._top is None:
            return self._jitted
        return self._top if core.trace_state_clean() else self._jitted

    def cache_info(self) -> CacheInfo:
        """Calls served without tracing (hits), specializations traced (misses)."""
        return CacheInfo(self._hits, self._misses, len(self._entries))

    def clear_cache(self) -> None:
        self._entries.clear()
        self._jitted.clear_cache()
        if self.__dict__.get("_top") is not None:
            self._top.clear_cache()

    def _split(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, list[Any], tuple, tuple]:
        """The signature key and the dynamic leaves of one call (tracers or arrays)."""
        n = len(args)
        static_pos = sorted({i % n for i in self.static_argnums if -n <= i < n})
        statics = tuple((i, args[i]) for i in static_pos)
        static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames))
        dyn_args = tuple(a for i, a in enumerate(args) if i not in static_pos)
        dyn_kw = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        leaves, tree = jax.tree_util.tree_flatten((dyn_args, dyn_kw))
        avals = tuple(_leaf_aval(x) for x in leaves)
        return (tree, avals, statics, static_kw), leaves, statics, static_kw

    def _staged(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Runs under ``jax.jit``'s trace: lift and emit on a new signature, then stage."""
        key, leaves, statics, static_kw = self._split(args, kwargs)
        traced = self._entries.get(key)
        if traced is None:
            self._misses += 1
            traced = self._compile(key[0], key[1], statics, static_kw)
            self._entries[key] = traced
        return jax.tree_util.tree_unflatten(traced.out_tree, traced.runner(*leaves))

    # -- compiling -------------------------------------------------------------
    def _compile(self, tree: Any, avals: tuple, statics: tuple, static_kw: tuple) -> Traced:
        out_tree: list[Any] = []
        static_at = dict(statics)

        def flat_fun(*leaves: Any) -> list[Any]:
            a, kw = jax.tree_util.tree_unflatten(tree, leaves)
            it = iter(a)
            full = [
                static_at[i] if i in static_at else next(it) for i in range(len(a) + len(statics))
            ]
            out, tree_out = jax.tree_util.tree_flatten(self.fun(*full, **kw, **dict(static_kw)))
            out_tree.append(tree_out)
            return out

        structs = [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in avals]
        t0 = time.perf_counter()
        closed = jax.make_jaxpr(flat_fun)(*structs)
        t1 = time.perf_counter()
        lifted = lift_canonical(closed, check=bool(self.passes))
        t2 = time.perf_counter()
        passed, history = lifted, ()
        program_passes, program_tuning = self._program_pipeline(lifted)
        if program_passes:
            from einfuse.passes.program import run_program_passes

            result = run_program_passes(lifted, program_passes)
            passed, history = result.program, result.history
        compiled, tuning = self._run_passes(passed, warn=not program_tuning)
        program = passed.with_regions(
            [r.with_cascade(c.cascade, c.schedule) for r, c in zip(passed.regions, compiled)]
        )
        t3 = time.perf_counter()
        runner = ProgramRunner(program, self.backend)
        seconds = dict(trace=t1 - t0, lift=t2 - t1, passes=t3 - t2, emit=time.perf_counter() - t3)
        return Traced(
            closed,
            lifted,
            program,
            out_tree[0],
            runner,
            seconds,
            compiled,
            tuning,
            history,
            program_tuning,
        )

    def _program_pipeline(self, lifted: Program) -> tuple[Any, str]:
        """The program passes to run: those of ``passes``; with ``autotune`` and none given,
        the pruning pipeline a Pareto search stored for this program (`autotune.pareto`),
        and a note saying what was found."""
        if self.program_passes or self.autotune is None:
            return self.program_passes, ""
        from einfuse.autotune.pareto import tuned_program

        storage = None if self.autotune is True else self.autotune
        _, record = tuned_program(lifted, resolve_target(self.target), storage, self.backend.name)
        if record is None or record.objective != "pareto":
            return self.program_passes, ""
        return record.pipeline, f"pruning chosen by a pareto search: {record.pipeline or 'none'}"

    def _run_passes(
        self, program: Program, warn: bool = True
    ) -> tuple[tuple[Compiled, ...], tuple[str, ...]]:
        """Each canonical region through its pipeline: the tuned one if stored, else ``passes``.
        ``warn``: warn about regions with nothing stored (not when a pruning choice was
        found: its pruned regions have their own shapes, tuned or not)."""
        looked_up = [self._tuned(program, region) for region in program.regions]
        tuning = self._tuning_notes(looked_up, warn)
        out = []
        from einfuse.passes.overlap_common import cost_target

        with cost_target(resolve_target(self.target)):  # prices ``chunks=auto`` and the like
            for region, (_, tuned) in zip(program.regions, looked_up):
                pipeline, schedule = tuned if tuned else (self.region_passes or None, None)
                out.append(run_pipeline(region.cascade, pipeline, schedule, check=bool(pipeline)))
        return tuple(out), tuning

    def _tuned(self, program: Program, region: Region) -> tuple[Any, tuple[str, Any] | None]:
        """The key of this region, and the pipeline and Schedule stored for it (or None)."""
        if self.autotune is None:
            return None, None
        from einfuse.autotune.tuner import tuned_lookup

        storage = None if self.autotune is True else self.autotune
        sizes = region_sizes(program, region)
        target = resolve_target(self.target)
        return tuned_lookup(region.cascade, sizes, target, storage, self.backend.name)

    def _tuning_notes(self, looked_up: list[tuple[Any, Any]], warn: bool) -> tuple[str, ...]:
        """Per region what autotune found; warns once per key about regions with nothing."""
        if self.autotune is None:
            return ()
        from einfuse.autotune.store import describe_storage

        where = describe_storage(self.autotune if isinstance(self.autotune, str) else None)
        fallback = f"passes {self.passes or 'none'}"
        notes, missing = [], []
        for k, (key, tuned) in enumerate(looked_up):
            if tuned is not None:
                notes.append(f"tuned {tuned[0] or '(no pass)'}; schedule {tuned[1]}")
                continue
            sizes = ",".join(f"{r}={n}" for r, n in key.sizes)
            what = f"key {key.digest()} ({key.target} on {key.device_kind}, sizes {sizes})"
            notes.append(f"nothing stored for {what} in {where}; ran {fallback}")
            if key.digest() not in self._warned:
                self._warned.add(key.digest())
                missing.append(f"region {k}: {what}")
        if missing and warn:
            warnings.warn(
                f"einfuse.jit({_name(self.fun)}, autotune=...): {where} holds no tuned result "
                f"for {'; '.join(missing)}; these run {fallback}. Tune them with `einfuse autotune "
                f"FILE.py:FUNCTION --args ... --target {looked_up[0][0].target}`.",
                NoTunedResultWarning,
                stacklevel=2,
            )
        return tuple(notes)

    # -- inspection ------------------------------------------------------------
    def trace(self, *args: Any, **kwargs: Any) -> Traced:
        """The specialization for these arguments (traced now if it is new)."""
        key = self._split(args, kwargs)[0]
        if key not in self._entries:
            self._jitted.trace(*args, **kwargs)
        return self._entries[key]

    def cascade(self, *args: Any, **kwargs: Any) -> str:
        """The lifted (and passed) program: cascades in the IR text form, opaque ops as comments."""
        return self.trace(*args, **kwargs).cascade()

    def lower(
        self, *args: Any, lowering_platforms: tuple[str, ...] | None = None, **kwargs: Any
    ) -> jax.stages.Lowered:
        """JAX's ``Lowered``; ``lowering_platforms=("cuda",)`` (or ``"tpu"``) lowers for a
        platform this machine lacks: StableHLO to read, not to compile here."""
        if lowering_platforms is None:
            return (self._top or self._jitted).lower(*args, **kwargs)
        traced = self._jitted.trace(*args, **kwargs)
        return traced.lower(lowering_platforms=tuple(lowering_platforms))

    def hlo(self, *args: Any, stage: str = "optimized", **kwargs: Any) -> str:
        from einfuse.backends.inspection import hlo_text

        return hlo_text(self.lower(*args, **kwargs), stage)  # type: ignore[arg-type]

    def explain(self, *args: Any, **kwargs: Any) -> str:
        """What was lifted, what stayed opaque (with source lines), the passes, and XLA's view."""
        from einfuse.backends.inspection import inspect_hlo

        traced = self.trace(*args, **kwargs)
        passes = self.passes or "none"
        if self.autotune is not None:
            passes += f" (stored results first: autotune={self.autotune!r})"
        text = explain_program(traced, passes, self.target, _name(self.fun))
        from einfuse.explain_pruning import pruning_lines

        text += pruning_lines(
            traced.program, traced.runner.environment, self._split(args, kwargs)[1]
        )
        summary = inspect_hlo(self.lower(*args, **kwargs)).table()
        return text + "\nHLO summary:\n" + summary + "\n"


def explain_program(traced: Traced, passes: str | None, target: str | None, name: str) -> str:
    """The text part of ``explain`` (everything but the HLO summary)."""
    p = traced.program
    regions, opaques = p.regions, p.opaques
    n_einsums = sum(len(r.cascade.einsums) for r in regions)
    lines = [
        f"einfuse.jit({name}): target {target or 'default device'}, passes {passes or 'none'}",
        f"lifted {len(regions)} region(s) with {n_einsums} Einsum(s); {len(opaques)} opaque op(s)",
        f"timings: {', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in traced.seconds.items())}",
        "",
    ]
    if traced.program_tuning:
        lines[-1:-1] = [f"autotune: {traced.program_tuning}"]
    for k, r in enumerate(regions):
        ops = Counter(r.primitives)
        reduced = [e for e in r.cascade.einsums if e.reduced_ranks]
        contractions = sum(1 for e in reduced if e.reduce == "sum" and len(e.inputs) >= 2)
        reductions = Counter(e.reduce for e in reduced if e.reduce != "sum" or len(e.inputs) < 2)
        fallback = traced.runner.fallbacks.get(k)
        lines.append(
            f"region {k}: {len(r.cascade.einsums)} Einsums ({contractions} contractions, "
            f"reductions {dict(reductions) or 'none'}), derivative {r.derivative}, "
            f"at {_lines(r)}"
        )
        lines.append("  from " + ", ".join(f"{op} x{n}" for op, n in ops.most_common()))
        if r.cascade.devices:
            lines.append("  " + _collectives_line(r))
        if fallback:
            lines.append(f"  runs as plain JAX: {fallback}")
        if k < len(traced.tuning):
            lines.append(f"  autotune: {traced.tuning[k]}")
        compiled = traced.compiled[k] if k < len(traced.compiled) else None
        lines += [f"  {step.verdict()}" for step in (compiled.steps if compiled else ())]
        emitted = traced.runner.emitted.get(k)
        loops = emitted.loops() if emitted is not None else []
        lines += [f"  emitted: {loop.describe()}" for loop in loops]
        lines += [f"  emitted: {note}" for note in (emitted.notes if emitted else [])]
    if opaques:
        lines.append("")
        lines.append("opaque ops (bound unchanged):")
        lines += [
            f"  {o.label} at {o.source}" + (f": {o.reason}" if o.reason else "") for o in opaques
        ]
    return "\n".join(lines) + "\n"


def _collectives_line(region: Region) -> str:
    """A sharded region's mesh and what each communicating Einsum needs."""
    from einfuse.ir.devices import collectives

    mesh = region.mesh.shape if region.mesh is not None else None
    mesh_text = ", ".join(f"{a}={n}" for a, n in mesh.items()) if mesh else "from jax.devices()"
    moves = [f"{m.kind} {m.einsum} on {m.axis}" for m in collectives(region.cascade)]
    return f"shard_map over mesh {mesh_text}; collectives: {', '.join(moves) or 'none'}"


def _lines(region: Region) -> str:
    locs = [e.loc for e in region.cascade.einsums if e.loc is not None]
    if not locs:
        return "<unknown>"
    by_file: dict[str, list[int]] = {}
    for loc in locs:
        by_file.setdefault(loc.file, []).append(loc.line)
    return "; ".join(f"{f}:{min(ls)}-{max(ls)}" for f, ls in by_file.items())


def _name(fun: Any) -> str:
    return getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None) or repr(fun)


def _leaf_aval(x: Any) -> tuple[tuple[int, ...], Any, bool]:
    """(shape, dtype, weak_type) of an argument leaf: a tracer under ``jax.jit``, else a value."""
    aval = x.aval if isinstance(x, core.Tracer) else jax.typeof(x)
    return tuple(aval.shape), aval.dtype, bool(getattr(aval, "weak_type", False))


def _resolve_statics(
    fun: Callable[..., Any], nums: tuple[int, ...], names: tuple[str, ...]
) -> tuple[tuple[int, ...], frozenset[str]]:
    """Static positions and names, each completed from the other through the signature."""
    nums_set, names_set = set(nums), set(names)
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return tuple(sorted(nums_set)), frozenset(names_set)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(positional):
        if p.name in names_set and p.kind == p.POSITIONAL_OR_KEYWORD:
            nums_set.add(i)
        if (i in nums_set or i - len(positional) in nums_set) and p.kind == p.POSITIONAL_OR_KEYWORD:
            names_set.add(p.name)
    return tuple(sorted(nums_set)), frozenset(names_set)
