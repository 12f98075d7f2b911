"""The reference interpreter: any valid cascade in float64 NumPy, the oracle of every test.

Semantics, kept deliberately literal so that a backend or pass can be checked against it:

- Einsums run in cascade order. One Einsum builds its iteration space (``Einsum.ranks``,
  left ranks first), evaluates the map expression over it with NumPy broadcasting (rank
  variables are ``arange``s, ``Size`` refs ints, accesses fancy indexing), then reduces the
  trailing (reduced) axes with ``sum``/``max``/``min``/``prod``. A left rank absent from the
  right is broadcast.
- **Out-of-range reads (an index < 0 or >= the extent) read 0.0**, which is what a padded
  partitioned read such as ``K[e, m1*M0+m0]`` sees past ``M``.
- Comparisons and ``and``/``or``/``not`` give 1.0/0.0; ``where(c, a, b)`` selects where
  ``c != 0``. ``max``/``min`` propagate NaN. Everything else follows IEEE float64
  (``inf - inf`` is NaN, ``log(-1)`` is NaN); NumPy's warnings about it are silenced.
- A recurrence is stepped along its iterative rank ``r``: the output holds ``size(r) + 1``
  slots along ``iterative_dim``, slot 0 is ``init``; step ``k`` evaluates the map with ``r``
  fixed to ``k`` (so ``T[r, ...]`` reads slot ``k``) and writes slot ``k + 1``.
- **Dtypes** (``einfuse.ir.dtypes``): inputs are rounded to their declared dtype, each
  Einsum's result (each step of a recurrence) to its output dtype, and each cast
  (``bfloat16(x)``) where it stands; everything between is exact float64. So a bfloat16
  cascade is checked against its own rounding points, not against float64 arithmetic.
  Only the 16-bit floats round by default: float32 stands for the exact value, as it always
  has here (``round_float32=True`` rounds it too), so a float32 rewrite still compares at
  float64 tolerance.
- A sum over a product (``Q[e, p] * K[e, m]``) is contracted with ``np.einsum`` over each
  factor evaluated on its own ranks, so the full iteration space is never built;
  ``contract=False`` forces the literal path, to cross-check the two.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping

import numpy as np
import sympy

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.dtypes import rounding_dtype, tensor_dtypes
from einfuse.ir.errors import EinfuseError
from einfuse.ir.expr import CAST_OPS, Access, Const, Expr, Op, Size, Var, rank_vars
from einfuse.ir.verify import recurrence_parts, verify

# Elementwise semantics of every operator in ``einfuse.ir.expr.OPS``, on float64 arrays.
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _bool(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


UNARY = {
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "tanh": np.tanh,
    "erf": _erf,
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "logistic": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "sign": np.sign,
    "not": lambda x: _bool(x == 0),
}
BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "pow": np.power,
    "mod": np.mod,
    "lt": lambda a, b: _bool(a < b),
    "le": lambda a, b: _bool(a <= b),
    "gt": lambda a, b: _bool(a > b),
    "ge": lambda a, b: _bool(a >= b),
    "eq": lambda a, b: _bool(a == b),
    "ne": lambda a, b: _bool(a != b),
    "and": lambda a, b: _bool((a != 0) & (b != 0)),
    "or": lambda a, b: _bool((a != 0) | (b != 0)),
}


def round_to(x: np.ndarray | float, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (to nearest even), held in float64."""
    np_dtype = rounding_dtype(dtype)
    x = np.asarray(x, dtype=np.float64)
    return x if np_dtype is None else x.astype(np_dtype).astype(np.float64)


# Index arithmetic is on integers: ``/`` floors.
INDEX_OPS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.floor_divide,
    "mod": np.mod,
}

REDUCERS = {"sum": np.sum, "max": np.max, "min": np.min, "prod": np.prod}

DEFAULT_MAX_ELEMENTS = 2**27  # one 1 GiB float64 intermediate; beyond that, refuse


