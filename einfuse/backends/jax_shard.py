"""A cascade with device ranks as one ``jax.shard_map`` over the mesh its axes name.

The cascade is the global view (the reference reads device ranks as plain ranks); the body of
the ``shard_map`` is what one device runs. There every device rank that stands for this device
has local size 1 and the value ``lax.axis_index(axis)``, a sharded tensor is its local block
(extent 1 at its device dim), and each Einsum becomes what ``einfuse.ir.devices`` says it
communicates:

    local           the single-device lowering of the local blocks
    all_reduce      the local partial (the reduced device rank := this device), then psum/pmax/pmin
    reduce_scatter  the partial over the whole scattered rank, then psum_scatter (tiled);
                    max/min: pmax/pmin, then this device's slice
    all_gather      all_gather (tiled) of the read tensor, then the local Einsum
    ppermute        ppermute of the read tensor by the shift (no wrap: the edge reads zeros)

Any other device rank an Einsum mentions (a replicated result summed over the devices'
blocks of a replicated tensor, the scattered rank of a reduce-scatter's partial) is an
ordinary rank of its full size. Collectives change the order of floating-point sums, so the
result equals the reference up to that reordering (float32: rtol ~1e-5).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core  # trace_state_clean: is this call under a transformation?
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from einfuse.backends.jax_backend import DEFAULT_MAX_BLOWUP, JaxCascade, with_dtype
from einfuse.backends.jax_lower import Names, Policy
from einfuse.backends.jax_ops import Assign, Stmt, call, format_stmt, format_value, run
from einfuse.backends.jax_shard_body import Body, device_dims, local_shape, lower_on_mesh
from einfuse.backends.jax_values import TensorInfo, canonical_dtype
from einfuse.backends.xla_overlap import top_level_options
from einfuse.ir.cascade import Cascade
from einfuse.ir.devices import Communication, axes, communications
from einfuse.ir.dtypes import tensor_dtypes
from einfuse.ir.errors import EinfuseError


def mesh_for(cascade: Cascade, sizes: Mapping[str, int], mesh: Mesh | None = None) -> Mesh:
    """``mesh`` checked against the cascade's axes, or one built from ``jax.devices()``."""
    want = {axis: sizes[ranks[0]] for axis, ranks in axes(cascade).items()}
    if mesh is not None:
        have = dict(mesh.shape)
        for axis, n in want.items():
            if have.get(axis) != n:
                raise EinfuseError(
                    f"mesh axis {axis} has {have.get(axis, 'no')} devices; the cascade's "
                    f"device ranks on {axis} have size {n}"
                )
        return mesh
    count, devices = math.prod(want.values()), jax.devices()
    if len(devices) < count:
        layout = ", ".join(f"{a}={n}" for a, n in want.items())
        raise EinfuseError(
            f"the cascade's mesh ({layout}) needs {count} devices; JAX sees {len(devices)} "
            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count before importing jax)"
        )
    grid = np.array(devices[:count]).reshape(tuple(want.values()))
    return Mesh(grid, tuple(want))


