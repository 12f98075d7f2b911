"""What each Einsum of a cascade with device ranks communicates.

A device rank ``x`` bound to mesh axis ``tp`` (``device x on tp``) is the position of a device
along that axis. A tensor whose ranks include a device rank of ``tp`` is sharded over ``tp``
(device i holds the slice at index i); a tensor without one is replicated. The reference reads a
device rank as a plain rank, so a cascade means the same thing on one device and on a mesh; this
module says what running it on the mesh takes. Per Einsum and axis, the output's device rank
(``self``, if the output is sharded) decides how each read of a sharded tensor's device dim is
served:

    index ``x`` (self)               the device's own shard: no communication
    ``mod(x + k, X)`` or ``x + k``   another device's shard: ppermute by k (ring; no wrap: 0)
    a rank kept on the left          every shard: all-gather
    a rank reduced (sum/max/min)     every shard, combined: all-reduce, or reduce-scatter when
                                     the output is sharded (self indexes a data dim instead)

One Einsum communicates along one axis in one way; anything else is refused with the reason,
so the emitter never guesses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.errors import VerifyError
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, accesses, rank_vars, shifted_rank

CollectiveKind = Literal["local", "all_reduce", "reduce_scatter", "all_gather", "ppermute"]
REDUCING = {"sum": "psum", "max": "pmax", "min": "pmin"}


@dataclass(frozen=True, slots=True)
class DeviceRead:
    """One read of a sharded tensor's device dim, and how it is served."""

    tensor: str
    dim: int
    kind: CollectiveKind
    rank: str | None = None  # the rank at the device dim (self, gathered or reduced)
    shift: int = 0  # ppermute: read the shard of device (self + shift)
    wraps: bool = False  # ppermute: mod(self + shift, X) (a ring) rather than self + shift


@dataclass(frozen=True, slots=True)
class Communication:
    """What one Einsum needs along one mesh axis."""

    einsum: str
    axis: str
    kind: CollectiveKind
    self_rank: str | None  # the output's device rank on this axis; None: replicated output
    reads: tuple[DeviceRead, ...]

    @property
    def reduced_rank(self) -> str | None:
        """all-reduce / reduce-scatter: the device rank summed over."""
        return next((r.rank for r in self.reads if r.kind == self.kind), None)


def axes(c: Cascade) -> dict[str, tuple[str, ...]]:
    """Mesh axis -> the device ranks bound to it, in declaration order."""
    out: dict[str, list[str]] = {}
    for rank, axis in c.devices:
        out.setdefault(axis, []).append(rank)
    return {a: tuple(rs) for a, rs in out.items()}


def communications(c: Cascade) -> tuple[Communication, ...]:
    """Every Einsum's communication along every axis it touches (``local`` ones included)."""
    return tuple(comm for e in c.einsums for comm in _einsum_comms(c, e))


def collectives(c: Cascade) -> tuple[Communication, ...]:
    """The Einsums that communicate, in program order."""
    return tuple(comm for comm in communications(c) if comm.kind != "local")


def check_devices(c: Cascade) -> None:
    """Raise VerifyError on device-rank misuse (the verifier calls this)."""
    bound: dict[str, str] = {}
    for rank, axis in c.devices:
        if rank in bound:
            raise VerifyError(f"device rank {rank} bound twice", where="device")
        bound[rank] = axis
    for axis, ranks in axes(c).items():
        sizes = {str(c.size(r)) for r in ranks}
        if len(sizes) > 1:
            raise VerifyError(
                f"device ranks {', '.join(ranks)} of axis {axis} differ in size "
                f"({', '.join(sorted(sizes))}); each is the axis' device count",
                where="device",
            )
    for t in c.inputs:
        _one_device_rank_per_axis(c, t.name, t.ranks)
    for e in c.einsums:
        _one_device_rank_per_axis(c, e.output, c.tensor_ranks(e.output), e)
    communications(c)  # classifying every Einsum raises on a read it cannot serve