def interpret(
    cascade: Cascade,
    inputs: Mapping[str, np.ndarray],
    sizes: Mapping[str, int] | None = None,
    *,
    contract: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    round_float32: bool = False,
) -> dict[str, np.ndarray]:
    """Evaluate ``cascade`` in float64 and return its outputs by name.

    ``sizes`` binds ranks (``"m"``) or size symbols (``"M"``); the rest are read off the
    input shapes. ``contract=False`` disables the ``np.einsum`` path for sums of products.
    ``max_elements`` bounds any one intermediate, so an oversized check fails with a
    message instead of exhausting memory. A recurrence's output keeps its step-0 slot.
    """
    verify(cascade)
    arrays = _check_inputs(cascade, inputs)
    bound = infer_sizes(cascade, {k: v.shape for k, v in arrays.items()}, sizes)
    rounded = {"bfloat16", "float16", *(["float32"] if round_float32 else [])}
    dtypes = {k: v if v in rounded else "float64" for k, v in tensor_dtypes(cascade).items()}
    tensors: dict[str, np.ndarray] = {k: round_to(v, dtypes[k]) for k, v in arrays.items()}
    with np.errstate(all="ignore"):
        for e in cascade.einsums:
            ev = _Evaluator(e, tensors, bound, max_elements, dtypes[e.output], rounded)
            if e.is_recurrence:
                tensors[e.output] = ev.recurrence()
            else:
                tensors[e.output] = round_to(ev.einsum(contract), dtypes[e.output])
    return {name: tensors[name].copy() for name in cascade.outputs}


