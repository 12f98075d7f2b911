"""The JAX backend: any valid cascade as a pure, jit-able, vmap-able, differentiable function.

``emit_jax(cascade, sizes)`` returns a ``JaxCascade``: call it with the inputs in declaration
order (positionally or by name) to get a tuple of the outputs, or use ``.as_dict(...)`` for a
name -> array dict. Sizes missing from ``sizes`` are read off the input shapes at call (trace)
time, and each set of sizes is lowered once. The lowering (see ``jax_lower``) is data, so
``emit_jax_source`` prints exactly the statements that run.

Dtypes follow the IR's rule (``einfuse.ir.dtypes``): inputs are cast to their declared dtype
(every float input to ``dtype`` when given), each Einsum's result is stored in its output's
dtype, casts (``float32(x)``) are ``astype``, and outputs come back in their own dtypes. A
contraction of operands cast up (``float32(Q) * float32(K)``) is one ``einsum`` of the narrow
operands with ``preferred_element_type``, as JAX's own mixed-precision dot. With
``accumulate_dtype=jnp.float32`` every sum and contraction accumulates in float32, and the
softmax statistics (max/sum reductions that are not contractions, recurrence state, and maps
of those alone) are stored in at least float32, as flash-attention kernels do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from einfuse.backends.jax_lower import Names, Policy, lower_einsum
from einfuse.backends.jax_ops import Stmt, format_stmt, format_value, run
from einfuse.backends.jax_values import BackendUnsupported, TensorInfo, canonical_dtype
from einfuse.backends.reference import infer_sizes
from einfuse.ir.cascade import Cascade, bind_sizes
from einfuse.ir.dtypes import tensor_dtypes, with_input_dtype
from einfuse.ir.errors import EinfuseError
from einfuse.ir.schedule import Schedule
from einfuse.ir.verify import verify

__all__ = [
    "BackendUnsupported",
    "JaxCascade",
    "LoweredCascade",
    "emit_jax",
    "emit_jax_source",
    "lower_cascade",
]

DEFAULT_MAX_BLOWUP = 2.0


@dataclass(frozen=True, slots=True)
class LoweredCascade:
    """A cascade bound to sizes and dtypes, as statements ready to run or print."""

    inputs: tuple[tuple[str, TensorInfo], ...]
    outputs: tuple[str, ...]
    stmts: tuple[Stmt, ...]
    sizes: tuple[tuple[str, int], ...]
    out_dtypes: tuple[np.dtype, ...]

    def __call__(self, arrays: Mapping[str, Any]) -> dict[str, jax.Array]:
        env: dict[str, Any] = {}
        for name, info in self.inputs:
            x = jnp.asarray(arrays[name])
            if tuple(x.shape) != info.shape:
                raise EinfuseError(
                    f"input {name} has shape {tuple(x.shape)}, expected {info.shape}"
                )
            env[name] = x.astype(info.dtype)
        run(self.stmts, env)
        return {o: jnp.asarray(env[o]).astype(d) for o, d in zip(self.outputs, self.out_dtypes)}

    def source(self, fn_name: str = "cascade") -> str:
        """The emitted program as Python text: one line per Einsum, more for a scan."""
        args = ", ".join(name for name, _ in self.inputs)
        lines = [f"def {fn_name}({args}):"]
        sizes = ", ".join(f"{r}={n}" for r, n in self.sizes)
        lines.append(f"    # sizes: {sizes}")
        for name, info in self.inputs:
            lines.append(f"    # {name}: {format_value(info.dtype)}{list(info.shape)}")
        for s in self.stmts:
            lines.extend("    " + line for line in format_stmt(s))
        outs = ", ".join(self.outputs)
        lines.append(f"    return ({outs},)")
        return "\n".join(lines) + "\n"


def lower_cascade(
    cascade: Cascade,
    sizes: Mapping[str, int],
    *,
    dtype: Any = None,
    accumulate_dtype: Any = None,
    precision: Any = None,
    max_blowup: float = DEFAULT_MAX_BLOWUP,
    wide_dots: bool = False,
) -> LoweredCascade:
    """Lower every Einsum for concrete ``sizes`` (one int per rank, as ``infer_sizes`` gives);
    ``wide_dots``: every contraction accumulates in (at least) float32, for kernel bodies."""
    cascade = with_dtype(cascade, dtype)
    weak = canonical_dtype(dtype or np.float32).name
    dtypes = {k: canonical_dtype(v) for k, v in tensor_dtypes(cascade, weak).items()}
    policy = Policy(
        None if accumulate_dtype is None else canonical_dtype(accumulate_dtype),
        precision,
        max_blowup,
        wide_dots,
    )
    tensors: dict[str, TensorInfo] = {}
    inputs = []
    for t in cascade.inputs:
        info = TensorInfo(tuple(sizes[r] for r in t.ranks), dtypes[t.name])
        tensors[t.name] = info
        inputs.append((t.name, info))
    names = Names({t.name for t in cascade.inputs} | {e.output for e in cascade.einsums})
    stmts: list[Stmt] = []
    for e in cascade.einsums:
        new, info = lower_einsum(e, sizes, tensors, policy, names, dtypes[e.output])
        stmts += new
        tensors[e.output] = info
    out_dtypes = tuple(tensors[o].dtype for o in cascade.outputs)
    return LoweredCascade(
        tuple(inputs), cascade.outputs, tuple(stmts), tuple(sorted(sizes.items())), out_dtypes
    )


def with_dtype(cascade: Cascade, dtype: Any) -> Cascade:
    """``cascade`` with every float input declared ``dtype`` (None: as declared)."""
    return cascade if dtype is None else with_input_dtype(cascade, canonical_dtype(dtype).name)


class JaxCascade:
    """The emitted function: ``f(*inputs) -> tuple`` of outputs, ``f.as_dict(**inputs)``.

    Pure and traceable, so ``jax.jit``, ``jax.vmap`` and ``jax.grad`` apply to it directly.
    It runs under its own ``jax.jit`` (one compile per input shapes) unless ``jit=False``.
    """

    def __init__(
        self,
        cascade: Cascade,
        sizes: Mapping[str, int] | None,
        *,
        jit: bool,
        blockwise: bool = True,
        query_tile: int = 512,
        schedule: Schedule | None = None,
        loop: Any = None,
        plain: Any = None,
        **options: Any,
    ) -> None:
        self.cascade = verify(cascade)
        self.loop, self.plain = loop, plain
        self.notes: list[str] = []  # why a fused group was not emitted as a loop
        self.blockwise = blockwise
        self.query_tile = query_tile
        self.schedule = schedule
        self.sizes = dict(sizes or {})
        self.options = options
        self.input_names = tuple(t.name for t in cascade.inputs)
        self.output_names = cascade.outputs
        self._lowered: dict[tuple[tuple[str, int], ...], LoweredCascade] = {}
        self._static: LoweredCascade | None = None
        # One compiled program per input shapes, instead of one dispatch per jnp op.
        self._run = jax.jit(self._evaluate) if jit else self._evaluate
        bound = self._bind_statically()
        if bound is not None:  # all sizes known now: lower now, so errors surface at emit time
            self._static = self._lower(bound)

    def _bind_statically(self) -> dict[str, int] | None:
        try:
            bound = bind_sizes(self.cascade, self.sizes)
        except ValueError:
            return None
        shapes = {t.name: tuple(bound[r] for r in t.ranks) for t in self.cascade.inputs}
        return infer_sizes(self.cascade, shapes, self.sizes)

    def _lower(self, bound: dict[str, int]) -> LoweredCascade:
        key = tuple(sorted(bound.items()))
        if key not in self._lowered:
            if self.blockwise:
                from einfuse.backends.jax_blockwise import lower_program

                self._lowered[key] = lower_program(
                    self.cascade,
                    bound,
                    query_tile=self.query_tile,
                    schedule=self.schedule,
                    loop=self.loop,
                    plain=self.plain,
                    notes=self.notes,
                    **self.options,
                )
            else:
                self._lowered[key] = lower_cascade(self.cascade, bound, **self.options)
        return self._lowered[key]

    def lowered(self, arrays: Mapping[str, Any] | None = None) -> LoweredCascade:
        """The lowering for these inputs' shapes (or for the sizes given at emit time)."""
        if arrays is None:
            if self._static is None:
                raise EinfuseError(
                    "sizes are not all known: pass sizes= to emit_jax, or inputs to lowered()"
                )
            return self._static
        shapes = {}
        for t in self.cascade.inputs:
            shape = tuple(np.shape(arrays[t.name]))
            if len(shape) != len(t.ranks):
                raise EinfuseError(
                    f"input {t.name} has {len(shape)} dim(s) (shape {shape}) but is declared "
                    f"{t.name}[{', '.join(t.ranks)}]"
                )
            shapes[t.name] = shape
        return self._lower(infer_sizes(self.cascade, shapes, self.sizes))

    def loops(self) -> list[Any]:
        """The loops and kernels of the lowerings made so far (for ``explain``): each has a
        one-line ``describe()``; a loop's before and after programs are searched too."""
        from einfuse.backends.jax_blockwise import BlockwiseCascade

        out, todo = [], list(self._lowered.values())
        while todo:
            x = todo.pop(0)
            if hasattr(x, "describe"):
                out.append(x)
            if isinstance(x, BlockwiseCascade):
                todo += [x.pre, x.post]
        return out

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Inputs by name from positional (declaration order) and keyword arguments."""
        if len(args) > len(self.input_names):
            raise EinfuseError(
                f"{len(args)} positional inputs given; the cascade declares "
                f"{len(self.input_names)}: {', '.join(self.input_names)}"
            )
        arrays = dict(zip(self.input_names, args))
        for k, v in kwargs.items():
            if k in arrays:
                raise EinfuseError(f"input {k} given twice (by position and by name)")
            arrays[k] = v
        missing = [n for n in self.input_names if n not in arrays]
        extra = sorted(set(arrays) - set(self.input_names))
        if missing or extra:
            raise EinfuseError(
                f"inputs do not match the declaration ({', '.join(self.input_names)}): "
                f"missing {missing or 'none'}, unexpected {extra or 'none'}"
            )
        return arrays

    def _evaluate(self, arrays: dict[str, Any]) -> dict[str, jax.Array]:
        return self.lowered(arrays)(arrays)

    def as_dict(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        return self._run(self.bind(*args, **kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, ...]:
        out = self.as_dict(*args, **kwargs)
        return tuple(out[o] for o in self.output_names)

    def source(self, fn_name: str = "cascade") -> str:
        return self.lowered().source(fn_name)


def emit_jax(
    cascade: Cascade,
    sizes: Mapping[str, int] | None = None,
    *,
    dtype: Any = None,
    precision: Any = None,
    accumulate_dtype: Any = None,
    max_blowup: float = DEFAULT_MAX_BLOWUP,
    jit: bool = True,
    blockwise: bool = True,
    query_tile: int = 512,
    schedule: Schedule | None = None,
    mesh: Any = None,
) -> JaxCascade:
    """Emit ``cascade`` as a JAX function (see the module docstring for the calling convention).

    ``sizes`` binds ranks or size symbols (``{"M": 4096}``); the rest come from input shapes.
    ``precision`` goes to every ``jnp.einsum``. ``max_blowup`` bounds any elementwise
    intermediate to that multiple of its Einsum's largest operand or output; beyond it the
    Einsum is refused with ``BackendUnsupported`` rather than materialized. ``jit=False``
    runs op by op (each jnp call dispatched eagerly), e.g. to step through it in a debugger.
    A group that ``fuse`` made (one loop over a partitioned rank) runs as a blockwise loop,
    tiling the query rank by the ``schedule``'s tile of that rank, else by ``query_tile``
    (see ``jax_blockwise``); ``blockwise=False`` emits it Einsum by Einsum instead. Of a
    schedule only that tile changes the program (``einfuse.backends.backend`` says so).
    A cascade with device ranks runs as one ``shard_map`` over ``mesh`` (``jax_shard``).
    """
    if cascade.devices:
        from einfuse.backends.jax_shard import emit_sharded

        return emit_sharded(
            cascade,
            sizes,
            mesh=mesh,
            jit=jit,
            dtype=dtype,
            precision=precision,
            accumulate_dtype=accumulate_dtype,
            max_blowup=max_blowup,
        )
    return JaxCascade(
        cascade,
        sizes,
        jit=jit,
        blockwise=blockwise,
        query_tile=query_tile,
        schedule=schedule,
        dtype=dtype,
        precision=precision,
        accumulate_dtype=accumulate_dtype,
        max_blowup=max_blowup,
    )


def emit_jax_source(
    cascade: Cascade, sizes: Mapping[str, int] | None = None, **options: Any
) -> str:
    """The program ``emit_jax`` runs, as readable Python (e.g. for ``explain``)."""
    return emit_jax(cascade, sizes, jit=False, **options).source()
