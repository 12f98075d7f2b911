"""Lift a ``jax.shard_map`` body into one cascade in the global view, with device ranks.

The body is lifted like any region, on its local blocks; then every tensor that varies across
the devices of the mesh axis gets that axis' device rank (``self``), at the dim its in_spec
shards for an input and first otherwise, so ``W[h, d]`` with ``P('tp', None)`` becomes
``W[x, h0, d]`` (a reshape of the global array) and a matmul of it ``Y[x, t, h0]``. The
collectives are Einsums written in that global form, as ``einfuse.ir.devices`` reads them:

    psum / pmax / pmin       AR[i] = T[y, i]                          (all-reduce)
    psum_scatter (tiled)     RS[x, .., n0, ..] = T[y, .., x*N0+n0, ..] (reduce-scatter)
    all_gather (tiled)       G[.., z, n0, ..] = T[z, .., n0, ..], read as G[.., n/N0, mod(n, N0)]
    ppermute (shift k)       R[x, ..] = T[mod(x-k, X), ..], or T[x-k, ..] without wrap
    axis_index               the device rank x as a value

A body that uses anything else (another primitive without a rule, several mesh axes, a
permutation that is not a shift, a replicated out_spec of a varying value) is not lifted:
the whole shard_map stays one opaque equation and the reason is kept with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from jax._src import core

from einfuse.einsum_cascade.lift_flatten import FlatEqn, flatten
from einfuse.einsum_cascade.lift_region import Base, Decline, RegionBuilder, Value
from einfuse.einsum_cascade.lift_rules import RULES, kind, liftable
from einfuse.einsum_cascade.lift_views import alias, out_shape
from einfuse.ir.cascade import Einsum
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, rank_vars, substitute


@dataclass
class ShardBuilder(RegionBuilder):
    """A region builder that knows one mesh axis and which tensors vary along it."""

    axis: str = ""
    devices: int = 1
    me: str = ""  # the device rank of every varying tensor: this device
    other: str = ""  # the device rank a collective reduces or reads over
    devpos: dict[str, int] = field(default_factory=dict)  # varying tensor -> its device dim
    fixed: set[str] = field(default_factory=set)  # tensors known not to vary
    global_form: set[str] = field(default_factory=set)  # Einsums written with device ranks

    def varies(self, tensor: str) -> bool:
        """Whether ``tensor`` differs between the devices of the axis."""
        if tensor in self.devpos:
            return True
        if tensor in self.fixed:
            return False
        e = next(e for e in self.einsums if e.output == tensor)
        reads = any(self.varies(t) for t in e.inputs)
        if reads or self.me in rank_vars(e.expr):
            self.devpos[tensor] = 0
            return True
        self.fixed.add(tensor)
        return False

    def on_device(self, read: Access, rank: Expr) -> Access:
        """``read`` (local indices) of a varying tensor, at device index ``rank``."""
        pos = self.devpos[read.tensor]
        return Access(read.tensor, (*read.indices[:pos], rank, *read.indices[pos:]))

    def collective(self, name: str, varying: bool) -> None:
        self.global_form.add(name)
        if varying:
            self.devpos[name] = 0
        else:
            self.fixed.add(name)

    def globalize(self) -> None:
        """Give every varying tensor its device rank: declarations, left sides and reads."""

        def read(x: Expr) -> Expr | None:
            if isinstance(x, Access) and self.varies(x.tensor):
                return self.on_device(x, Var(self.me))
            return None

        for k, e in enumerate(self.einsums):
            if e.output in self.global_form:
                continue
            left = (Var(self.me), *e.indices) if self.varies(e.output) else e.indices
            self.einsums[k] = replace(e, indices=left, expr=substitute(e.expr, read))
        for k, (atom, decl) in enumerate(self.inputs):
            if decl.name in self.devpos:
                pos = self.devpos[decl.name]
                ranks = (*decl.ranks[:pos], self.me, *decl.ranks[pos:])
                self.inputs[k] = (atom, replace(decl, ranks=ranks))


def _axis_of(names: Any) -> str:
    names = names if isinstance(names, tuple | list) else (names,)
    if len(names) != 1:
        raise Decline(f"a collective over several mesh axes ({', '.join(map(str, names))})")
    return str(names[0])


def _check_axis(b: ShardBuilder, names: Any) -> None:
    axis = _axis_of(names)
    if axis != b.axis:
        raise Decline(f"a collective over mesh axis {axis}; the body shards over {b.axis}")


def _varying_operand(b: ShardBuilder, e: FlatEqn, read: Access) -> None:
    if not b.varies(read.tensor):
        raise Decline(f"{e.primitive} of a value that is the same on every device")
    if kind(e.in_avals()[0].dtype) != "float":
        raise Decline(f"{e.primitive} of a non-float value")


def _all_reduce(how: str) -> Callable[[ShardBuilder, FlatEqn], None]:
    def lift(b: ShardBuilder, e: FlatEqn) -> None:
        _check_axis(b, e.params["axes"])
        if e.params.get("axis_index_groups") is not None:
            raise Decline("axis_index_groups")
        for atom, var in zip(e.invars, e.outvars):
            v = b.read(atom)
            out = b.choose_ranks(v.ranks, v.shape)
            idx = tuple(Var(r) for r in out)
            read = b.access_all(v, idx)
            _varying_operand(b, e, read)
            dtype = np.dtype(b.avals[var].dtype)
            name = b.emit("AR", idx, b.on_device(read, Var(b.other)), e.source, how, dtype)
            b.collective(name, varying=False)
            b.stored(var, e, name, out)

    return lift


def _reduce_scatter(b: ShardBuilder, e: FlatEqn) -> None:
    _check_axis(b, e.params["axis_name"])
    v = b.read(e.invars[0])
    k, tiled, shape = int(e.params["scatter_dimension"]), bool(e.params["tiled"]), out_shape(e)
    keep = [v.ranks[d] for d in range(v.ndim) if tiled or d != k]
    out = b.choose_ranks(keep, shape)
    at: list[Expr] = [Var(r) for r in out]
    me = Var(b.me)
    if tiled:
        at[k] = Op("add", (Op("mul", (me, Const(shape[k]))), Var(out[k])))
    else:
        at.insert(k, me)
    read = b.access(v, tuple(at))
    _varying_operand(b, e, read)
    idx = (me, *(Var(r) for r in out))
    dtype = np.dtype(e.out_avals()[0].dtype)
    name = b.emit("RS", idx, b.on_device(read, Var(b.other)), e.source, dtype=dtype)
    b.collective(name, varying=True)
    b.stored(e.outvars[0], e, name, out)


def _all_gather(b: ShardBuilder, e: FlatEqn) -> None:
    _check_axis(b, e.params["axis_name"])
    v = b.read(e.invars[0])
    k, tiled = int(e.params["all_gather_dimension"]), bool(e.params["tiled"])
    own = b.choose_ranks(v.ranks, v.shape)
    read = b.access(v, tuple(Var(r) for r in own))
    _varying_operand(b, e, read)
    z = b.fresh_rank(b.devices)
    ranks = (*own[:k], z, *own[k:])
    dtype = np.dtype(e.out_avals()[0].dtype)
    idx = tuple(Var(r) for r in ranks)
    name = b.emit("AG", idx, b.on_device(read, Var(z)), e.source, dtype=dtype)
    b.collective(name, varying=False)
    shape = (*v.shape[:k], b.devices, *v.shape[k:])
    stored = Value(Base(shape, dtype, ranks, "AG", e.source, tensor=name), shape, dtype, ranks)
    if not tiled:
        b.define(e.outvars[0], stored)
        return
    n0 = v.shape[k]

    def merged(i: tuple[Expr, ...]) -> tuple[Expr, ...]:
        n = i[k]
        return (*i[:k], Op("div", (n, Const(n0))), Op("mod", (n, Const(n0))), *i[k + 1 :])

    view_ranks = (*own[:k], None, *own[k + 1 :])
    b.define(e.outvars[0], stored.view(out_shape(e), view_ranks, merged))


def _ppermute(b: ShardBuilder, e: FlatEqn) -> None:
    _check_axis(b, e.params["axis_name"])
    perm = {(int(s), int(d)) for s, d in e.params["perm"]}
    n = b.devices
    shifts = {(d - s) % n for s, d in perm}
    if len(shifts) != 1:
        raise Decline(f"ppermute by a permutation that is not a shift: {sorted(perm)}")
    k = shifts.pop()
    me = Var(b.me)
    if perm == {(s, (s + k) % n) for s in range(n)}:
        at: Expr = Op("mod", (Op("add", (me, Const((n - k) % n))), Size(b.me)))
    elif perm == {(s, s + k) for s in range(n - k)}:
        at = Op("sub", (me, Const(k)))
    else:
        raise Decline(f"ppermute by a partial permutation: {sorted(perm)}")
    v = b.read(e.invars[0])
    out = b.choose_ranks(v.ranks, v.shape)
    idx = tuple(Var(r) for r in out)
    read = b.access(v, idx)
    _varying_operand(b, e, read)
    dtype = np.dtype(e.out_avals()[0].dtype)
    name = b.emit("PERM", (me, *idx), b.on_device(read, at), e.source, dtype=dtype)
    b.collective(name, varying=True)
    b.stored(e.outvars[0], e, name, out)


def _axis_index(b: ShardBuilder, e: FlatEqn) -> None:
    _check_axis(b, e.params["axis_name"])
    me = Var(b.me)
    b.pending(e.outvars[0], e, lambda idx: me, ())


def _pvary(b: ShardBuilder, e: FlatEqn) -> None:
    if len(e.invars) != 1:
        raise Decline(f"{e.primitive} of several values")
    alias(b, e)


SHARD_RULES: dict[str, Callable[[ShardBuilder, FlatEqn], None]] = {
    "psum": _all_reduce("sum"),
    "psum_invariant": _all_reduce("sum"),
    "pmax": _all_reduce("max"),
    "pmin": _all_reduce("min"),
    "reduce_scatter": _reduce_scatter,
    "all_gather": _all_gather,
    "ppermute": _ppermute,
    "axis_index": _axis_index,
    "pvary": _pvary,
}


def _in_body(e: FlatEqn) -> bool:
    return e.primitive in SHARD_RULES or liftable(_unannotated(e))


def _unannotated(e: FlatEqn) -> FlatEqn:
    """Inside the body every mesh axis is manual: a replicated sharding annotation (JAX puts
    one on broadcasts there) says nothing, so the equation lifts as if it had none."""
    params = e.params
    trivial = {
        k: None
        for k in ("sharding", "out_sharding")
        if params.get(k) is not None and all(s is None for s in getattr(params[k], "spec", [0]))
    }
    return replace(e, eqn=e.eqn.replace(params={**params, **trivial})) if trivial else e


@dataclass(frozen=True)
class LiftedShardMap:
    """A shard_map's body as a builder ready to close, with its interface."""

    builder: ShardBuilder
    inputs: tuple[int, ...]  # outer ids, one per region input tensor
    outputs: tuple[str, ...]  # the region's output tensors, one per shard_map output
    primitives: tuple[str, ...]
    mesh: Any


