"""How one Einsum inside a shard_map body sees the device ranks that stand for this device.

Such a rank has local size 1; as a value (or inside a data index, ``W[x*H0+h0]``) it is the
device's position, held in a variable (``lax.axis_index``). At a sharded tensor's device dim
it is the local block's only position, 0. A data index that adds a device-only offset to a
window of plain ranks (``A[x, mod(x+1, X)*T0+t0]``, how chunk-collective reads another
device's rows) is a dynamic slice when every device's offset keeps the window in range.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from einfuse.backends.reference import INDEX_OPS
from einfuse.ir.expr import Const, Expr, Op, Size, Var, rank_vars


@dataclass(frozen=True, slots=True)
class DeviceView:
    """The device ranks of one Einsum that stand for this device, inside a shard_map body."""

    local: Mapping[str, str]  # device rank -> the variable holding its axis index
    dims: Mapping[str, frozenset[int]]  # tensor -> its device dims (local extent 1)
    counts: Mapping[str, int]  # device rank -> its global size (``X`` in ``mod(x+1, X)``)

    def in_index(self, index: Expr) -> bool:
        return any(r in self.local for r in rank_vars(index))

    def split(self, index: Expr) -> tuple[Expr, Expr] | None:
        """``index`` as (plain part, device-only offset), when its terms separate that way."""
        plain: list[Expr] = []
        device: list[Expr] = []
        for term in _terms(index, positive=True):
            ranks = set(rank_vars(term))
            if ranks <= set(self.local):
                device.append(term)
            elif ranks & set(self.local):
                return None
            else:
                plain.append(term)
        if not device:
            return None
        return _sum(plain), _sum(device)

    def offsets(self, offset: Expr, sizes: Mapping[str, int]) -> list[int]:
        """The value of a device-only ``offset`` on every device."""
        ranks = [r for r in self.local if r in rank_vars(offset)]
        out = []
        for values in itertools.product(*(range(self.counts[r]) for r in ranks)):
            env = dict(zip(ranks, values))
            out.append(_evaluate(offset, env, {**sizes, **self.counts}))
        return out


def _terms(expr: Expr, positive: bool) -> list[Expr]:
    """The signed terms of a sum (a negated term as ``0 - t``)."""
    if isinstance(expr, Op) and expr.op in ("add", "sub"):
        a, b = expr.args
        return _terms(a, positive) + _terms(b, positive == (expr.op == "add"))
    return [expr if positive else Op("sub", (Const(0), expr))]


def _sum(terms: list[Expr]) -> Expr:
    out: Expr = Const(0)
    for t in terms:
        out = t if out == Const(0) else Op("add", (out, t))
    return out


def _evaluate(expr: Expr, env: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    if isinstance(expr, Var):
        return env[expr.rank]
    if isinstance(expr, Size):
        return sizes[expr.rank]
    if isinstance(expr, Const):
        return int(expr.value)
    assert isinstance(expr, Op) and expr.op in INDEX_OPS, expr
    a, b = (_evaluate(x, env, sizes) for x in expr.args)
    return int(INDEX_OPS[expr.op](a, b))
