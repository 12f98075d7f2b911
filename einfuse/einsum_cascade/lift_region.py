"""The value model of the lifter: jaxpr values as views of cascade tensors or pending expressions.

Every jaxpr value in a region is a ``Value``: a *view* (an index map, so transposes,
broadcasts, reshape splits and slices cost no Einsum) of a ``Base``. A base is either a
tensor of the cascade (a region input or an Einsum's output) or a pending elementwise
expression. A pending expression is inlined into its one consumer, so a chain of
elementwise primitives becomes one Einsum (``SN[m, p] = exp(QK[m, p] - GM[p])``), and it
is materialized when two consumers read it or when a contraction or reduction needs it,
because those read stored tensors only. Expressions without tensor reads (iota masks,
broadcast literals) are cheap and always inlined.

Ranks get short fresh names (``a``, ``b``, ..., ``a1``, ...) and are carried through
elementwise ops, views and contractions, so one logical axis keeps one name where it can.
"""

from __future__ import annotations

import linecache
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from jax._src import source_info_util

from einfuse.einsum_cascade.lift_flatten import FlatEqn, literal_value
from einfuse.ir.cascade import Cascade, Einsum, SourceLoc, TensorDecl
from einfuse.ir.dtypes import DEFAULT_DTYPE, FLOAT_DTYPES, cast, expr_dtype
from einfuse.ir.expr import Access, Const, Expr, Size, Var, accesses, rank_vars, substitute

Index = tuple[Expr, ...]
Builder = Callable[[Index], Expr]
IndexMap = Callable[[Index], Index]


@dataclass(eq=False)
class Base:
    """Storage behind one or more views: a tensor, or an expression not yet stored."""

    shape: tuple[int, ...]
    dtype: np.dtype
    ranks: tuple[str | None, ...]
    hint: str
    source: Any = None
    build: Builder | None = None
    tensor: str | None = None
    cheap: bool = False
    uses: int = 1
    weight: int = 1  # nodes of the expression as it would be inlined


CHEAP_WEIGHT = 32  # a cheap expression is inlined at every use, so it must stay small
INT_WEIGHT = 256


class Decline(Exception):
    """Raised by a rule that cannot lift this equation after all; it stays opaque."""


def _inlined_weight(base: Base) -> int:
    inlined = base.tensor is None and (base.cheap or base.uses <= 1)
    return base.weight if inlined else 1


@dataclass(frozen=True, eq=False)
class Value:
    """A jaxpr value: ``base`` read through ``index`` (None: the identity)."""

    base: Base
    shape: tuple[int, ...]
    dtype: np.dtype
    ranks: tuple[str | None, ...]
    index: IndexMap | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def view(self, shape: Sequence[int], ranks: Sequence[str | None], index: IndexMap) -> Value:
        """A view of this value; ``index`` maps the new view's indices to this value's."""
        inner = self.index
        composed = index if inner is None else (lambda idx: inner(index(idx)))
        return Value(self.base, tuple(shape), self.dtype, tuple(ranks), composed)


def _rank_names() -> Any:
    letters = string.ascii_lowercase
    yield from letters
    n = 1
    while True:
        for c in letters:
            yield f"{c}{n}"
        n += 1


