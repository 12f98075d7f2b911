"""Attention as Einsum cascades, in the four forms of the FuseMax taxonomy.

Every form computes ``AV[f, p] = sum_m softmax_m(scale * QK[m, p]) * V[f, m]`` with the
paper's tensor names; they differ in how many passes they take over the key rank ``m``:

- ``"3pass"``: global max ``GM``, then the sum ``SD``, then the probabilities ``A`` times V.
- ``"deferred"``: as 3-pass, but divides once after the AV contraction (``SNV / SD``).
- ``"2pass"``: ``m`` is partitioned into ``m1 x m0``. Pass one takes per-tile local maxima
  ``LM`` and local sums ``SLD`` of ``exp(x - LM)``, folding them into the running global
  max ``RM`` and the corrected global sum ``RD`` (rescaled by ``PRM`` as the max grows);
  pass two re-reads ``BQK`` to form the normalized ``A`` and contracts it with ``BV``.
- ``"1pass"``: FuseMax's Cascade 5: the running numerator ``RNV`` is rescaled with the
  running denominator ``RD``, so nothing is read twice.

Masks are explicit Einsums: a causal mask (query ``p`` sees keys ``m <= p``) and, when the
tile may not divide ``M``, a padding mask (``m1*M0+m0 < M``; the padded reads of ``K``
give 0, which is not the identity of max) write ``MQK`` / ``MBQK`` with ``-inf``.

Batch and heads lead every tensor: ``Q[b, h, e, p]``, ``K[b, h, e, m]``, ``V[b, h, f, m]``,
``AV[b, h, f, p]``. Grouped-query attention (``kv_groups=G``) keeps ``h`` as the kv-head
rank and gives the query side a group rank ``g`` of size ``G`` right after it:
``Q[b, h, g, e, p]`` and ``AV[b, h, g, f, p]``. Query head ``n`` of a model with ``H*G``
query heads is ``(h, g) = divmod(n, G)``, the order in which ``repeat_kv`` shares kv head
``h`` among query heads ``h*G .. h*G+G-1``; a ``[B, H*G, ...]`` array reshapes to
``[B, H, G, ...]`` without a transpose. The map language has no integer division, so
splitting the rank is what keeps every index affine.

Library cascades are written as text, close to the paper, and parsed: what a reader sees
in ``str(cascade)`` is what the builder wrote.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sympy

from einfuse.ir import Cascade, EinfuseError, Partition, default_size, parse, verify
from einfuse.ir.cascade import SizeValue

FORMS = ("3pass", "deferred", "2pass", "1pass")
PARTITIONED_FORMS = ("2pass", "1pass")

Lines = tuple[list[str], list[str]]  # a building block's (einsum lines, input declarations)


class LibraryError(EinfuseError, ValueError):
    """A library cascade was asked for with arguments it cannot honour."""


# --------------------------------------------------------------------------- shared helpers
def check_sizes(
    what: str,
    given: Mapping[str, object],
    ranks: Sequence[str],
    derived: Mapping[str, str] | None = None,
) -> dict[str, SizeValue]:
    """Validate size keywords: each names a rank of the cascade and is a positive size.

    ``derived`` maps ranks whose size follows from another argument to that argument, so
    ``m1=4`` is refused with "set by tile" rather than silently contradicting it.
    """
    derived = derived or {}
    out: dict[str, SizeValue] = {}
    for rank, value in given.items():
        if rank in derived:
            raise LibraryError(f"{what}: the size of rank {rank} is set by {derived[rank]}")
        if rank not in ranks:
            raise LibraryError(f"{what}: no rank {rank!r}; its ranks are {', '.join(ranks)}")
        if isinstance(value, bool) or not isinstance(value, int | sympy.Expr):
            raise LibraryError(
                f"{what}: size {rank}={value!r} must be an int or a sympy expression"
            )
        if isinstance(value, int) and value <= 0:
            raise LibraryError(f"{what}: size {rank}={value} must be positive")
        out[rank] = value
    return out


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_form(what: str, form: str, tile: object, kv_groups: object) -> None:
    """Refuse an unknown form, a tile for a form that is not partitioned, a bad group count."""
    if form not in FORMS:
        raise LibraryError(f"{what}: unknown attention form {form!r}; forms: {', '.join(FORMS)}")
    if tile is not None and form not in PARTITIONED_FORMS:
        raise LibraryError(f"{what}: tile applies to the forms {PARTITIONED_FORMS}, not {form}")
    if kv_groups is not None and not positive_int(kv_groups):
        raise LibraryError(f"{what}: kv_groups must be a positive int, got {kv_groups!r}")


def build_cascade(
    what: str,
    lines: Sequence[str],
    sizes: Mapping[str, SizeValue],
    partitions: Sequence[Partition] = (),
) -> Cascade:
    """Parse a library cascade's text, attach its sizes and partitions, and verify it."""
    c = parse("\n".join(lines) + "\n", file=f"<einsum_cascade.{what}>")
    c = dataclasses.replace(c, sizes=tuple(sizes.items()), partitions=tuple(partitions))
    return verify(c)


