"""Compile, check and time candidates on this machine, failures returned as data.

A candidate may only be timed after it computed the right numbers: its full-size outputs are
compared, on a prefix of a sliceable output rank (the first few queries of attention), with the
float64 reference interpreter run on the same prefix of the inputs, so no oracle ever builds an
S x S matrix (jax#24539). A cascade with no such rank is checked whole when its reference stays
small (no intermediate above 4M elements: `WHOLE_CHECK_ELEMENTS`), else at reduced sizes with
the same pipeline and at least two tiles of every partitioned rank.

Anything that goes wrong (pipeline, emission, compilation, predicted or real out-of-memory,
a compile that takes too long, wrong numbers) becomes a `Failure` with a one-line reason;
nothing raises out of `Bench.prepare`, so one bad candidate never aborts a search.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from einfuse.autotune.space import PIPELINE_KINDS, Candidate
from einfuse.autotune.timing import Timing, time_interleaved
from einfuse.backends.backend import Backend, get_backend
from einfuse.ir.cascade import Cascade, bind_sizes
from einfuse.ir.errors import EinfuseError
from einfuse.ir.expr import Var, accesses, size_refs

CHECK_ROWS = 8
WHOLE_CHECK_ELEMENTS = 1 << 22  # a full-size reference only below this (32 MiB of float64)
REDUCED_SIZE = 16
TOLERANCE = {"float64": 1e-9, "float32": 1e-3, "bfloat16": 3e-2, "float16": 3e-2}
MEMORY_FRACTION = 0.8  # of MemAvailable a candidate's predicted footprint may take


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a candidate cannot win; ``state`` is ``fail`` (it broke) or ``pruned`` (skipped)."""

    reason: str
    state: Literal["fail", "pruned"] = "fail"


@dataclass(frozen=True, slots=True)
class Prepared:
    """A compiled, numerically checked candidate, ready to time with ``call()``."""

    candidate: Candidate
    call: Callable[[], Any]
    compile_s: float
    check: str
    check_error: float
    hlo: str = ""  # `hlo_fingerprint` of the program timed: what ``einfuse.jit`` must replay


# --------------------------------------------------------------------------- backends
def consumed(backend: Backend) -> frozenset[str]:
    """Param kinds and names whose values change the program: the pipeline's, and the
    Schedule fields ``backend`` declares it reads (see `einfuse.backends.backend`)."""
    return PIPELINE_KINDS | backend.schedule_fields


def jax_backend() -> Backend:
    return get_backend("jax")


def program_hlo(
    cascade: Cascade,
    sizes: Mapping[str, int],
    pipeline: str,
    schedule: Any,
    backend: Backend | str | None = None,
) -> str:
    """`hlo_fingerprint` of the program a candidate of a canonical cascade emits, as `Bench`
    lowers it: what ``einfuse.jit`` must run when it replays that candidate."""
    import jax

    from einfuse.backends.inspection import hlo_fingerprint
    from einfuse.compile_path import run_pipeline

    transformed = run_pipeline(cascade, pipeline, schedule).cascade
    fn = get_backend(backend).emit(transformed, bind_sizes(transformed, sizes), schedule)
    structs = [
        jax.ShapeDtypeStruct(cascade.tensor_shape(t.name, sizes), t.dtype) for t in cascade.inputs
    ]
    return hlo_fingerprint(jax.jit(fn).lower(*structs))


# --------------------------------------------------------------------------- inputs
def random_inputs(cascade: Cascade, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Small non-zero float64 inputs: random signs, magnitudes uniform in [0.5, 1].

    Integer inputs get 0 or 1. Bounded magnitudes keep float32 from overflowing where float64
    does not (a padding mask written ``(1 - mask) * finfo.min`` stays finite or goes to -inf,
    never to +inf), so the reference and a candidate disagree only where the candidate is wrong.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for t in cascade.inputs:
        shape = cascade.tensor_shape(t.name, sizes)
        if np.dtype(t.dtype).kind in "biu":  # masks and flags: 0 or 1
            out[t.name] = rng.integers(0, 2, shape).astype(np.float64)
        else:
            out[t.name] = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.0, shape)
    return out