@dataclass
class RegionBuilder:
    """Accumulates one region's Einsums while its equations are lifted in order."""

    avals: dict[int, Any]
    uses: dict[int, int]
    values: dict[int, Value] = field(default_factory=dict)
    inputs: list[tuple[int, TensorDecl]] = field(default_factory=list)
    einsums: list[Einsum] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    eqns: list[FlatEqn] = field(default_factory=list)
    defined: list[int] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)  # each tensor's, as the IR infers it
    _names: dict[str, int] = field(default_factory=dict)
    _ranks: Any = field(default_factory=_rank_names)

    # -- names ---------------------------------------------------------------
    def tensor_name(self, hint: str) -> str:
        k = self._names.get(hint, 0)
        self._names[hint] = k + 1
        return f"{hint}{k}"

    def fresh_rank(self, size: int) -> str:
        r = next(self._ranks)
        self.sizes[r] = int(size)
        return r

    def choose_ranks(
        self, preferred: Sequence[str | None], shape: Sequence[int], taken: Sequence[str] = ()
    ) -> tuple[str, ...]:
        """One distinct rank per dim: the preferred name where it is free and fits, else fresh."""
        used = set(taken)
        out = []
        for pref, size in zip(preferred, shape):
            ok = pref is not None and pref not in used and self.sizes.get(pref) == size
            r = pref if ok else self.fresh_rank(size)
            used.add(r)
            out.append(r)
        return tuple(out)

    # -- values --------------------------------------------------------------
    def define(self, var: int, value: Value) -> None:
        self.values[var] = value
        self.defined.append(var)

    def read(self, atom: Any) -> Value:
        """The value of an id (declaring a region input on first read) or of a literal."""
        if not isinstance(atom, int):
            const = literal_const(atom)
            base = Base((), np.dtype(atom.aval.dtype), (), "C", build=lambda idx: const, cheap=True)
            return Value(base, (), base.dtype, ())
        if atom in self.values:
            return self.values[atom]
        aval = self.avals[atom]
        shape = tuple(int(n) for n in aval.shape)
        ranks = tuple(self.fresh_rank(n) for n in shape)
        name = self.tensor_name("X")
        dtype = np.dtype(aval.dtype)
        self.inputs.append((atom, TensorDecl(name, ranks, dtype.name)))
        self.dtypes[name] = dtype.name
        value = Value(Base(shape, dtype, ranks, "X", tensor=name), shape, dtype, ranks)
        self.values[atom] = value
        return value

    def pending(
        self,
        var: int,
        eqn: FlatEqn,
        build: Builder,
        ranks: Sequence[str | None],
        operands: Sequence[Value] = (),
    ) -> Value:
        """Define ``var`` as an elementwise expression, inlined or stored on demand.

        It is cheap (inlined at every use) when it reads no tensor and stays small.
        Integers are never stored, since the backend stores in the float compute dtype,
        so an integer expression is always inlined, up to a size beyond which the
        equation is declined (left to JAX).
        """
        aval = self.avals[var]
        shape, dtype = tuple(int(n) for n in aval.shape), np.dtype(aval.dtype)
        weight = 1 + sum(_inlined_weight(v.base) for v in operands)
        cheap = all(v.base.cheap and v.base.tensor is None for v in operands)
        cheap = cheap and weight <= CHEAP_WEIGHT
        if dtype.kind in "iu":
            if weight > INT_WEIGHT:
                raise Decline(f"integer expression of {weight} nodes")
            cheap = True
        base = Base(shape, dtype, tuple(ranks), _hint(eqn), eqn.source, build, cheap=cheap)
        base.uses, base.weight = self.uses.get(var, 0), weight
        value = Value(base, shape, dtype, tuple(ranks))
        self.define(var, value)
        return value

    def expr(self, value: Value, idx: Index) -> Expr:
        """``value`` at ``idx``: a read of its tensor, or its expression inlined."""
        base = value.base
        at = value.index(idx) if value.index is not None else idx
        if base.tensor is None and not base.cheap and base.uses > 1:
            self.materialize(base)
        if base.tensor is not None:
            return Access(base.tensor, at)
        assert base.build is not None
        return base.build(at)

    def access(self, value: Value, idx: Index) -> Access:
        """``value`` at ``idx`` as a tensor read (contractions and reductions read tensors)."""
        if value.base.tensor is None:
            self.materialize(value.base)
        at = value.index(idx) if value.index is not None else idx
        return Access(value.base.tensor, at)  # type: ignore[arg-type]

    def access_all(self, value: Value, idx: Index) -> Access:
        """A read that iterates every rank in ``idx``, for reductions.

        A view that broadcasts along a dim reads it at index 0, so its rank would vanish
        from the Einsum and not be reduced at all (a sum would miss its factor); such a
        view is stored first, as a map Einsum that broadcasts on its left side.
        """
        read = self.access(value, idx)
        present = {r for i in read.indices for r in rank_vars(i)}
        if all(i.rank in present for i in idx if isinstance(i, Var)):
            return read
        own = tuple(Var(r) for r in self.choose_ranks(value.ranks, value.shape))
        name = self.emit(
            "BCAST", own, self.access(value, own), value.base.source, dtype=value.dtype
        )
        return Access(name, idx)

    def materialize(self, base: Base) -> None:
        assert base.build is not None
        ranks = self.choose_ranks(base.ranks, base.shape)
        idx = tuple(Var(r) for r in ranks)
        expr = base.build(idx)
        name = self.emit(base.hint, idx, expr, base.source, dtype=base.dtype)
        base.tensor, base.build, base.ranks = name, None, ranks

    def emit(
        self,
        hint: str,
        idx: Index,
        expr: Expr,
        source: Any,
        reduce: str = "sum",
        dtype: np.dtype | None = None,
    ) -> str:
        """Append ``hint<k>[idx] = reduce expr``, cast so its tensor has JAX's ``dtype``."""
        name = self.tensor_name(hint)
        if dtype is not None:
            want = np.dtype(dtype).name
            expr = self.typed(expr, want if want in FLOAT_DTYPES else DEFAULT_DTYPE)
        self.einsums.append(Einsum(name, idx, expr, reduce, loc=source_loc(source)))
        self.dtypes[name] = self.dtype_of(expr) or DEFAULT_DTYPE
        return name

    def dtype_of(self, expr: Expr) -> str | None:
        """The IR's dtype of an expression over this region's tensors (None: weak)."""
        return expr_dtype(expr, self.dtypes.get)

    def typed(self, expr: Expr, dtype: str, weak_ok: bool = False) -> Expr:
        """``expr``, cast to ``dtype`` unless the IR already infers that dtype for it (or,
        with ``weak_ok``, infers none: a weak expression takes its consumer's dtype)."""
        got = self.dtype_of(expr)
        if got == dtype or (got is None and (weak_ok or dtype == DEFAULT_DTYPE)):
            return expr
        return cast(dtype, expr)

    def stored(self, var: int, eqn: FlatEqn, name: str, ranks: tuple[str, ...]) -> Value:
        """Define ``var`` as the tensor ``name`` an Einsum just wrote."""
        aval = self.avals[var]
        shape, dtype = tuple(int(n) for n in aval.shape), np.dtype(aval.dtype)
        base = Base(shape, dtype, ranks, _hint(eqn), eqn.source, tensor=name)
        value = Value(base, shape, dtype, ranks)
        self.define(var, value)
        return value

    # -- closing -------------------------------------------------------------
    def output(self, var: int) -> str:
        """The tensor holding ``var`` in its own layout, stored by a copy Einsum if needed."""
        value = self.values[var]
        base = value.base
        is_input = any(base.tensor == d.name for _, d in self.inputs)
        if value.index is None and not is_input:
            if base.tensor is None:
                self.materialize(base)
            return base.tensor  # type: ignore[return-value]
        ranks = self.choose_ranks(value.ranks, value.shape)
        idx = tuple(Var(r) for r in ranks)
        hint = "COPY" if is_input else base.hint
        return self.emit(hint, idx, self.expr(value, idx), base.source, dtype=value.dtype)

    def cascade(self, outputs: Sequence[str], devices: Sequence[tuple[str, str]] = ()) -> Cascade:
        """The region's cascade, ranks renamed ``a, b, c, ...`` in order of appearance;
        ``devices`` binds ranks (by their names here) to mesh axes."""
        first: dict[str, Access] = {}
        for e in self.einsums:
            for a in accesses(e.expr):
                first.setdefault(a.tensor, a)
        inputs = [self._named_like(d, first.get(d.name)) for _, d in self.inputs]
        order: dict[str, None] = {}
        for d in inputs:
            order.update(dict.fromkeys(d.ranks))
        for e in self.einsums:
            order.update(dict.fromkeys(e.ranks))
        names = _rank_names()
        new = {r: next(names) for r in order}

        def rename(x: Expr) -> Expr | None:
            if isinstance(x, Var):
                return Var(new[x.rank])
            return Size(new[x.rank]) if isinstance(x, Size) else None

        einsums = [
            replace(
                e,
                indices=tuple(substitute(i, rename) for i in e.indices),
                expr=substitute(e.expr, rename),
            )
            for e in self.einsums
        ]
        decls = tuple(replace(d, ranks=tuple(new[r] for r in d.ranks)) for d in inputs)
        sizes = tuple((new[r], self.sizes[r]) for r in order)
        bound = tuple((new[r], axis) for r, axis in devices if r in new)
        return Cascade(decls, tuple(einsums), tuple(dict.fromkeys(outputs)), sizes, devices=bound)

    def _named_like(self, decl: TensorDecl, read: Access | None) -> TensorDecl:
        """Declare an input with the ranks of its first plain read, so the text reads as one."""
        if read is None:
            return decl
        ranks = tuple(i.rank for i in read.indices if isinstance(i, Var))
        if len(ranks) != len(decl.ranks) or len(set(ranks)) != len(ranks):
            return decl
        if any(self.sizes[r] != self.sizes[d] for r, d in zip(ranks, decl.ranks)):
            return decl
        return replace(decl, ranks=ranks)


_HINTS = {
    "dot_general": "DOT",
    "reduce_sum": "SUM",
    "reduce_max": "MAX",
    "reduce_min": "MIN",
    "reduce_prod": "PROD",
    "select_n": "WHERE",
    "integer_pow": "POW",
    "convert_element_type": "CVT",
    "broadcast_in_dim": "BCAST",
    "stop_gradient": "SG",
}


def _hint(eqn: FlatEqn) -> str:
    name = eqn.primitive
    return _HINTS.get(name, "".join(c for c in name.upper() if c.isalpha())[:6] or "T")


def literal_const(atom: Any) -> Const:
    """A scalar literal as a Const (booleans as 1 and 0, which the IR's conditions read)."""
    v = literal_value(atom)
    if isinstance(v, bool):
        return Const(int(v))
    return Const(v if isinstance(v, int) else float(v))


def source_loc(source_info: Any) -> SourceLoc | None:
    """The user's frame of a JAX equation, for ``explain`` and error messages."""
    if source_info is None:
        return None
    frame = source_info_util.user_frame(source_info.traceback)
    if frame is None:
        return None
    text = linecache.getline(frame.file_name, frame.start_line).rstrip()
    return SourceLoc(frame.start_line, frame.start_column + 1, text, frame.file_name)
