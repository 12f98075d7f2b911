"""The body of an emitted shard_map, Einsum by Einsum (see ``jax_shard`` for the scheme).

Each Einsum lowers as the single-device backend lowers it, over the local blocks, with the
collectives ``einfuse.ir.devices`` says it needs before it (all_gather, ppermute of what it
reads) or after it (psum/pmax/pmin of its partial, psum_scatter).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from einfuse.backends.jax_device_view import DeviceView
from einfuse.backends.jax_lower import Names, Policy, lower_einsum
from einfuse.backends.jax_ops import Assign, Ref, Stmt, call
from einfuse.backends.jax_values import BackendUnsupported, TensorInfo
from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.devices import REDUCING, Communication, axes, ring_shift
from einfuse.ir.expr import Access, Expr, Var, substitute


@dataclass
class Body:
    """What the body lowering knows while it walks the Einsums."""

    cascade: Cascade
    sizes: Mapping[str, int]
    policy: Policy
    names: Names
    dtypes: dict[str, np.dtype]
    tensors: dict[str, TensorInfo]
    dims: dict[str, frozenset[int]]  # tensor -> its device dims (local extent 1)
    index: dict[str, str]  # axis -> the variable holding lax.axis_index(axis)
    stmts: list[Stmt]


def device_dims(c: Cascade, ranks: tuple[str, ...]) -> frozenset[int]:
    return frozenset(d for d, r in enumerate(ranks) if c.device_axis(r) is not None)


def local_shape(shape: tuple[int, ...], dims: frozenset[int]) -> tuple[int, ...]:
    return tuple(1 if d in dims else n for d, n in enumerate(shape))


def _local_ranks(comm: Communication) -> set[str]:
    """The device ranks of ``comm``'s Einsum that stand for this device."""
    if comm.kind in ("all_reduce", "reduce_scatter"):
        return {comm.reduced_rank} - {None}  # type: ignore[arg-type]
    return {comm.self_rank} - {None}  # type: ignore[arg-type]


def lower_on_mesh(body: Body, e: Einsum, comms: list[Communication]) -> None:
    moving = [m for m in comms if m.kind != "local"]
    if len(moving) > 1:
        kinds = ", ".join(f"{m.kind} on {m.axis}" for m in moving)
        raise BackendUnsupported(f"einsum {e.output} communicates on two axes ({kinds})")
    local = {r: body.index[m.axis] for m in comms for r in _local_ranks(m)}
    sizes = {**body.sizes, **dict.fromkeys(local, 1)}
    if moving:
        e = _read_collectives(body, e, moving[0])
    view = DeviceView(local, body.dims, {r: body.sizes[r] for r in local})
    policy = replace(body.policy, device=view)
    dtype = body.dtypes[e.output]
    if moving and moving[0].kind in ("all_reduce", "reduce_scatter"):
        info = _reduce_on_mesh(body, e, moving[0], sizes, policy, dtype)
    else:
        stmts, info = lower_einsum(e, sizes, body.tensors, policy, body.names, dtype)
        body.stmts += stmts
    body.tensors[e.output] = info
    body.dims[e.output] = device_dims(body.cascade, body.cascade.tensor_ranks(e.output))


def _reduce_on_mesh(
    body: Body, e: Einsum, m: Communication, sizes: dict[str, int], policy: Policy, dtype: np.dtype
) -> TensorInfo:
    """The local partial of ``e``, then the collective that reduces it over ``m.axis``."""
    partial = body.names.fresh(f"{e.output}_partial")
    stmts, info = lower_einsum(
        replace(e, output=partial), sizes, body.tensors, policy, body.names, dtype
    )
    body.stmts += stmts
    node = call(REDUCING[e.reduce], Ref(partial), axis_name=m.axis)
    if m.kind == "reduce_scatter":
        dim = e.indices.index(Var(m.self_rank))  # type: ignore[arg-type]
        if e.reduce == "sum":
            node = call(
                "psum_scatter", Ref(partial), axis_name=m.axis, scatter_dimension=dim, tiled=True
            )
        else:
            node = call(
                "dynamic_slice_in_dim", node, Ref(body.index[m.axis]), slice_size=1, axis=dim
            )
        info = replace(info, shape=local_shape(info.shape, frozenset({dim})))
    body.stmts.append(Assign(e.output, node))
    return info


def _read_collectives(body: Body, e: Einsum, m: Communication) -> Einsum:
    """Serve the reads that need another device's blocks (all_gather, ppermute, or refuse the
    self-read of a reduce-scatter); the Einsum then reads the served copies."""
    c, me, served = body.cascade, m.self_rank, {}

    def serve(x: Expr) -> Expr | None:
        if not isinstance(x, Access) or x.tensor == e.output:
            return None
        dim = c.device_dim(x.tensor, m.axis)
        if dim is None:
            return None
        at = x.indices[dim]
        if m.kind == "reduce_scatter" and at == Var(me):  # type: ignore[arg-type]
            raise BackendUnsupported(
                f"einsum {e.output}: a reduce-scatter that also reads {x.tensor} at its own "
                f"device rank {me}; split it so the reduction reads only reduced shards"
            )
        if m.kind not in ("all_gather", "ppermute") or at == Var(me):  # type: ignore[arg-type]
            return None
        shift = (0, False) if m.kind == "all_gather" else _shift_of(at, me)  # type: ignore[arg-type]
        what = "gathered" if m.kind == "all_gather" else f"from{shift[0]}{'ring' * shift[1]}"
        key = (x.tensor, what)
        if key not in served:
            served[key] = _serve(body, x.tensor, dim, m, what, shift)
        name = served[key]
        if m.kind == "all_gather":
            return Access(name, x.indices)
        return Access(name, (*x.indices[:dim], Var(me), *x.indices[dim + 1 :]))  # type: ignore[arg-type]

    expr = substitute(e.expr, serve)
    init = None if e.init is None else substitute(e.init, serve)
    return replace(e, expr=expr, init=init)


def _serve(
    body: Body, tensor: str, dim: int, m: Communication, what: str, ring: tuple[int, bool]
) -> str:
    info, dims = body.tensors[tensor], body.dims[tensor]
    name = body.names.fresh(f"{tensor}_{what}")
    n = body.sizes[next(iter(axes(body.cascade)[m.axis]))]
    if m.kind == "all_gather":
        node = call("all_gather", Ref(tensor), axis_name=m.axis, axis=dim, tiled=True)
        shape = (*info.shape[:dim], n, *info.shape[dim + 1 :])
        body.tensors[name] = replace(info, shape=shape)
        body.dims[name] = dims - {dim}
    else:
        shift, wraps = ring
        sources = [(dst + shift, dst) for dst in range(n)]
        perm = tuple(((s % n), d) if wraps else (s, d) for s, d in sources if wraps or 0 <= s < n)
        node = call("ppermute", Ref(tensor), axis_name=m.axis, perm=perm)
        body.tensors[name], body.dims[name] = info, dims
    body.stmts.append(Assign(name, node))
    return name


def _shift_of(at: Expr, me: str) -> tuple[int, bool]:
    shift = ring_shift(at, me)
    assert shift is not None, at
    return shift
