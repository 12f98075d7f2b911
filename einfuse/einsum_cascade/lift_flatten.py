"""Flatten a closed jaxpr into one stream of equations over integer value ids.

Nested ``jit``/``closed_call`` bodies are inlined (they only name a sub-computation), so
the lifter sees one long run of primitives and regions can span function boundaries.
A ``custom_jvp_call``/``custom_vjp_call`` body is inlined only when the ``inline`` test
accepts every equation of it; its equations then carry the whole call as their ``group``,
so a region can re-create the custom derivative from the original call. Otherwise the
call stays one equation, bound unchanged.

Values get fresh integer ids at every inlining, because JAX caches inner jaxprs and the
same ``Var`` objects would otherwise be defined twice in the flat stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from jax._src import core, source_info_util
from jax._src.sharding_impls import UnspecifiedValue

Atom = int | core.Literal

INLINE_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
CUSTOM_CALLS = {"custom_jvp_call": "jvp", "custom_vjp_call": "vjp", "custom_vjp_call_jaxpr": "vjp"}


@dataclass(frozen=True, slots=True, eq=False)
class FlatEqn:
    """One primitive application; ``invars`` are ids or literals, ``outvars`` ids or literals.

    ``group`` is the outermost custom-derivative call this equation was inlined from. An
    inlined call's own record has ``outvars`` equal to its body's outputs (which may be
    literals or pass-through ids), so evaluating it writes the values later equations read.
    """

    eqn: core.JaxprEqn
    invars: tuple[Atom, ...]
    outvars: tuple[Atom, ...]
    group: FlatEqn | None = None
    custom: str = ""  # "jvp" | "vjp" for a custom-derivative call, else ""
    source: Any = None  # the SourceInfo that names a user line (an enclosing call's if need be)

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name

    @property
    def params(self) -> dict[str, Any]:
        return self.eqn.params

    def in_avals(self) -> list[core.ShapedArray]:
        return [v.aval for v in self.eqn.invars]

    def out_avals(self) -> list[core.ShapedArray]:
        return [v.aval for v in self.eqn.outvars]


@dataclass
class FlatProgram:
    """The flattened function: inputs, constants (id, value), equations and outputs."""

    inputs: tuple[int, ...]
    consts: list[tuple[int, Any]]
    eqns: list[FlatEqn]
    outputs: tuple[Atom, ...]
    avals: dict[int, core.ShapedArray] = field(default_factory=dict)


def flatten(closed: core.ClosedJaxpr, inline: Callable[[FlatEqn], bool]) -> FlatProgram:
    """Inline nested calls; ``inline(eqn)`` says whether an equation of a custom call lifts."""
    flat = FlatProgram((), [], [], ())
    counter = itertools.count()
    flat.inputs = tuple(_fresh(flat, counter, v) for v in closed.jaxpr.invars)
    flat.outputs = tuple(_walk(flat, counter, closed, list(flat.inputs), flat.eqns, inline))
    return flat


def _fresh(flat: FlatProgram, counter: itertools.count, var: core.Var) -> int:
    i = next(counter)
    flat.avals[i] = var.aval
    return i


def _walk(
    flat: FlatProgram,
    counter: itertools.count,
    closed: core.ClosedJaxpr,
    args: Sequence[Atom],
    out: list[FlatEqn],
    inline: Callable[[FlatEqn], bool],
    outer: Any = None,
) -> list[Atom]:
    jaxpr = closed.jaxpr
    env: dict[core.Var, Atom] = {}
    for var, value in zip(jaxpr.constvars, closed.consts):
        i = _fresh(flat, counter, var)
        flat.consts.append((i, value))
        env[var] = i
    env.update(zip(jaxpr.invars, args))

    def read(v: core.Atom) -> Atom:
        return v if isinstance(v, core.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        src = eqn.source_info
        if outer is not None and source_info_util.user_frame(src.traceback) is None:
            src = outer  # a jitted library function's body: name the user's call instead
        sub = eqn.params.get("jaxpr") if name in INLINE_CALLS else None
        sub = sub if sub is not None else eqn.params.get("call_jaxpr")
        if name in INLINE_CALLS and sub is not None and _plain_call(eqn):
            outs = _walk(flat, counter, _closed(sub), ins, out, inline, src)
        elif name in CUSTOM_CALLS:
            outs = _custom(flat, counter, eqn, ins, out, inline, src)
        else:
            outs = [_fresh(flat, counter, v) for v in eqn.outvars]
            out.append(FlatEqn(eqn, tuple(ins), tuple(outs), source=src))
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _custom(
    flat: FlatProgram,
    counter: itertools.count,
    eqn: core.JaxprEqn,
    ins: list[Atom],
    out: list[FlatEqn],
    inline: Callable[[FlatEqn], bool],
    src: Any,
) -> list[Atom]:
    """Inline a custom-derivative call whose body lifts entirely; else keep the call whole."""
    body: list[FlatEqn] = []
    n_consts = len(flat.consts)
    outs = _walk(flat, counter, _closed(eqn.params["call_jaxpr"]), ins, body, inline, src)
    if body and all(e.group is not None or inline(e) for e in body):
        kind = CUSTOM_CALLS[eqn.primitive.name]
        call = FlatEqn(eqn, tuple(ins), tuple(outs), custom=kind, source=src)
        out.extend(replace(e, group=call) for e in body)
        return outs
    del flat.consts[n_consts:]  # the body's constants are not needed by the whole call
    whole = [_fresh(flat, counter, v) for v in eqn.outvars]
    out.append(FlatEqn(eqn, tuple(ins), tuple(whole), source=src))
    return whole


def _plain_call(eqn: core.JaxprEqn) -> bool:
    """A call that only names a sub-computation: no shardings, layouts or compiler options."""
    p = eqn.params
    shardings = (*p.get("in_shardings", ()), *p.get("out_shardings", ()))
    layouts = (*p.get("in_layouts", ()), *p.get("out_layouts", ()))
    return (
        all(isinstance(s, UnspecifiedValue) for s in shardings)
        and all(x is None for x in layouts)
        and not p.get("compiler_options_kvs")
    )


def _closed(jaxpr: core.Jaxpr | core.ClosedJaxpr) -> core.ClosedJaxpr:
    return jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else core.ClosedJaxpr(jaxpr, ())


def literal_value(atom: core.Literal) -> int | float | bool:
    """A scalar literal as a Python number (NumPy scalars and 0-d arrays unwrapped)."""
    value = np.asarray(atom.val)
    return value.item()
