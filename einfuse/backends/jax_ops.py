"""The JAX backend's program form: statements over a small op table, both executed and printed.

The emitter decides once how each Einsum becomes JAX calls and records the decision as data
(``Assign``/``ScanLoop`` statements over ``Ref``/``Lit``/``Call`` nodes). ``run`` executes that
data and ``format_program`` prints it, so the listing shown by ``explain`` can never drift from
what actually runs. Every op name maps to one ``OpSpec``: the callable and how it prints.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclass(frozen=True, slots=True)
class Ref:
    """A named array of the environment (an input, an Einsum's output or a temporary)."""

    name: str


@dataclass(frozen=True, slots=True)
class Lit:
    """A static Python value: a scalar constant, an einsum subscript string."""

    value: Any


@dataclass(frozen=True, slots=True)
class Call:
    """``op(*args, **params)``: args are nodes, params are static (axes, shapes, dtypes)."""

    op: str
    args: tuple[Node, ...]
    params: tuple[tuple[str, Any], ...] = ()


Node = Ref | Lit | Call


@dataclass(frozen=True, slots=True)
class Assign:
    name: str
    value: Node


@dataclass(frozen=True, slots=True)
class ScanLoop:
    """``name`` = the stacked carries of ``lax.scan(step, init, xs)``.

    ``step`` is a node over ``Ref(carry)`` and ``Ref(x)`` for each ``(x, node) in xs``, whose
    leading axis is scanned; it may also read anything assigned before the loop.
    """

    name: str
    init: Node
    carry: str
    xs: tuple[tuple[str, Node], ...]
    step: Node
    length: int


Stmt = Assign | ScanLoop


def call(op: str, *args: Node, **params: Any) -> Call:
    if op not in OPS:
        raise KeyError(f"no JAX op {op!r} in the backend's table")
    return Call(op, tuple(args), tuple(params.items()))


# --------------------------------------------------------------------------- helpers
def gather_or_zero(x: jax.Array, *indices: jax.Array | int) -> jax.Array:
    """``x[i0, i1, ...]`` for broadcastable integer index arrays; outside the extent reads 0."""
    idx = jnp.broadcast_arrays(*(jnp.asarray(i) for i in indices))
    inside = reduce(operator.and_, [(i >= 0) & (i < n) for i, n in zip(idx, x.shape)])
    clipped = tuple(jnp.clip(i, 0, n - 1) for i, n in zip(idx, x.shape))
    return jnp.where(inside, x[clipped], jnp.zeros((), x.dtype))


def _astype(x: Any, dtype: Any) -> jax.Array:
    return jnp.asarray(x).astype(dtype)


def _concatenate(*xs: jax.Array, axis: int) -> jax.Array:
    return jnp.concatenate(xs, axis=axis)


def _getitem(x: Any, index: tuple[Any, ...]) -> jax.Array:
    return jnp.asarray(x)[index]


def _full(fill_value: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jnp.full(shape, fill_value, dtype)


def _collective_chooser(reduce: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``lax.pmax``/``pmin`` with a derivative (JAX has none): the tangent where each device
    holds the extremum, averaged over ties, as ``jnp.max``'s own derivative does."""

    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def chooser(x: jax.Array, axis_name: str) -> jax.Array:
        return reduce(x, axis_name)

    @chooser.defjvp
    def _(axis_name: str, primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
        (x,), (t,) = primals, tangents
        y = reduce(x, axis_name)
        hit = (x == y).astype(x.dtype)
        return y, lax.psum(hit * t, axis_name) / lax.psum(hit, axis_name)

    return chooser


def _ppermute(x: jax.Array, axis_name: str, perm: tuple[tuple[int, int], ...]) -> jax.Array:
    """``lax.ppermute``; with no (source, destination) pair every device reads zeros."""
    return lax.ppermute(x, axis_name, perm) if perm else jnp.zeros_like(x)


@dataclass(frozen=True, slots=True)
class OpSpec:
    """How an op runs and prints: ``style`` is call, infix, prefix, method or index."""

    fn: Callable[..., Any]
    text: str
    style: str = "call"


_ELEMENTWISE_CALLS: dict[str, tuple[Callable[..., Any], str]] = {
    "exp": (jnp.exp, "jnp.exp"),
    "log": (jnp.log, "jnp.log"),
    "sqrt": (jnp.sqrt, "jnp.sqrt"),
    "rsqrt": (lax.rsqrt, "lax.rsqrt"),
    "tanh": (jnp.tanh, "jnp.tanh"),
    "erf": (lax.erf, "lax.erf"),
    "abs": (jnp.abs, "jnp.abs"),
    "sin": (jnp.sin, "jnp.sin"),
    "cos": (jnp.cos, "jnp.cos"),
    "logistic": (jax.nn.sigmoid, "jax.nn.sigmoid"),
    "sign": (jnp.sign, "jnp.sign"),
    "not": (jnp.logical_not, "jnp.logical_not"),
    "and": (jnp.logical_and, "jnp.logical_and"),
    "or": (jnp.logical_or, "jnp.logical_or"),
    "max": (jnp.maximum, "jnp.maximum"),
    "min": (jnp.minimum, "jnp.minimum"),
    "pow": (jnp.power, "jnp.power"),
    "mod": (jnp.mod, "jnp.mod"),
    "floor_divide": (jnp.floor_divide, "jnp.floor_divide"),
    "where": (jnp.where, "jnp.where"),
}
_INFIX: dict[str, tuple[Callable[..., Any], str]] = {
    "add": (operator.add, "+"),
    "sub": (operator.sub, "-"),
    "mul": (operator.mul, "*"),
    "div": (operator.truediv, "/"),
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "eq": (operator.eq, "=="),
    "ne": (operator.ne, "!="),
}

OPS: dict[str, OpSpec] = {
    **{k: OpSpec(fn, text) for k, (fn, text) in _ELEMENTWISE_CALLS.items()},
    **{k: OpSpec(fn, text, "infix") for k, (fn, text) in _INFIX.items()},
    "neg": OpSpec(operator.neg, "-", "prefix"),
    "astype": OpSpec(_astype, "astype", "method"),
    "index": OpSpec(_getitem, "", "index"),
    "iota": OpSpec(lax.broadcasted_iota, "lax.broadcasted_iota"),
    "pad": OpSpec(jnp.pad, "jnp.pad"),
    "reshape": OpSpec(jnp.reshape, "jnp.reshape"),
    "transpose": OpSpec(jnp.transpose, "jnp.transpose"),
    "moveaxis": OpSpec(jnp.moveaxis, "jnp.moveaxis"),
    "broadcast_to": OpSpec(jnp.broadcast_to, "jnp.broadcast_to"),
    "full": OpSpec(_full, "jnp.full"),
    "concatenate": OpSpec(_concatenate, "jnp.concatenate"),
    "gather_or_zero": OpSpec(gather_or_zero, "gather_or_zero"),
    "einsum": OpSpec(jnp.einsum, "jnp.einsum"),
    "reduce_sum": OpSpec(jnp.sum, "jnp.sum"),
    "reduce_max": OpSpec(jnp.max, "jnp.max"),
    "reduce_min": OpSpec(jnp.min, "jnp.min"),
    "reduce_prod": OpSpec(jnp.prod, "jnp.prod"),
    "cumsum": OpSpec(lax.cumsum, "lax.cumsum"),
    "cummax": OpSpec(lax.cummax, "lax.cummax"),
    "cummin": OpSpec(lax.cummin, "lax.cummin"),
    "cumprod": OpSpec(lax.cumprod, "lax.cumprod"),
    # Collectives, inside a shard_map body (einfuse.backends.jax_shard).
    "axis_index": OpSpec(lax.axis_index, "lax.axis_index"),
    "psum": OpSpec(lax.psum, "lax.psum"),
    "pmax": OpSpec(_collective_chooser(lax.pmax), "lax.pmax"),
    "pmin": OpSpec(_collective_chooser(lax.pmin), "lax.pmin"),
    "psum_scatter": OpSpec(lax.psum_scatter, "lax.psum_scatter"),
    "all_gather": OpSpec(lax.all_gather, "lax.all_gather"),
    "ppermute": OpSpec(_ppermute, "lax.ppermute"),
    "dynamic_slice_in_dim": OpSpec(lax.dynamic_slice_in_dim, "lax.dynamic_slice_in_dim"),
}


# --------------------------------------------------------------------------- execution
def evaluate(node: Node, env: Mapping[str, Any]) -> Any:
    if isinstance(node, Ref):
        return env[node.name]
    if isinstance(node, Lit):
        return node.value
    args = [evaluate(a, env) for a in node.args]
    return OPS[node.op].fn(*args, **dict(node.params))


def run(stmts: Sequence[Stmt], env: dict[str, Any]) -> dict[str, Any]:
    """Execute statements in order, adding each result to ``env`` (returned)."""
    for s in stmts:
        if isinstance(s, Assign):
            env[s.name] = evaluate(s.value, env)
        else:
            env[s.name] = _run_scan(s, env)
    return env


def _run_scan(s: ScanLoop, env: dict[str, Any]) -> jax.Array:
    init = evaluate(s.init, env)
    names = [name for name, _ in s.xs]
    xs = tuple(evaluate(node, env) for _, node in s.xs)

    def step(carry: jax.Array, x: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        local = {**env, s.carry: carry, **dict(zip(names, x))}
        new = jnp.asarray(evaluate(s.step, local)).astype(carry.dtype)
        return new, new

    _, ys = lax.scan(step, init, xs if xs else None, length=s.length)
    return ys


# --------------------------------------------------------------------------- printing
def format_node(node: Node) -> str:
    if isinstance(node, Ref):
        return node.name
    if isinstance(node, Lit):
        return format_value(node.value)
    spec = OPS[node.op]
    args = [_operand(a) if spec.style != "call" else format_node(a) for a in node.args]
    params = dict(node.params)
    if spec.style == "infix":
        return f"{args[0]} {spec.text} {args[1]}"
    if spec.style == "prefix":
        return f"{spec.text}{args[0]}"
    if spec.style == "method":
        return f"{args[0]}.{spec.text}({format_value(params['dtype'])})"
    if spec.style == "index":
        return f"{args[0]}[{_format_index(params['index'])}]"
    if node.op == "concatenate":
        args = [f"[{', '.join(args)}]"]
    if node.op == "full":  # jnp.full's own argument order: shape, fill value, dtype
        shape, dtype = format_value(params["shape"]), format_value(params["dtype"])
        return f"{spec.text}({shape}, {args[0]}, {dtype})"
    rendered = args + [f"{k}={format_value(v)}" for k, v in params.items() if v is not None]
    return f"{spec.text}({', '.join(rendered)})"


def _operand(node: Node) -> str:
    """An operand of an infix, prefix, method or index form, parenthesized when compound."""
    text = format_node(node)
    if isinstance(node, Call) and OPS[node.op].style in ("infix", "prefix"):
        return f"({text})"
    if isinstance(node, Lit) and isinstance(node.value, int | float) and node.value < 0:
        return f"({text})"
    return text


def format_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, float) and not math.isfinite(v):
        return "jnp.nan" if math.isnan(v) else ("jnp.inf" if v > 0 else "-jnp.inf")
    if isinstance(v, np.dtype | type):
        return f"jnp.{np.dtype(v).name}"
    if isinstance(v, tuple):
        inner = ", ".join(format_value(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    return repr(v)


def _format_index(index: tuple[Any, ...]) -> str:
    items = list(index)
    while items and items[-1] == slice(None):
        items.pop()
    out = []
    for it in items or [slice(None)]:
        if it is None:
            out.append("None")
        elif isinstance(it, slice):
            lo = "" if it.start in (None, 0) else str(it.start)
            hi = "" if it.stop is None else str(it.stop)
            out.append(f"{lo}:{hi}")
        else:
            out.append(str(it))
    return ", ".join(out)


def format_stmt(s: Stmt) -> list[str]:
    if isinstance(s, Assign):
        return [f"{s.name} = {format_node(s.value)}"]
    fn = f"{s.name.removesuffix('_steps')}_step"
    xs = [name for name, _ in s.xs]
    lines = [f"def {fn}({s.carry}, xs):"]
    if xs:
        lines.append(f"    {', '.join(xs)}, = xs")
    lines.append(f"    new = ({format_node(s.step)}).astype({s.carry}.dtype)")
    lines.append("    return new, new")
    xs_text = f"({', '.join(format_node(n) for _, n in s.xs)},)" if xs else "None"
    lines.append(
        f"_, {s.name} = lax.scan({fn}, {format_node(s.init)}, {xs_text}, length={s.length})"
    )
    return lines
