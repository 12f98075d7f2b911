"""The Cascade: an ordered DAG of extended Einsums over named ranks.

Everything between the lifter and the emitter is this one immutable structure;
passes build new ones. Rank sizes are ints or sympy expressions, so a library
cascade can stay symbolic (``M``) until the caller binds shapes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import networkx as nx
import sympy

from einfuse.ir.expr import Expr, accesses, rank_vars, shifted_rank

SizeValue = int | sympy.Expr


@dataclass(frozen=True, slots=True)
class SourceLoc:
    """Where a construct came from, for errors; never part of equality."""

    line: int
    col: int
    text: str = ""
    file: str = ""

    def __str__(self) -> str:
        return f"{self.file or '<spec>'}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class TensorDecl:
    name: str
    ranks: tuple[str, ...]
    dtype: str = "float32"
    loc: SourceLoc | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class Einsum:
    """``output[indices] = reduce(ranks) expr``; ``init`` makes it a recurrence.

    A recurrence reads its own output one step back along its iterative rank
    (``RM[m1+1, p] = max(RM[m1, p], LM[m1, p])``); ``init`` is the value at step 0
    (``RM[0, p] = -inf``). The reduced ranks are derived: those on the right and not
    on the left (Einstein convention), combined with ``reduce``.
    """

    output: str
    indices: tuple[Expr, ...]
    expr: Expr
    reduce: str = "sum"
    init: Expr | None = None
    loc: SourceLoc | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def output_ranks(self) -> tuple[str, ...]:
        """Rank variables of the left side, in order."""
        out: dict[str, None] = {}
        for i in self.indices:
            for r in rank_vars(i):
                out.setdefault(r)
        return tuple(out)

    @property
    def ranks(self) -> tuple[str, ...]:
        """The iteration space: left ranks first, then the right's in order of appearance."""
        out = dict.fromkeys(self.output_ranks)
        for r in rank_vars(self.expr):
            out.setdefault(r)
        return tuple(out)

    @property
    def reduced_ranks(self) -> tuple[str, ...]:
        left = set(self.output_ranks)
        return tuple(r for r in self.ranks if r not in left)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Tensors read (the initial value's reads too), excluding the output itself."""
        reads = accesses(self.expr) + (accesses(self.init) if self.init is not None else [])
        seen = dict.fromkeys(a.tensor for a in reads if a.tensor != self.output)
        return tuple(seen)

    @property
    def is_recurrence(self) -> bool:
        return any(a.tensor == self.output for a in accesses(self.expr))

    @property
    def iterative_rank(self) -> str | None:
        """The rank a recurrence steps along: the left index written ``r+1``."""
        if not self.is_recurrence:
            return None
        for i in self.indices:
            sr = shifted_rank(i)
            if sr is not None and sr[1] == 1:
                return sr[0]
        return None

    @property
    def iterative_dim(self) -> int | None:
        r = self.iterative_rank
        if r is None:
            return None
        return next(d for d, i in enumerate(self.indices) if shifted_rank(i) == (r, 1))


@dataclass(frozen=True, slots=True)
class Partition:
    """Record that ``rank`` was split into ``outer`` x ``inner`` with tile ``tile``.

    ``inner`` has size ``tile`` and ``outer`` size ``ceiling(rank/tile)``; reads of the
    original rank become ``outer*tile + inner`` and may run past its end, where the
    padding is masked by the pass that introduced it.
    """

    rank: str
    outer: str
    inner: str
    tile: SizeValue


@dataclass(frozen=True)
class Cascade:
    inputs: tuple[TensorDecl, ...]
    einsums: tuple[Einsum, ...]
    outputs: tuple[str, ...]
    sizes: tuple[tuple[str, SizeValue], ...] = ()
    partitions: tuple[Partition, ...] = ()
    # Device ranks: ``(rank, mesh axis)``. A tensor with a device rank among its ranks is
    # sharded over that axis (device i holds index i); one without is replicated. The
    # reference reads them as plain ranks; ``einfuse.ir.devices`` says what each Einsum
    # communicates.
    devices: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Canonical sizes (defaults dropped, ints as ints) make equality mean "same program".
        from einfuse.ir.text_sizes import normalize_size

        sizes = []
        for r, s in self.sizes:
            s = normalize_size(s)
            if s != default_size(r):
                sizes.append((r, s))
        object.__setattr__(self, "sizes", tuple(sizes))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "einsums", tuple(self.einsums))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "devices", tuple(self.devices))

    # -- lookups --------------------------------------------------------------
    @cached_property
    def _size_map(self) -> dict[str, SizeValue]:
        return dict(self.sizes)

    def size(self, rank: str) -> SizeValue:
        """A rank's size; undeclared ranks are the symbol of their upper-case name."""
        return self._size_map.get(rank, default_size(rank))

    def all_ranks(self) -> tuple[str, ...]:
        """Every rank used anywhere, in order of first appearance."""
        seen: dict[str, None] = {}
        for t in self.inputs:
            seen.update(dict.fromkeys(t.ranks))
        for e in self.einsums:
            seen.update(dict.fromkeys(e.ranks))
            for i in e.indices:
                seen.update(dict.fromkeys(rank_vars(i)))
        for r, _ in self.sizes:
            seen.setdefault(r)
        return tuple(seen)

    @cached_property
    def _device_axes(self) -> dict[str, str]:
        return dict(self.devices)

    def device_axis(self, rank: str) -> str | None:
        """The mesh axis a device rank is bound to; None for an ordinary rank."""
        return self._device_axes.get(rank)

    def device_dim(self, tensor: str, axis: str) -> int | None:
        """The dim of ``tensor`` sharded over ``axis`` (its device rank's), or None."""
        axes = self._device_axes
        dims = [d for d, r in enumerate(self.tensor_ranks(tensor)) if axes.get(r) == axis]
        return dims[0] if dims else None

    def writer(self, tensor: str) -> Einsum | None:
        return self._writers.get(tensor)

    @cached_property
    def _writers(self) -> dict[str, Einsum]:
        return {e.output: e for e in self.einsums}

    def input_decl(self, name: str) -> TensorDecl | None:
        return next((t for t in self.inputs if t.name == name), None)

    def tensor_ranks(self, name: str) -> tuple[str, ...]:
        """The declared ranks of a tensor: an input's declaration or its writer's left side.

        A left index that is not a plain rank (``RM[m1+1, p]``) contributes its rank.
        """
        decl = self.input_decl(name)
        if decl is not None:
            return decl.ranks
        e = self.writer(name)
        if e is None:
            raise KeyError(name)
        out = []
        for i in e.indices:
            vs = rank_vars(i)
            out.append(vs[0] if vs else "")
        return tuple(out)

    def tensor_shape(self, name: str, bind: Mapping[str, int] | None = None) -> tuple:
        """Extents of a tensor's dims; a recurrence's iterative dim holds one more step."""
        ranks = self.tensor_ranks(name)
        shape = [self.size(r) for r in ranks]
        e = self.writer(name)
        if e is not None and e.iterative_dim is not None:
            shape[e.iterative_dim] = shape[e.iterative_dim] + 1
        if bind is not None:
            shape = [bind_size(s, bind, self) for s in shape]
        return tuple(shape)

    def consumers(self, tensor: str) -> tuple[Einsum, ...]:
        return tuple(e for e in self.einsums if tensor in e.inputs)

    def graph(self) -> nx.DiGraph:
        """Tensor dependency graph: an edge ``a -> b`` when ``b``'s Einsum reads ``a``."""
        g = nx.DiGraph()
        for t in self.inputs:
            g.add_node(t.name, kind="input")
        for e in self.einsums:
            g.add_node(e.output, kind="einsum")
            for t in e.inputs:
                g.add_edge(t, e.output)
        return g

    def fingerprint(self) -> str:
        """A stable hash of the text form, for tuning-database keys."""
        return hashlib.sha256(str(self).encode()).hexdigest()[:16]

    def with_einsums(self, einsums: tuple[Einsum, ...] | list[Einsum], **changes) -> Cascade:
        return replace(self, einsums=tuple(einsums), **changes)

    def with_sizes(self, **sizes: SizeValue) -> Cascade:
        """Bind or change rank sizes, keeping declaration order."""
        cur = dict(self.sizes)
        for r in self.all_ranks():
            cur.setdefault(r, self.size(r))
        cur.update({k: sympy.sympify(v) if isinstance(v, str) else v for k, v in sizes.items()})
        return replace(self, sizes=tuple(cur.items()))

    def __iter__(self) -> Iterator[Einsum]:
        return iter(self.einsums)

    def __str__(self) -> str:
        from einfuse.ir.text_print import format_cascade

        return format_cascade(self)


def default_size(rank: str) -> sympy.Symbol:
    return sympy.Symbol(rank.upper(), integer=True, positive=True)


def bind_size(size: SizeValue, bind: Mapping[str, int], cascade: Cascade | None = None) -> int:
    """Evaluate a size under a binding of symbols (``{"M": 4096}``) or of rank names."""
    if isinstance(size, int):
        return size
    subs = {}
    for s in size.free_symbols:
        name = s.name
        if name in bind:
            subs[s] = bind[name]
        elif name.lower() in bind:
            subs[s] = bind[name.lower()]
    value = size.subs(subs)
    if not value.is_number:
        missing = sorted(str(s) for s in value.free_symbols)
        raise ValueError(f"size {size} is unbound: give a value for {', '.join(missing)}")
    return int(value)


def bind_sizes(cascade: Cascade, bind: Mapping[str, int] | None = None) -> dict[str, int]:
    """Concrete size of every rank of a cascade; a binding may name a rank or its symbol."""
    bind = dict(bind or {})
    out: dict[str, int] = {}
    for r in cascade.all_ranks():
        if r in bind:
            out[r] = int(bind[r])
        else:
            out[r] = bind_size(cascade.size(r), bind, cascade)
    return out