@dataclass(frozen=True)
class ShardedLowered:
    """The body statements of one ``shard_map``, with its specs, ready to run or print."""

    inputs: tuple[tuple[str, TensorInfo], ...]  # global shapes
    outputs: tuple[str, ...]
    stmts: tuple[Stmt, ...]  # over local blocks
    sizes: tuple[tuple[str, int], ...]
    out_dtypes: tuple[np.dtype, ...]
    in_specs: tuple[P, ...]
    out_specs: tuple[P, ...]
    mesh: Mesh

    def __call__(self, arrays: Mapping[str, Any]) -> dict[str, jax.Array]:
        xs = []
        for name, info in self.inputs:
            x = jnp.asarray(arrays[name])
            if tuple(x.shape) != info.shape:
                raise EinfuseError(
                    f"input {name} has shape {tuple(x.shape)}, expected {info.shape}"
                )
            xs.append(x.astype(info.dtype))
        names = [n for n, _ in self.inputs]

        def body(*blocks: jax.Array) -> tuple[jax.Array, ...]:
            env = run(self.stmts, dict(zip(names, blocks)))
            return tuple(env[o] for o in self.outputs)

        # check_vma=False: an all_gather's result is the same on every device but typed as
        # varying, so a replicated out_spec of it would be refused; the tests check values
        # and gradients against the unsharded reference instead.
        outs = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=self.in_specs,
            out_specs=self.out_specs,
            check_vma=False,
        )(*xs)
        return {o: x.astype(d) for o, x, d in zip(self.outputs, outs, self.out_dtypes)}

    def source(self, fn_name: str = "cascade") -> str:
        args = ", ".join(n for n, _ in self.inputs)
        mesh = ", ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
        lines = [f"def {fn_name}({args}):"]
        lines.append(f"    # sizes: {', '.join(f'{r}={n}' for r, n in self.sizes)}")
        lines.append(f"    # mesh: {mesh}")
        for (name, info), spec in zip(self.inputs, self.in_specs):
            lines.append(f"    # {name}: {format_value(info.dtype)}{list(info.shape)} {spec}")
        lines.append(f"    def body({args}):")
        for s in self.stmts:
            lines.extend("        " + line for line in format_stmt(s))
        lines.append(f"        return ({', '.join(self.outputs)},)")
        lines.append(
            f"    return jax.shard_map(body, mesh=mesh, in_specs={self.in_specs}, "
            f"out_specs={self.out_specs}, check_vma=False)({args})"
        )
        return "\n".join(lines) + "\n"


def lower_sharded(
    cascade: Cascade,
    sizes: Mapping[str, int],
    mesh: Mesh | None = None,
    *,
    dtype: Any = None,
    accumulate_dtype: Any = None,
    precision: Any = None,
    max_blowup: float = DEFAULT_MAX_BLOWUP,
    wide_dots: bool = False,
) -> ShardedLowered:
    """The shard_map of ``cascade`` for concrete ``sizes`` (global, one int per rank)."""
    cascade = with_dtype(cascade, dtype)
    mesh = mesh_for(cascade, sizes, mesh)
    weak = canonical_dtype(dtype or np.float32).name
    dtypes = {k: canonical_dtype(v) for k, v in tensor_dtypes(cascade, weak).items()}
    acc = None if accumulate_dtype is None else canonical_dtype(accumulate_dtype)
    names = Names({t.name for t in cascade.inputs} | {e.output for e in cascade.einsums})
    index = {axis: names.fresh(f"{axis}_index") for axis in axes(cascade)}
    stmts: list[Stmt] = [Assign(v, call("axis_index", axis_name=a)) for a, v in index.items()]
    body = Body(
        cascade,
        sizes,
        Policy(acc, precision, max_blowup, wide_dots),
        names,
        dtypes,
        {},
        {},
        index,
        stmts,
    )
    inputs, in_specs = [], []
    for t in cascade.inputs:
        body.dims[t.name] = device_dims(cascade, t.ranks)
        shape = tuple(sizes[r] for r in t.ranks)
        body.tensors[t.name] = TensorInfo(local_shape(shape, body.dims[t.name]), dtypes[t.name])
        inputs.append((t.name, TensorInfo(shape, dtypes[t.name])))
        in_specs.append(_spec(cascade, t.ranks))
    by_einsum: dict[str, list[Communication]] = {}
    for comm in communications(cascade):
        by_einsum.setdefault(comm.einsum, []).append(comm)
    for e in cascade.einsums:
        lower_on_mesh(body, e, by_einsum.get(e.output, []))
    out_specs = tuple(_spec(cascade, cascade.tensor_ranks(o)) for o in cascade.outputs)
    return ShardedLowered(
        tuple(inputs),
        cascade.outputs,
        tuple(body.stmts),
        tuple(sorted(sizes.items())),
        tuple(body.tensors[o].dtype for o in cascade.outputs),
        tuple(in_specs),
        out_specs,
        mesh,
    )