def lift_shard_map(eqn: FlatEqn) -> LiftedShardMap:
    """The body of a shard_map equation in the global view; Decline(reason) if it can't be."""
    p = eqn.params
    mesh, body = p["mesh"], p["jaxpr"]
    specs = [*p["in_specs"], *p["out_specs"]]
    used = {str(a) for s in specs for entry in s if entry is not None for a in _names(entry)}
    if len(used) > 1:
        raise Decline(f"shard_map over several mesh axes ({', '.join(sorted(used))})")
    if not used:
        raise Decline("shard_map with no sharded input or output")
    axis = used.pop()
    closed = body if isinstance(body, core.ClosedJaxpr) else core.ClosedJaxpr(body, ())
    flat = flatten(closed, _in_body)
    flat.eqns = [_unannotated(x) for x in flat.eqns]
    if flat.consts:
        raise Decline("a shard_map body with captured constants")
    from einfuse.einsum_cascade.lift import value_uses

    lifts = [_in_body(x) for x in flat.eqns]
    uses, _ = value_uses(flat, lifts)
    b = ShardBuilder(flat.avals, uses, axis=axis, devices=int(mesh.shape[axis]))
    b.me, b.other = b.fresh_rank(b.devices), b.fresh_rank(b.devices)
    outer: list[int] = []
    for atom, value_id, spec in zip(eqn.invars, flat.inputs, p["in_specs"]):
        if not isinstance(atom, int):
            raise Decline("a literal shard_map operand")
        b.read(value_id)
        name = b.inputs[-1][1].name
        dim = _sharded_dim(spec, axis)
        if dim is None:
            b.fixed.add(name)
        else:
            b.devpos[name] = dim
        outer.append(atom)
    for x, ok in zip(flat.eqns, lifts):
        if not ok:
            raise Decline(f"{x.primitive} inside the shard_map has no lifting rule")
        if x.primitive in SHARD_RULES:
            SHARD_RULES[x.primitive](b, x)
        else:
            RULES[x.primitive].lift(b, x)
        b.eqns.append(x)
    outputs = tuple(_output(b, atom, spec) for atom, spec in zip(flat.outputs, p["out_specs"]))
    b.globalize()
    return LiftedShardMap(b, tuple(outer), outputs, tuple(x.primitive for x in b.eqns), mesh)