def number(value: float) -> str:
    """A float constant as the text form prints it (``repr`` round-trips exactly)."""
    return repr(float(value))


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True, slots=True)
class HeadLayout:
    """Which leading ranks attention tensors carry: batch ``b``, heads ``h``, group ``g``."""

    batch: bool = True
    heads: bool = True
    groups: bool = False

    def __post_init__(self) -> None:
        if self.groups and not self.heads:
            raise LibraryError("grouped-query attention needs heads: kv_groups with heads=False")

    @property
    def kv_ranks(self) -> tuple[str, ...]:
        return ("b",) * self.batch + ("h",) * self.heads

    @property
    def q_ranks(self) -> tuple[str, ...]:
        return self.kv_ranks + ("g",) * self.groups

    @property
    def q(self) -> str:
        """Index text that leads every query-side tensor, e.g. ``"b, h, g, "``."""
        return "".join(f"{r}, " for r in self.q_ranks)

    @property
    def kv(self) -> str:
        return "".join(f"{r}, " for r in self.kv_ranks)

    @property
    def q_heads(self) -> str:
        """The query side's head ranks alone (``"h, g, "``), as weights index them."""
        return "".join(f"{r}, " for r in self.q_ranks if r != "b")

    @property
    def kv_heads(self) -> str:
        return "".join(f"{r}, " for r in self.kv_ranks if r != "b")


# --------------------------------------------------------------------------- public entry
def attention(
    form: str = "3pass",
    causal: bool = False,
    heads: bool = True,
    batch: bool = True,
    kv_groups: int | None = None,
    tile: int | None = None,
    scale: float | None = None,
    **sizes: int | sympy.Expr,
) -> Cascade:
    """Attention in one of ``FORMS``: inputs ``Q``, ``K``, ``V``, output ``AV``.

    ``sizes`` binds ranks (``p=128, m=4096, e=64``); unbound ranks stay symbolic (``M``).
    ``tile`` is ``M0`` of the partitioned forms (symbolic ``M0`` when omitted); a padding
    mask is added unless the tile provably divides ``M``. ``scale`` defaults to
    ``1/sqrt(E)``: a constant when ``e`` is bound, ``rsqrt(E)`` otherwise.
    ``kv_groups`` is the number of query heads per kv head (the size of ``g``).
    """
    check_form("attention", form, tile, kv_groups)
    layout = HeadLayout(batch=batch, heads=heads, groups=kv_groups is not None)
    ranks = (*layout.q_ranks, "e", "f", "p", "m")
    derived = {"g": "kv_groups", "m0": "tile", "m1": "tile and m"}
    given = check_sizes("attention", sizes, ranks, derived)
    if kv_groups is not None:
        given["g"] = kv_groups
    partitions: tuple[Partition, ...] = ()
    pad = False
    if form in PARTITIONED_FORMS:
        tile_sizes, partition, pad = partition_key_rank(given.get("m", default_size("m")), tile)
        given |= tile_sizes
        partitions = (partition,)
    lines = [
        f"inputs Q[{layout.q}e, p], K[{layout.kv}e, m], V[{layout.kv}f, m]",
        *attention_lines(
            form, layout, causal=causal, scale=scale_text(scale, given.get("e")), pad=pad
        ),
        "outputs AV",
    ]
    ordered = {r: given[r] for r in (*ranks, "m1", "m0") if r in given}
    return build_cascade(f"attention.{form}", lines, ordered, partitions)