def _spec(c: Cascade, ranks: tuple[str, ...]) -> P:
    return P(*(c.device_axis(r) for r in ranks))


class ShardedCascade(JaxCascade):
    """``emit_jax`` of a cascade with device ranks: the same calling convention, run as one
    ``shard_map``. An input may also be given with its device dim merged into the next
    (``W[h, d]`` for ``W[x, h0, d]``), as the lifter's shard_map arguments are."""

    def __init__(
        self,
        cascade: Cascade,
        sizes: Mapping[str, int] | None,
        *,
        mesh: Mesh | None = None,
        jit: bool = True,
        **options: Any,
    ) -> None:
        self.mesh = mesh
        super().__init__(cascade, sizes, jit=jit, blockwise=False, **options)
        if jit:
            self._run = self._run_top_level

    def _run_top_level(self, arrays: dict[str, Any]) -> dict[str, jax.Array]:
        """Compiled with ``top_level_options`` (XLA's combiners would merge the collectives
        the cascade split) when called on arrays; traced (under einfuse.jit's or a user's jit
        or grad), JAX allows options only on the outer jit, so plain jit."""
        return (self._top if core.trace_state_clean() else self._nested)(arrays)

    @functools.cached_property
    def _top(self) -> Callable[[dict[str, Any]], dict[str, jax.Array]]:
        platform = self.mesh.devices.flat[0].platform if self.mesh is not None else None
        return jax.jit(self._evaluate, compiler_options=top_level_options(platform))

    @functools.cached_property
    def _nested(self) -> Callable[[dict[str, Any]], dict[str, jax.Array]]:
        return jax.jit(self._evaluate)

    def _lower(self, bound: dict[str, int]) -> Any:
        key = tuple(sorted(bound.items()))
        if key not in self._lowered:
            self._lowered[key] = lower_sharded(self.cascade, bound, self.mesh, **self.options)  # type: ignore[assignment]
        return self._lowered[key]

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        arrays = super().bind(*args, **kwargs)
        for t in self.cascade.inputs:
            shape = tuple(np.shape(arrays[t.name]))
            declared = declared_shape(self.cascade, t.name, shape, self._axis_size)
            if declared != shape:
                arrays[t.name] = jnp.reshape(arrays[t.name], declared)
        return arrays

    def _axis_size(self, rank: str) -> int:
        axis = self.cascade.device_axis(rank)
        if self.mesh is not None and axis in self.mesh.shape:
            return int(self.mesh.shape[axis])
        size = self.sizes.get(rank, self.cascade.size(rank))
        if not isinstance(size, int):
            raise EinfuseError(f"device rank {rank}: give its size (the device count of {axis})")
        return size


def declared_shape(
    c: Cascade, tensor: str, shape: tuple[int, ...], axis_size: Callable[[str], int]
) -> tuple[int, ...]:
    """The declared shape of an input given ``shape``: a shard_map's argument has its device
    dim merged into the next (``W[h, d]`` for ``W[x, h0, d]``, ``h = x*H0 + h0``)."""
    ranks = c.tensor_ranks(tensor)
    dims = sorted(device_dims(c, ranks))
    if len(dims) != 1 or len(shape) != len(ranks) - 1 or dims[0] >= len(shape):
        return shape
    d = dims[0]
    n = axis_size(ranks[d])
    if shape[d] % n:
        raise EinfuseError(
            f"input {tensor}: dim {d} of size {shape[d]} does not split over {n} devices"
        )
    return (*shape[:d], n, shape[d] // n, *shape[d + 1 :])


def emit_sharded(
    cascade: Cascade,
    sizes: Mapping[str, int] | None = None,
    *,
    mesh: Mesh | None = None,
    jit: bool = True,
    **options: Any,
) -> ShardedCascade:
    """Emit a cascade with device ranks as a ``shard_map`` over ``mesh`` (default: one
    built from ``jax.devices()`` with the cascade's axes)."""
    return ShardedCascade(cascade, sizes, mesh=mesh, jit=jit, **options)