def _one_device_rank_per_axis(
    c: Cascade, tensor: str, ranks: tuple[str, ...], e: Einsum | None = None
) -> None:
    seen: dict[str, str] = {}
    for r in ranks:
        axis = c.device_axis(r)
        if axis is None:
            continue
        if axis in seen:
            raise VerifyError(
                f"tensor {tensor} has two device ranks of axis {axis} ({seen[axis]}, {r}); "
                "a tensor is sharded at most once per axis",
                e.loc if e is not None else None,
                where=f"einsum {e.output}" if e is not None else "inputs",
            )
        seen[axis] = r


def _einsum_comms(c: Cascade, e: Einsum) -> Iterator[Communication]:
    for axis, ranks in axes(c).items():
        yield _classify(c, e, axis, set(ranks))


def _fail(e: Einsum, axis: str, msg: str) -> VerifyError:
    return VerifyError(f"axis {axis}: {msg}", e.loc, where=f"einsum {e.output}")


def _classify(c: Cascade, e: Einsum, axis: str, ranks: set[str]) -> Communication:
    selfs = [i.rank for i in e.indices if isinstance(i, Var) and i.rank in ranks]
    for i in e.indices:
        if not isinstance(i, Var) and set(rank_vars(i)) & ranks:
            raise _fail(e, axis, f"left index {i}: a device rank is a plain left index")
    if len(selfs) > 1:
        raise _fail(e, axis, f"output sharded twice ({', '.join(selfs)})")
    me = selfs[0] if selfs else None
    reads = []
    reads_list = accesses(e.expr) + (accesses(e.init) if e.init is not None else [])
    for a in reads_list:
        if a.tensor == e.output:
            continue
        dim = c.device_dim(a.tensor, axis)
        if dim is None:
            continue
        reads.append(_serve(e, axis, a, dim, me, ranks))
    kinds = {r.kind for r in reads} - {"local"}
    if len(kinds) > 1:
        raise _fail(
            e,
            axis,
            f"needs {' and '.join(sorted(kinds))} in one Einsum; split it so each Einsum "
            "communicates one way",
        )
    kind: CollectiveKind = kinds.pop() if kinds else "local"
    if kind in ("all_reduce", "reduce_scatter") and e.reduce not in REDUCING:
        raise _fail(e, axis, f"a {e.reduce} reduction over devices has no collective")
    if kind == "all_reduce" and me is not None:
        kind = "reduce_scatter"
        if not any(me in rank_vars(i) for r in reads_list for i in r.indices):
            raise _fail(e, axis, f"reduce-scatter: {me} must index the scattered data dim")
    reduced = {r.rank for r in reads if r.kind == "all_reduce"}
    if len(reduced) > 1:
        raise _fail(e, axis, f"reduces over two device ranks ({', '.join(sorted(reduced))})")
    final = tuple(
        DeviceRead(r.tensor, r.dim, kind, r.rank) if r.kind == "all_reduce" else r for r in reads
    )
    return Communication(e.output, axis, kind, me, final)


def _serve(
    e: Einsum, axis: str, a: Access, dim: int, me: str | None, ranks: set[str]
) -> DeviceRead:
    index = a.indices[dim]
    if isinstance(index, Var) and index.rank == me:
        return DeviceRead(a.tensor, dim, "local", me)
    shift = ring_shift(index, me)
    if shift is not None:
        return DeviceRead(a.tensor, dim, "ppermute", me, shift[0], shift[1])
    if isinstance(index, Var):
        r = index.rank
        if r in e.reduced_ranks:
            return DeviceRead(a.tensor, dim, "all_reduce", r)
        return DeviceRead(a.tensor, dim, "all_gather", r)
    raise _fail(
        e,
        axis,
        f"reads the device dim of {a.tensor} at {index}: a device dim is read at the output's "
        "device rank, at mod(self + k, X), or at a plain rank (gathered or reduced)",
    )


def ring_shift(index: Expr, me: str | None) -> tuple[int, bool] | None:
    """``x + k`` -> (k, False); ``mod(x + k, X)`` -> (k, True), for the output's rank x."""
    if me is None:
        return None
    wraps = False
    if isinstance(index, Op) and index.op == "mod":
        inner, modulus = index.args
        if not isinstance(modulus, Size | Const):
            return None
        index, wraps = inner, True
    sr = shifted_rank(index)
    if sr is None or sr[0] != me or (sr[1] == 0 and not wraps):
        return None
    return sr[1], wraps