def partition_key_rank(
    m: SizeValue, tile: int | None
) -> tuple[dict[str, SizeValue], Partition, bool]:
    """Sizes of ``m1``/``m0`` for ``m -> m1, m0 by tile``, and whether padding needs a mask."""
    if tile is None:
        tile_size: SizeValue = default_size("m0")
    elif not positive_int(tile):
        raise LibraryError(f"attention: tile must be a positive int, got {tile!r}")
    else:
        tile_size = tile
    if isinstance(m, int) and isinstance(tile_size, int):
        outer: SizeValue = -(-m // tile_size)
        pad = m % tile_size != 0
    else:
        outer = sympy.ceiling(sympy.sympify(m) / tile_size)
        pad = (sympy.sympify(m) / tile_size).is_integer is not True
    return {"m0": tile_size, "m1": outer}, Partition("m", "m1", "m0", tile_size), pad


def scale_text(scale: float | None, e: SizeValue | None) -> str:
    """The factor applied to QK: the caller's, else ``1/sqrt(E)``; "" for exactly 1."""
    if scale is None:
        if isinstance(e, int):
            return f" * {number(1.0 / math.sqrt(e))}"
        return " * rsqrt(E)"
    if scale == 1.0:
        return ""
    return f" * {number(scale)}"


# --------------------------------------------------------------------------- the forms
def attention_lines(
    form: str, layout: HeadLayout, *, causal: bool, scale: str, pad: bool
) -> list[str]:
    """Einsum lines of one form, reading tensors ``Q``, ``K``, ``V`` and writing ``AV``.

    A transformer block calls this too, after writing ``Q``, ``K``, ``V`` itself.
    """
    if form in PARTITIONED_FORMS:
        return _partitioned_lines(form, layout, causal=causal, scale=scale, pad=pad)
    return _unpartitioned_lines(form, layout, causal=causal, scale=scale)


def _unpartitioned_lines(form: str, layout: HeadLayout, *, causal: bool, scale: str) -> list[str]:
    q, kv = layout.q, layout.kv
    lines = [f"QK[{q}m, p] = Q[{q}e, p] * K[{kv}e, m]{scale}"]
    x = "QK"
    if causal:
        lines.append(f"MQK[{q}m, p] = where(m <= p, QK[{q}m, p], -inf)")
        x = "MQK"
    lines += [
        f"GM[{q}p] = max(m) {x}[{q}m, p]",
        f"SN[{q}m, p] = exp({x}[{q}m, p] - GM[{q}p])",
        f"SD[{q}p] = SN[{q}m, p]",
    ]
    if form == "3pass":
        lines += [
            f"A[{q}m, p] = SN[{q}m, p] / SD[{q}p]",
            f"AV[{q}f, p] = A[{q}m, p] * V[{kv}f, m]",
        ]
    else:  # deferred: one division per output element instead of one per probability
        lines += [
            f"SNV[{q}f, p] = SN[{q}m, p] * V[{kv}f, m]",
            f"AV[{q}f, p] = SNV[{q}f, p] / SD[{q}p]",
        ]
    return lines


def _partitioned_lines(
    form: str, layout: HeadLayout, *, causal: bool, scale: str, pad: bool
) -> list[str]:
    q, kv = layout.q, layout.kv
    flat = "m1*M0 + m0"
    lines = [
        f"BK[{kv}e, m1, m0] = K[{kv}e, {flat}]",
        f"BV[{kv}f, m1, m0] = V[{kv}f, {flat}]",
        f"BQK[{q}m1, m0, p] = Q[{q}e, p] * BK[{kv}e, m1, m0]{scale}",
    ]
    conds = ([f"{flat} < M"] if pad else []) + ([f"{flat} <= p"] if causal else [])
    x = "BQK"
    if conds:
        cond = conds[0] if len(conds) == 1 else f"and({conds[0]}, {conds[1]})"
        lines.append(f"MBQK[{q}m1, m0, p] = where({cond}, BQK[{q}m1, m0, p], -inf)")
        x = "MBQK"
    lines += [
        f"LM[{q}m1, p] = max(m0) {x}[{q}m1, m0, p]",
        f"RM[{q}0, p] = -inf",
        f"RM[{q}m1+1, p] = max(RM[{q}m1, p], LM[{q}m1, p])",
        f"PRM[{q}m1, p] = exp(RM[{q}m1, p] - RM[{q}m1+1, p])",
    ]
    if form == "1pass":
        return [
            *lines,
            f"SLN[{q}m1, m0, p] = exp({x}[{q}m1, m0, p] - RM[{q}m1+1, p])",
            f"SLD[{q}m1, p] = SLN[{q}m1, m0, p]",
            f"SLNV[{q}f, m1, p] = SLN[{q}m1, m0, p] * BV[{kv}f, m1, m0]",
            f"RD[{q}0, p] = 0",
            f"RD[{q}m1+1, p] = SLD[{q}m1, p] + RD[{q}m1, p] * PRM[{q}m1, p]",
            f"RNV[{q}f, 0, p] = 0",
            f"RNV[{q}f, m1+1, p] = SLNV[{q}f, m1, p] + RNV[{q}f, m1, p] * PRM[{q}m1, p]",
            f"AV[{q}f, p] = RNV[{q}f, M1, p] / RD[{q}M1, p]",
        ]
    # 2-pass. A causal mask can hide a whole tile from a query (LM = -inf); subtracting
    # 0 there instead keeps exp(-inf - -inf) = NaN out of the local sums, which are 0.
    lm = f"LM[{q}m1, p]"
    shift = f"where({lm} == -inf, 0, {lm})" if causal else lm
    return [
        *lines,
        f"SLN[{q}m1, m0, p] = exp({x}[{q}m1, m0, p] - {shift})",
        f"SLD[{q}m1, p] = SLN[{q}m1, m0, p]",
        f"RD[{q}0, p] = 0",
        f"RD[{q}m1+1, p] = SLD[{q}m1, p] * exp({lm} - RM[{q}m1+1, p]) "
        f"+ RD[{q}m1, p] * PRM[{q}m1, p]",
        f"A[{q}m1, m0, p] = exp({x}[{q}m1, m0, p] - RM[{q}M1, p]) / RD[{q}M1, p]",
        f"AV[{q}f, p] = A[{q}m1, m0, p] * BV[{kv}f, m1, m0]",
    ]