def _names(entry: Any) -> tuple[Any, ...]:
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _sharded_dim(spec: Any, axis: str) -> int | None:
    dims = [d for d, entry in enumerate(spec) if entry is not None and axis in _names(entry)]
    if dims and len(_names(spec[dims[0]])) > 1:
        raise Decline(f"a dim sharded over several mesh axes ({spec})")
    return dims[0] if dims else None


def _output(b: ShardBuilder, atom: Any, spec: Any) -> str:
    """The tensor holding one shard_map output, its device dim where out_specs puts it."""
    if not isinstance(atom, int):
        raise Decline("a literal shard_map output")
    if kind(b.avals[atom].dtype) != "float":
        raise Decline("a non-float shard_map output")
    tensor = b.output(atom)
    dim = _sharded_dim(spec, b.axis)
    varies = b.varies(tensor)
    if dim is None:
        if varies:
            raise Decline(f"out_specs {spec} replicates a value that varies across {b.axis}")
        return tensor
    if varies and b.devpos[tensor] == dim:
        return tensor
    ranks = b.choose_ranks(b.values[atom].ranks, b.values[atom].shape)
    idx = tuple(Var(r) for r in ranks)
    read = Access(tensor, idx)
    if varies:
        read = b.on_device(read, Var(b.me))
    left = (*idx[:dim], Var(b.me), *idx[dim:])
    name = b.tensor_name("OUT")
    b.einsums.append(Einsum(name, left, read))
    b.dtypes[name] = b.dtypes[tensor]
    b.global_form.add(name)
    b.devpos[name] = dim
    return name