def sliceable_rank(cascade: Cascade, sizes: Mapping[str, int]) -> str | None:
    """The largest rank whose output prefix depends only on the same prefix of the inputs.

    It must index every output, never be reduced, appear only as a plain index or a value
    (a causal mask's ``m <= p`` is fine: a prefix keeps its indices), never as a size, and
    take no part in a partition or another rank's size.
    """
    split = {r for p in cascade.partitions for r in (p.rank, p.outer, p.inner)}
    size_symbols = {
        s.name
        for r, value in cascade.sizes
        if not isinstance(value, int)
        for s in getattr(value, "free_symbols", ())
    }
    candidates = []
    for rank in cascade.all_ranks():
        if rank in split or rank.upper() in size_symbols:
            continue
        if not all(rank in cascade.tensor_ranks(o) for o in cascade.outputs):
            continue
        if _plain_everywhere(cascade, rank):
            candidates.append(rank)
    return max(candidates, key=lambda r: sizes.get(r, 0), default=None)


def _plain_everywhere(cascade: Cascade, rank: str) -> bool:
    """``rank`` is never reduced or sized, and indexes only dims that are ``rank`` themselves."""
    for e in cascade.einsums:
        if rank in e.reduced_ranks or e.iterative_rank == rank or rank in size_refs(e.expr):
            return False
        reads = [(e.output, e.indices), *((a.tensor, a.indices) for a in accesses(e.expr))]
        for tensor, indices in reads:
            dims = cascade.tensor_ranks(tensor)
            for dim, index in enumerate(indices):
                if rank in _vars(index) and (index != Var(rank) or dims[dim] != rank):
                    return False
    return True


def _vars(expr: Any) -> set[str]:
    return {x.rank for x in expr.walk() if isinstance(x, Var)}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|; inf where NaN or inf appear where they should not."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    same_special = (np.isnan(got) & np.isnan(want)) | (np.isinf(want) & (got == want))
    if np.any(~np.isfinite(got) & ~same_special):
        return float("inf")
    finite = np.isfinite(want)
    scale = float(np.max(np.abs(want[finite]), initial=0.0)) or 1.0
    diff = np.abs(got[finite] - want[finite])
    return float(np.max(diff, initial=0.0)) / scale


def available_memory_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("inf")


def describe_error(exc: BaseException) -> str:
    """A one-line reason, classified: out of memory, or the exception's first line."""
    text = str(exc).strip().splitlines()
    first = f"{type(exc).__name__}: {text[0] if text else _where(exc)}".strip()
    if (
        isinstance(exc, MemoryError)
        or "RESOURCE_EXHAUSTED" in str(exc)
        or "Out of memory" in (str(exc))
    ):
        return f"out of memory: {first}"
    return first[:500]


