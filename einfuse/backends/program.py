"""Run a lifted Program with JAX: regions through a `Backend`, opaque equations re-bound.

``ProgramRunner(program, backend)`` emits every region once (the backend's ``emit``, JAX's
by default) and is then a pure function of the program's inputs, so ``jax.jit``,
``jax.grad`` and ``jax.vmap`` apply to it. A region the backend refuses
(``BackendUnsupported``, or any other ``EinfuseError``) runs its original equations instead
and says why in ``fallbacks``, so the program stays correct.
Emitted regions run under ``jax.named_scope("einfuse_region<k>")``, which names them in
HLO metadata and profiles.

Derivatives: a region whose ``derivative`` is ``jvp`` or ``vjp`` (it holds a stop_gradient
or an inlined custom_jvp/custom_vjp body) is wrapped in ``jax.custom_jvp``/``custom_vjp``
whose rule differentiates the original equations, so the user's derivative rules hold
while the forward pass runs the emitted cascade. A region resized by a program pass
(``derivative == "none"``) refuses to be differentiated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax._src import core, source_info_util

from einfuse.backends.backend import Backend, get_backend
from einfuse.backends.jax_backend import JaxCascade
from einfuse.einsum_cascade.lift import Opaque, Program, Region
from einfuse.einsum_cascade.lift_flatten import FlatEqn
from einfuse.ir.errors import EinfuseError

RegionFn = Callable[..., tuple[Any, ...]]


def bind_equation(eqn: FlatEqn, args: Sequence[Any]) -> list[Any]:
    """Apply one jaxpr equation to values, as ``jax.core.eval_jaxpr`` does."""
    e = eqn.eqn
    params = e.primitive.get_bind_params(e.params)
    name_stack = source_info_util.current_name_stack() + e.source_info.name_stack
    with (
        source_info_util.user_context(e.source_info.traceback, name_stack=name_stack),
        e.ctx.manager,
    ):
        out = e.primitive.bind(*args, **params)
    return list(out) if e.primitive.multiple_results else [out]


def evaluate(eqns: Sequence[FlatEqn], env: dict[int, Any]) -> dict[int, Any]:
    """Evaluate equations in order over ``env`` (ids to values); returns ``env``."""
    for eqn in eqns:
        outs = bind_equation(eqn, [_read(env, a) for a in eqn.invars])
        for var, value in zip(eqn.outvars, outs):
            if isinstance(var, int):
                env[var] = value
    return env


def _read(env: Mapping[int, Any], atom: Any) -> Any:
    return atom.val if isinstance(atom, core.Literal) else env[atom]


class ProgramRunner:
    """A Program ready to run: ``runner(*args)`` returns the flat list of its outputs."""

    def __init__(self, program: Program, backend: Backend | str | None = None) -> None:
        self.program = program
        self.backend = get_backend(backend)
        self.emitted: dict[int, JaxCascade] = {}
        self.fallbacks: dict[int, str] = {}
        self._fns: dict[int, RegionFn] = {}
        for k, region in enumerate(program.regions):
            try:
                self.emitted[k] = self._emit(region)
            except EinfuseError as exc:
                self.fallbacks[k] = f"{type(exc).__name__}: {exc}"
            self._fns[k] = _region_fn(region, self.emitted.get(k), program.avals, k)

    def _emit(self, region: Region) -> JaxCascade:
        """A lifted shard_map runs on its own mesh, as the JAX backend's shard_map."""
        if region.mesh is not None:
            from einfuse.backends.jax_shard import emit_sharded

            return emit_sharded(region.cascade, mesh=region.mesh)
        return self.backend.emit(region.cascade, None, region.schedule)

    def region_hlo(self, k: int) -> str | None:
        """`hlo_fingerprint` of region ``k``'s emitted program alone, lowered as the autotuner's
        bench lowers a candidate: equal to a measured candidate's only if it is that program.
        None for a region that runs as plain JAX."""
        from einfuse.backends.inspection import hlo_fingerprint

        emitted = self.emitted.get(k)
        if emitted is None:
            return None
        region = self.program.regions[k]
        avals = {t: self.program.avals[v] for t, v in zip(region.input_tensors, region.inputs)}
        structs = [
            jax.ShapeDtypeStruct(avals[t.name].shape, avals[t.name].dtype)
            for t in emitted.cascade.inputs
        ]
        return hlo_fingerprint(jax.jit(emitted).lower(*structs))

    def __call__(self, *args: Any) -> list[Any]:
        env = self.environment(*args)
        return [_read(env, a) for a in self.program.outputs]

    def environment(self, *args: Any) -> dict[int, Any]:
        """Every value the program computes from ``args``, by id (``explain`` reads a few)."""
        p = self.program
        if len(args) != len(p.inputs):
            raise TypeError(f"the program takes {len(p.inputs)} inputs, got {len(args)}")
        env: dict[int, Any] = dict(p.consts)
        env.update(zip(p.inputs, args))
        k = 0
        for seg in p.segments:
            if isinstance(seg, Opaque):
                evaluate((seg.eqn,), env)
                continue
            outs = self._fns[k](*(env[v] for v in seg.inputs))
            env.update(zip(seg.outputs, outs))
            k += 1
        return env


def _region_fn(
    region: Region,
    emitted: JaxCascade | None,
    avals: Mapping[int, core.ShapedArray],
    index: int,
) -> RegionFn:
    """The region as a function of its inputs, with the derivative its equations had."""

    def original(*xs: Any) -> tuple[Any, ...]:
        env = evaluate(region.original, dict(zip(region.inputs, xs)))
        return tuple(env[v] for v in region.outputs)

    if emitted is None:
        return original

    def forward(*xs: Any) -> tuple[Any, ...]:
        with jax.named_scope(f"einfuse_region{index}"):
            by_name = emitted.as_dict(**dict(zip(region.input_tensors, xs)))
        outs = []
        for v, t in zip(region.outputs, region.output_tensors):
            x, aval = by_name[t], avals[v]
            if x.shape != aval.shape:  # a shard_map's output: the device dim merged back
                x = x.reshape(aval.shape)
            outs.append(x if x.dtype == aval.dtype else x.astype(aval.dtype))
        return tuple(outs)

    if region.derivative == "none":
        fn = jax.custom_jvp(forward)
        fn.defjvp(_no_derivative)
        return fn
    if region.derivative == "jvp":
        fn = jax.custom_jvp(forward)
        fn.defjvp(lambda primals, tangents: jax.jvp(original, primals, tangents))
        return fn
    if region.derivative == "vjp":
        fn = jax.custom_vjp(forward)
        fn.defvjp(lambda *xs: jax.vjp(original, *xs), lambda vjp_fn, cts: vjp_fn(cts))
        return fn
    return forward


def _no_derivative(primals: Any, tangents: Any) -> Any:
    raise EinfuseError(
        "this region was resized by a program pass (prune-tokens) and has no derivative: "
        "differentiate the unpruned function"
    )


def run_program(program: Program, *args: Any, backend: Backend | str | None = None) -> list[Any]:
    """Emit and run ``program`` once (for tests and one-off use; ``einfuse.jit`` caches)."""
    return ProgramRunner(program, backend)(*args)
