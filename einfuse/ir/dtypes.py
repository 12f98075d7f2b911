"""Tensor dtypes of a cascade: declared for inputs, inferred for every Einsum's output.

The mixed-precision rule, one for every stage (lifter, reference, cost model, backends):

- A tensor has one dtype. An input's is declared (``Q[e, p]: bfloat16``); an Einsum's
  output has the dtype of its map expression.
- An expression's dtype is the promotion of the tensors it reads, as in JAX: equal dtypes
  stay, ``bfloat16`` and ``float16`` meet in ``float32``, anything meets ``float64`` in
  ``float64``. A cast (``float32(x)``, ``bfloat16(x)``) has its own dtype whatever it reads.
  Constants, rank values, integer tensors and comparisons are *weak*: they take the dtype
  of what they meet, like JAX's Python scalars. An expression with no typed leaf is ``float32``.
- Numerically, an Einsum evaluates its map and reduction exactly (the reference does so in
  float64) and rounds once, to its output dtype; a cast rounds where it stands. A backend
  computes a map op by op in the dtype its operands promote to, as JAX does (so bfloat16
  arithmetic inside one Einsum may round per op); contractions accumulate in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from einfuse.ir.expr import CAST_OPS, Access, Expr, Op

if TYPE_CHECKING:
    from einfuse.ir.cascade import Cascade, Einsum

FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
# What an input may be declared as: the floats, and the integers and booleans a lifted region
# reads as index values and masks.
DECLARABLE_DTYPES = frozenset(
    {*FLOAT_DTYPES, "bool", *(f"{k}int{b}" for k in ("", "u") for b in (8, 16, 32, 64))}
)
# Bytes per element of each of them: the one table (no NumPy needed for bfloat16).
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "bool": 1} | {
    f"{k}int{b}": b // 8 for k in ("", "u") for b in (8, 16, 32, 64)
}
DEFAULT_DTYPE = "float32"
# Ops whose value is 0/1 whatever their operands: weak, like a comparison in a mask.
_WEAK_OPS = frozenset({"lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not", "sign"})


def promote(a: str | None, b: str | None) -> str | None:
    """JAX's promotion of two float dtypes; None (weak) gives way to the other."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if "float64" in (a, b):
        return "float64"
    return "float32"  # the rest meet in float32: bf16 + f16, and either with f32


def expr_dtype(expr: Expr, tensor_dtype: Callable[[str], str | None]) -> str | None:
    """The dtype of a map expression; None when it reads no typed value (weak)."""
    if isinstance(expr, Access):  # integer and boolean tensors hold values, weak like ranks
        d = tensor_dtype(expr.tensor)
        return d if d in FLOAT_DTYPES else None
    if not isinstance(expr, Op):
        return None
    if expr.op in CAST_OPS:
        return expr.op
    if expr.op in _WEAK_OPS:
        return None
    args = expr.args[1:] if expr.op == "where" else expr.args
    out: str | None = None
    for a in args:
        out = promote(out, expr_dtype(a, tensor_dtype))
    return out


def tensor_dtypes(cascade: Cascade, weak: str = DEFAULT_DTYPE) -> dict[str, str]:
    """Every tensor's dtype, inputs and Einsum outputs, in cascade order; ``weak`` is the
    dtype of an Einsum that reads no typed value."""
    return add_dtypes({t.name: t.dtype for t in cascade.inputs}, cascade.einsums, weak)


def add_dtypes(
    dtypes: dict[str, str], einsums: Iterable[Einsum], weak: str = DEFAULT_DTYPE
) -> dict[str, str]:
    """``dtypes`` extended, in place, by the outputs of ``einsums`` (in order), for a pass
    that builds Einsums and asks their dtypes before it has a whole cascade."""
    for e in einsums:

        def lookup(name: str, _self: str = e.output) -> str | None:
            return None if name == _self else dtypes.get(name)

        d = expr_dtype(e.expr, lookup)
        if e.init is not None:
            d = promote(d, expr_dtype(e.init, lookup))
        dtypes[e.output] = d or weak
    return dtypes


def cast(dtype: str, expr: Expr) -> Expr:
    """``expr`` rounded to ``dtype`` (a cast to the dtype it is already cast to is one cast)."""
    if isinstance(expr, Op) and expr.op == dtype:
        return expr
    return Op(dtype, (expr,))


def rounding_dtype(dtype: str) -> Any:
    """The NumPy dtype that rounds a float64 value to ``dtype`` (to nearest even; ml_dtypes'
    for bfloat16), or None where float64 holds it exactly (float64, integers)."""
    import ml_dtypes
    import numpy as np

    return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}.get(dtype)


def round_constant(value: float, dtype: str) -> float:
    """``value`` rounded to ``dtype``, as a Python float."""
    import numpy as np

    np_dtype = rounding_dtype(dtype)
    return float(value) if np_dtype is None else float(np.asarray(value).astype(np_dtype))


def with_input_dtype(cascade: Cascade, dtype: str) -> Cascade:
    """``cascade`` with its float inputs declared ``dtype`` (casts inside it stay)."""
    inputs = tuple(
        replace(t, dtype=dtype) if t.dtype in FLOAT_DTYPES else t for t in cascade.inputs
    )
    return replace(cascade, inputs=inputs)


def keep_output_dtypes(before: Cascade, after: Cascade) -> Cascade:
    """``after`` with each output in its dtype in ``before``: a rewrite that promoted an
    output (a division deferred past a bfloat16 contraction now divides by a float32 sum)
    rounds it back, once, so a pass never changes a program's interface."""
    want, got = tensor_dtypes(before), tensor_dtypes(after)
    changed = [o for o in after.outputs if o in want and got.get(o) != want[o]]
    if not changed:
        return after
    from einfuse.ir.cascade import Einsum
    from einfuse.ir.expr import Var

    taken = set(got)
    einsums: list[Einsum] = []
    for e in after.einsums:
        if e.output not in changed or e.is_recurrence:
            einsums.append(e)
            continue
        if not e.reduced_ranks:  # a map rounds its result: cast it where it stands
            einsums.append(replace(e, expr=cast(want[e.output], e.expr)))
            continue
        acc = e.output + "_acc"  # a reduction rounds its total, so a map after it casts
        while acc in taken:
            acc += "_"
        taken.add(acc)
        einsums.append(replace(e, output=acc))
        idx = tuple(Var(r) for r in e.output_ranks)
        einsums.append(
            Einsum(e.output, e.indices, cast(want[e.output], Access(acc, idx)), loc=e.loc)
        )
    return after.with_einsums(einsums)