# --------------------------------------------------------------------------- inputs and sizes
def _check_inputs(cascade: Cascade, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Convert inputs to float64, refusing missing, extra, misranked or non-real ones."""
    declared = [t.name for t in cascade.inputs]
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise EinfuseError(
            f"missing input(s) {', '.join(missing)}; the cascade declares {declared}"
        )
    extra = sorted(set(inputs) - set(declared))
    if extra:
        raise EinfuseError(
            f"unexpected input(s) {', '.join(extra)}; the cascade declares {declared}"
        )
    out: dict[str, np.ndarray] = {}
    for t in cascade.inputs:
        a = np.asarray(inputs[t.name])
        if a.dtype.kind not in "biuf":
            raise EinfuseError(
                f"input {t.name} has dtype {a.dtype}; only real numbers are supported"
            )
        if a.ndim != len(t.ranks):
            raise EinfuseError(
                f"input {t.name} has {a.ndim} dim(s) (shape {a.shape}) but is declared "
                f"{t.name}[{', '.join(t.ranks)}] with {len(t.ranks)}"
            )
        out[t.name] = a.astype(np.float64)
    return out


def infer_sizes(
    cascade: Cascade,
    shapes: Mapping[str, tuple[int, ...]],
    sizes: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Every rank's concrete size, from explicit ``sizes`` and the inputs' ``shapes``.

    A rank whose declared size is a bare symbol (``M``) binds that symbol, so other sizes
    built from it (``ceiling(M/256)``) evaluate. Any disagreement (two inputs, an input
    and a declared or explicit size) raises, naming the tensor, the rank and both sizes.
    """
    ranks = cascade.all_ranks()
    symbols = {s.name for r in ranks for s in sympy.sympify(cascade.size(r)).free_symbols}
    rank_val: dict[str, tuple[int, str]] = {}  # rank -> (size, where it came from)
    sym_val: dict[str, tuple[int, str]] = {}

    def bind(table: dict[str, tuple[int, str]], kind: str, name: str, n: int, src: str) -> None:
        if n <= 0:
            raise EinfuseError(f"{src}: {kind} {name} would have size {n}; sizes are positive")
        if name in table and table[name][0] != n:
            old, old_src = table[name]
            raise EinfuseError(
                f"{src} makes {kind} {name} = {n}, but {old_src} makes {kind} {name} = {old}"
            )
        table.setdefault(name, (n, src))

    for key, value in (sizes or {}).items():
        src = f"sizes[{key!r}]"
        if key in ranks:
            bind(rank_val, "rank", key, int(value), src)
        elif key in symbols:
            bind(sym_val, "size", key, int(value), src)
        elif key.lower() in ranks:
            bind(rank_val, "rank", key.lower(), int(value), src)
        else:
            raise EinfuseError(
                f"{src} names neither a rank ({', '.join(ranks)}) nor a size symbol "
                f"({', '.join(sorted(symbols)) or 'none'}) of this cascade"
            )
    for t in cascade.inputs:
        for d, (r, n) in enumerate(zip(t.ranks, shapes[t.name])):
            bind(
                rank_val,
                "rank",
                r,
                int(n),
                f"input {t.name} (shape {tuple(shapes[t.name])}) dim {d}",
            )
    for r, (n, src) in list(rank_val.items()):
        size = cascade.size(r)
        if isinstance(size, sympy.Symbol):
            bind(sym_val, "size", size.name, n, f"{src} (rank {r})")

    out: dict[str, int] = {}
    for r in ranks:
        size = sympy.sympify(cascade.size(r))
        value = size.subs({s: sym_val[s.name][0] for s in size.free_symbols if s.name in sym_val})
        if value.is_number:
            if not value.is_integer:
                raise EinfuseError(f"rank {r} has size {size} = {value}, not an integer")
            n = int(value)
            if r in rank_val and rank_val[r][0] != n:
                got, src = rank_val[r]
                raise EinfuseError(
                    f"{src} gives rank {r} size {got}, but the cascade makes {r} = {size} = {n}"
                )
            out[r] = n
        elif r in rank_val:
            out[r] = rank_val[r][0]
        else:
            unbound = ", ".join(sorted(str(s) for s in value.free_symbols))
            raise EinfuseError(
                f"size of rank {r} ({size}) is unknown: no input has rank {r} and {unbound} "
                f"is unbound; pass sizes={{{unbound.split(',')[0]!r}: ...}}"
            )
    return out


# --------------------------------------------------------------------------- evaluation
class _Evaluator:
    """Evaluates one Einsum over an iteration space of broadcastable rank aranges."""

    def __init__(
        self,
        einsum: Einsum,
        tensors: dict[str, np.ndarray],
        sizes: dict[str, int],
        max_elements: int,
        dtype: str = "float64",
        rounded: set[str] | None = None,
    ) -> None:
        self.e = einsum
        self.dtype = dtype
        self.rounded = rounded or set()
        self.tensors = tensors
        self.sizes = sizes
        self.max_elements = max_elements

    # -- spaces: ranks -> aranges shaped (1, .., n, .., 1) -------------------
    def space(
        self, ranks: tuple[str, ...], fixed: Mapping[str, int] | None = None
    ) -> dict[str, np.ndarray]:
        fixed = fixed or {}
        extents = [1 if r in fixed else self.sizes[r] for r in ranks]
        count = math.prod(extents)
        if count > self.max_elements:
            dims = " x ".join(f"{r}={n}" for r, n in zip(ranks, extents))
            raise EinfuseError(
                f"einsum {self.e.output}: iteration space {dims} has {count} elements, more "
                f"than max_elements={self.max_elements}; check on smaller shapes"
            )
        env = {}
        for d, r in enumerate(ranks):
            shape = [1] * len(ranks)
            shape[d] = extents[d]
            values = np.array([fixed[r]]) if r in fixed else np.arange(extents[d])
            env[r] = values.reshape(shape)
        return env

    def full(self, expr: Expr, env: dict[str, np.ndarray]) -> np.ndarray:
        """``expr`` over the space, broadcast to every axis of it."""
        shape = np.broadcast_shapes(*(a.shape for a in env.values()))
        return np.broadcast_to(self.value(expr, env), shape)

    # -- one Einsum ------------------------------------------------------------
    def einsum(self, contract: bool) -> np.ndarray:
        e = self.e
        if contract and e.reduce == "sum" and e.reduced_ranks and len(e.ranks) <= 52:
            return self.contract()
        values = self.full(e.expr, self.space(e.ranks))
        if not e.reduced_ranks:
            return np.array(values, dtype=np.float64)
        axes = tuple(range(len(e.output_ranks), len(e.ranks)))
        return np.asarray(REDUCERS[e.reduce](values, axis=axes))

    def contract(self) -> np.ndarray:
        """Sum of a product: each factor on its own ranks, combined by ``np.einsum``."""
        letters = dict(zip(self.e.ranks, string.ascii_letters, strict=False))
        operands, subscripts = [], []
        for factor in _factors(self.e.expr):
            ranks = tuple(rank_vars(factor))
            operands.append(self.full(factor, self.space(ranks)))
            subscripts.append("".join(letters[r] for r in ranks))
        for r in self.e.output_ranks:  # left ranks absent on the right are broadcast
            if not any(letters[r] in s for s in subscripts):
                operands.append(np.ones(self.sizes[r]))
                subscripts.append(letters[r])
        out = "".join(letters[r] for r in self.e.output_ranks)
        return np.asarray(np.einsum(f"{','.join(subscripts)}->{out}", *operands, optimize=True))

    def recurrence(self) -> np.ndarray:
        """Step along the iterative rank, each step reading the slot the last one wrote."""
        e = self.e
        r, dim, init = recurrence_parts(e)
        shape = [self.sizes[q] for q in e.output_ranks]
        shape[dim] += 1
        out = np.empty(shape)
        self.tensors[e.output] = out  # the steps read it

        def slot(k: int) -> tuple[slice, ...]:
            return tuple(slice(k, k + 1) if d == dim else slice(None) for d in range(len(shape)))

        out[slot(0)] = round_to(self.full(init, self.space(e.output_ranks, {r: 0})), self.dtype)
        for k in range(self.sizes[r]):
            step = self.full(e.expr, self.space(e.output_ranks, {r: k}))
            out[slot(k + 1)] = round_to(step, self.dtype)
        return out

    # -- expressions -----------------------------------------------------------
    def value(self, expr: Expr, env: dict[str, np.ndarray]) -> np.ndarray | float:
        if isinstance(expr, Var):
            return self.rank(expr.rank, env).astype(np.float64)
        if isinstance(expr, Size):
            return float(self.sizes[expr.rank])
        if isinstance(expr, Const):
            return float(expr.value)
        if isinstance(expr, Access):
            return self.read(expr, env)
        assert isinstance(expr, Op)
        args = [self.value(a, env) for a in expr.args]
        if expr.op == "where":
            return np.where(np.asarray(args[0]) != 0, args[1], args[2])
        if expr.op in CAST_OPS:
            return round_to(args[0], expr.op if expr.op in self.rounded else "float64")
        fn = UNARY.get(expr.op) or BINARY[expr.op]
        return fn(*(np.asarray(a, dtype=np.float64) for a in args))

    def rank(self, rank: str, env: dict[str, np.ndarray]) -> np.ndarray:
        if rank not in env:
            raise EinfuseError(
                f"einsum {self.e.output}: rank {rank} is used where it has no value "
                f"(only {', '.join(env) or 'no rank'} do); an initial value may use only "
                "the output's other ranks"
            )
        return env[rank]

    def index(self, expr: Expr, env: dict[str, np.ndarray]) -> np.ndarray | int:
        """An affine index expression as integers."""
        if isinstance(expr, Var):
            return self.rank(expr.rank, env)
        if isinstance(expr, Size):
            return self.sizes[expr.rank]
        if isinstance(expr, Const) and isinstance(expr.value, int):
            return expr.value
        if isinstance(expr, Op) and expr.op in INDEX_OPS:
            a, b = (self.index(x, env) for x in expr.args)
            return INDEX_OPS[expr.op](a, b)
        raise EinfuseError(f"einsum {self.e.output}: index {expr} is not affine")

    def read(self, access: Access, env: dict[str, np.ndarray]) -> np.ndarray:
        """Gather by fancy indexing; positions outside the tensor read 0.0."""
        array = self.tensors[access.tensor]
        idx = [np.asarray(self.index(i, env)) for i in access.indices]
        inside = np.ones((), dtype=bool)
        for i, n in zip(idx, array.shape):
            inside = inside & (i >= 0) & (i < n)
        clipped = tuple(np.clip(i, 0, n - 1) for i, n in zip(idx, array.shape))
        return np.where(inside, array[clipped], 0.0)


def _factors(expr: Expr) -> list[Expr]:
    """The operands of a (nested) product, so each can be evaluated on its own ranks."""
    if isinstance(expr, Op) and expr.op == "mul":
        return [f for a in expr.args for f in _factors(a)]
    return [expr]