def _where(exc: BaseException) -> str:
    """For an exception without a message (a failed ``assert``): where it was raised, so
    the recorded reason points at the bug rather than reading "AssertionError:"."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "internal error (no message)"
    last = frames[-1]
    return f"internal error at {Path(last.filename).name}:{last.lineno} ({last.line or '?'})"


# --------------------------------------------------------------------------- the bench
class Bench:
    """One cascade at full size on this device: inputs made once, candidates compiled on demand."""

    def __init__(
        self,
        cascade: Cascade,
        sizes: Mapping[str, int],
        *,
        backend: Backend | None = None,
        seed: int = 0,
        compile_timeout_s: float = 300.0,
        memory_limit_bytes: float | None = None,
    ) -> None:
        import jax.numpy as jnp

        self.cascade = cascade
        self.sizes = dict(sizes)
        self.backend = get_backend(backend)
        self.seed = seed
        self.compile_timeout_s = compile_timeout_s
        self.memory_limit_bytes = memory_limit_bytes or MEMORY_FRACTION * available_memory_bytes()
        dtypes = {t.name: jnp.dtype(t.dtype) for t in cascade.inputs}
        drawn = random_inputs(cascade, self.sizes, seed)
        self.inputs = tuple(jnp.asarray(drawn[n], dtypes[n]) for n in dtypes)
        # the reference sees exactly the values the device got (after rounding to its dtype)
        self.host_inputs = {n: np.asarray(x, np.float64) for n, x in zip(dtypes, self.inputs)}
        compute = jnp.result_type(*(d for d in dtypes.values() if jnp.issubdtype(d, jnp.floating)))
        self.tolerance = TOLERANCE.get(jnp.dtype(compute).name, 3e-2)
        self.slice_rank = sliceable_rank(cascade, self.sizes)
        self._oracle: dict[str, np.ndarray] | None = None
        self._passes: dict[str, Cascade | Failure] = {}

    def transformed(self, pipeline: str) -> Cascade | Failure:
        """The cascade after ``pipeline`` (cached; a failing pass is a `Failure`)."""
        if pipeline not in self._passes:
            from einfuse.compile_path import run_pipeline

            try:
                self._passes[pipeline] = run_pipeline(self.cascade, pipeline).cascade
            except Exception as exc:
                reason = f"pipeline {pipeline!r} failed: {describe_error(exc)}"
                self._passes[pipeline] = Failure(reason)
        return self._passes[pipeline]

    def prepare(self, candidate: Candidate) -> Prepared | Failure:
        """Emit, compile, run once and check ``candidate``; never raises."""
        import jax

        from einfuse.backends.inspection import hlo_fingerprint
        from einfuse.compile_path import check_schedule

        cascade = self.transformed(candidate.pipeline)
        if isinstance(cascade, Failure):
            return cascade
        start = time.perf_counter()
        try:
            check_schedule(candidate.schedule, self.cascade, cascade)
            sizes = bind_sizes(cascade, self.sizes)
            fn = self.backend.emit(cascade, sizes, candidate.schedule)
            lowered = jax.jit(fn).lower(*self.inputs)
            hlo = hlo_fingerprint(lowered)
            compiled = lowered.compile()
        except Exception as exc:
            return Failure(f"compile failed: {describe_error(exc)}")
        need = _footprint_bytes(compiled)
        if need > self.memory_limit_bytes:
            return Failure(
                f"out of memory (predicted): needs {need / 2**30:.2f} GiB, limit "
                f"{self.memory_limit_bytes / 2**30:.2f} GiB",
                "pruned",
            )
        inputs = self.inputs
        try:
            outputs = jax.block_until_ready(compiled(*inputs))
        except Exception as exc:
            return Failure(f"run failed: {describe_error(exc)}")
        compile_s = time.perf_counter() - start
        if compile_s > self.compile_timeout_s:
            return Failure(
                f"timed out: compiling and one run took {compile_s:.1f} s "
                f"(limit {self.compile_timeout_s:g} s)"
            )
        try:
            check, error = self._check(candidate, cascade, outputs)
        except Exception as exc:
            return Failure(f"check failed: {describe_error(exc)}")
        if not error <= self.tolerance:
            return Failure(
                f"wrong numbers: relative error {error:.3g} > {self.tolerance:g} ({check})"
            )
        return Prepared(candidate, lambda: compiled(*inputs), compile_s, check, error, hlo)

    # -- numerics ---------------------------------------------------------------
    def _check(self, candidate: Candidate, cascade: Cascade, outputs: Any) -> tuple[str, float]:
        outputs = dict(zip(self.cascade.outputs, outputs))
        if self.slice_rank is not None:
            rows = min(CHECK_ROWS, self.sizes[self.slice_rank])
            want = self._prefix_oracle(rows)
            error = 0.0
            for name, ref in want.items():
                dim = self.cascade.tensor_ranks(name).index(self.slice_rank)
                got = np.take(np.asarray(outputs[name], np.float64), range(rows), axis=dim)
                error = max(error, relative_error(got, ref))
            return f"outputs at {self.slice_rank} < {rows} vs float64 reference", error
        whole = self._whole_oracle()
        if whole is not None:
            error = max(relative_error(outputs[name], ref) for name, ref in whole.items())
            return "whole outputs vs float64 reference", error
        return self._reduced_check(candidate, cascade)

    def _whole_oracle(self) -> dict[str, np.ndarray] | None:
        """The reference at full size, if no intermediate exceeds `WHOLE_CHECK_ELEMENTS`."""
        if self._oracle is None:
            from einfuse.backends.reference import interpret

            try:
                self._oracle = interpret(
                    self.cascade, self.host_inputs, self.sizes, max_elements=WHOLE_CHECK_ELEMENTS
                )
            except EinfuseError:
                return None
        return self._oracle

    def _prefix_oracle(self, rows: int) -> dict[str, np.ndarray]:
        if self._oracle is None:
            from einfuse.backends.reference import interpret

            rank = self.slice_rank
            assert rank is not None
            inputs = {}
            for t in self.cascade.inputs:
                x = self.host_inputs[t.name]
                if rank in t.ranks:
                    x = np.take(x, range(rows), axis=t.ranks.index(rank))
                inputs[t.name] = x
            sizes = {**self.sizes, rank: rows}
            self._oracle = interpret(self.cascade.with_sizes(**{rank: rows}), inputs, sizes)
        return self._oracle

    def _reduced_check(self, candidate: Candidate, cascade: Cascade) -> tuple[str, float]:
        """Same pipeline and schedule at small sizes (two tiles and the ragged remainder kept)."""
        import jax

        from einfuse.backends.reference import interpret

        tiles = {p.rank: int(p.tile) for p in cascade.partitions if isinstance(p.tile, int)}
        small = {}
        for rank, n in self.sizes.items():
            t = tiles.get(rank)
            small[rank] = min(n, 2 * t + n % t) if t else min(n, REDUCED_SIZE)
        original = self.cascade.with_sizes(**small)
        inputs = random_inputs(original, small, self.seed + 1)
        want = interpret(original, inputs, small)
        reduced = self.transformed_at(candidate.pipeline, small)
        if isinstance(reduced, Failure):
            raise RuntimeError(reduced.reason)
        fn = self.backend.emit(reduced, bind_sizes(reduced, small), candidate.schedule)
        args = [inputs[t.name].astype(t.dtype) for t in self.cascade.inputs]
        got = jax.jit(fn)(*args)
        error = max(relative_error(g, want[o]) for g, o in zip(got, self.cascade.outputs))
        return f"reduced sizes {small} vs float64 reference", error

    def transformed_at(self, pipeline: str, sizes: Mapping[str, int]) -> Cascade | Failure:
        from einfuse.passes.manager import run_passes

        try:
            return run_passes(self.cascade.with_sizes(**sizes), pipeline).cascade
        except Exception as exc:
            return Failure(f"pipeline {pipeline!r} failed: {describe_error(exc)}")

    # -- timing -----------------------------------------------------------------
    def time(
        self,
        prepared: Mapping[str, Prepared],
        *,
        warmup: int = 1,
        repeats: int = 5,
        seed: int = 0,
    ) -> dict[str, Timing]:
        """Time prepared candidates side by side, interleaved in shuffled rounds."""
        return time_interleaved(
            {name: p.call for name, p in prepared.items()},
            warmup=warmup,
            repeats=repeats,
            rng_seed=seed,
        )


def _footprint_bytes(compiled: Any) -> float:
    """Arguments + outputs + temporaries XLA plans for; 0 where it does not say."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return 0.0
    if stats is None:
        return 0.0
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return float(sum(getattr(stats, f, 0) or 0 for f in fields))
