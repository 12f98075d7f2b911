"""A pre-norm transformer block as one Einsum cascade, BERT- or Llama-flavoured.

``Y = H1 + MLP(norm2(H1))`` with ``H1 = X + Attention(norm1(X)) WO``: the residual
stream ``X[b, p, d]`` in, ``Y[b, p, d]`` out, every weight an input. Self-attention
reads its keys from the same tokens, so the key rank ``m`` is the token rank ``p``
under another name (``ranks m=P``): ``K[b, h, e, m] = XN1[b, m, d] * WK[d, h, e]``.

- ``"bert"``: LayerNorm, biases on every projection, GELU MLP, full (non-causal)
  attention; heads ``h`` (grouped only when ``kv_groups`` is given).
- ``"llama"``: RMSNorm, rotary embeddings on Q and K, SwiGLU MLP, causal attention,
  grouped-query heads: kv heads ``h`` and query groups ``g`` (size ``kv_groups``, or
  symbolic ``G``), so ``WQ[d, h, g, e]`` and ``WO[h, g, f, d]``.

Rotary embeddings use Hugging Face's rotate-half layout: ``COS[p, e]`` and ``SIN[p, e]``
are inputs (each half of ``e`` repeats the frequencies) and
``rotate_half(x)[e] = -x[e + E/2]`` for ``e < E/2``, ``x[e - E/2]`` above. The IR has no
integer division but reads outside a tensor give 0, so with a rank ``eh`` of size
``E/2`` (declared only to name that size) both halves are one affine expression::

    Q[.., e, p] = QP[.., e, p] * COS[p, e] + (QP[.., e-EH, p] - QP[.., e+EH, p]) * SIN[p, e]

(below the middle ``QP[e-EH]`` is out of range, above it ``QP[e+EH]`` is). Projections
keep ``Q``/``K``/``V`` as the names attention reads; ``QP``/``KP``/``VP`` are the raw
products before a bias or the rotation.
"""

from __future__ import annotations

import sympy

from einfuse.einsum_cascade.attention import (
    PARTITIONED_FORMS,
    HeadLayout,
    LibraryError,
    attention_lines,
    build_cascade,
    check_form,
    check_sizes,
    partition_key_rank,
    scale_text,
)
from einfuse.einsum_cascade.mlp import gelu_mlp_lines, swiglu_mlp_lines
from einfuse.einsum_cascade.norms import layernorm_lines, rmsnorm_lines, token_lead
from einfuse.ir import Cascade, Partition, default_size
from einfuse.ir.cascade import SizeValue

KINDS = ("bert", "llama")
DEFAULT_EPS = {"bert": 1e-12, "llama": 1e-6}


def transformer_block(
    kind: str = "llama",
    *,
    causal: bool | None = None,
    kv_groups: int | None = None,
    attention_form: str = "3pass",
    tile: int | None = None,
    eps: float | None = None,
    batch: bool = True,
    **sizes: int | sympy.Expr,
) -> Cascade:
    """One pre-norm block; ``causal`` and ``eps`` default to the kind's (Llama: causal, 1e-6;
    BERT: full, 1e-12).

    ``sizes`` binds ``b, p, d, h, g, e, f, i`` (``i`` is the MLP's hidden rank);
    ``attention_form`` and ``tile`` choose the attention cascade as in ``attention``.
    """
    if kind not in KINDS:
        raise LibraryError(f"transformer_block: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    check_form("transformer_block", attention_form, tile, kv_groups)
    llama = kind == "llama"
    layout = HeadLayout(batch=batch, heads=True, groups=llama or kv_groups is not None)
    given, partitions, pad = _block_sizes(sizes, layout, llama, kv_groups, attention_form, tile)
    attn = attention_lines(
        attention_form,
        layout,
        causal=llama if causal is None else causal,
        scale=scale_text(None, given.get("e")),
        pad=pad,
    )
    lines = _block_lines(layout, llama, DEFAULT_EPS[kind] if eps is None else eps, attn)
    return build_cascade(f"transformer_block.{kind}", lines, given, partitions)


def _block_sizes(
    sizes: dict[str, int | sympy.Expr],
    layout: HeadLayout,
    llama: bool,
    kv_groups: int | None,
    form: str,
    tile: int | None,
) -> tuple[dict[str, SizeValue], tuple[Partition, ...], bool]:
    """Checked sizes plus the derived ones (``m = P``, ``eh = E/2``, ``g``, the tile's)."""
    derived = {"m": "p (self-attention)", "m0": "tile", "m1": "tile and p", "eh": "e"}
    if kv_groups is not None:
        derived["g"] = "kv_groups"
    ranks = (*layout.q_ranks, "p", "d", "e", "f", "i")
    given = check_sizes("transformer_block", sizes, ranks, derived)
    if kv_groups is not None:
        given["g"] = kv_groups
    given["m"] = given.get("p", default_size("p"))
    if llama:
        given["eh"] = _half(given.get("e", default_size("e")))
    if form not in PARTITIONED_FORMS:
        return _ordered(given), (), False
    tile_sizes, partition, pad = partition_key_rank(given["m"], tile)
    return _ordered(given | tile_sizes), (partition,), pad


def _block_lines(layout: HeadLayout, llama: bool, eps: float, attn: list[str]) -> list[str]:
    """The block's text: norm, projections, attention, output projection, residuals, MLP."""
    t = token_lead(layout.batch)
    norm = rmsnorm_lines if llama else layernorm_lines
    norm1, norm1_decls = norm("X", "XN1", lead=t, eps=eps, prefix="N1_")
    norm2, norm2_decls = norm("H1", "XN2", lead=t, eps=eps, prefix="N2_")
    if llama:
        mlp, mlp_decls = swiglu_mlp_lines("XN2", "MO", lead=t)
    else:
        mlp, mlp_decls = gelu_mlp_lines("XN2", "MO", lead=t, bias=True)
    proj, proj_decls = _projections(layout, llama=llama)
    qh = layout.q_heads
    extra = ["COS[p, e]", "SIN[p, e]"] if llama else ["WO_B[d]"]
    decls = [f"X[{t}d]", *norm1_decls, *proj_decls, f"WO[{qh}f, d]", *extra]
    return [
        "inputs " + ", ".join([*decls, *norm2_decls, *mlp_decls]),
        *norm1,
        *proj,
        *attn,
        f"O[{t}d] = AV[{layout.q}f, p] * WO[{qh}f, d]",
        f"H1[{t}d] = X[{t}d] + O[{t}d]" + ("" if llama else " + WO_B[d]"),
        *norm2,
        *mlp,
        f"Y[{t}d] = H1[{t}d] + MO[{t}d]",
        "outputs Y",
    ]


def _projections(layout: HeadLayout, *, llama: bool) -> tuple[list[str], list[str]]:
    """Q, K, V from ``XN1``: biases for BERT, rotary embeddings on Q and K for Llama."""
    b = "b, " if layout.batch else ""
    q, kv, qh, kh = layout.q, layout.kv, layout.q_heads, layout.kv_heads
    lines = [
        f"QP[{q}e, p] = XN1[{b}p, d] * WQ[d, {qh}e]",
        f"KP[{kv}e, m] = XN1[{b}m, d] * WK[d, {kh}e]",
    ]
    decls = [f"WQ[d, {qh}e]", f"WK[d, {kh}e]", f"WV[d, {kh}f]"]
    if llama:
        lines += [
            f"Q[{q}e, p] = {_rotary('QP', q, 'p')}",
            f"K[{kv}e, m] = {_rotary('KP', kv, 'm')}",
            f"V[{kv}f, m] = XN1[{b}m, d] * WV[d, {kh}f]",
        ]
        return lines, decls
    lines += [
        f"Q[{q}e, p] = QP[{q}e, p] + WQ_B[{qh}e]",
        f"K[{kv}e, m] = KP[{kv}e, m] + WK_B[{kh}e]",
        f"VP[{kv}f, m] = XN1[{b}m, d] * WV[d, {kh}f]",
        f"V[{kv}f, m] = VP[{kv}f, m] + WV_B[{kh}f]",
    ]
    decls = [decls[0], f"WQ_B[{qh}e]", decls[1], f"WK_B[{kh}e]", decls[2], f"WV_B[{kh}f]"]
    return lines, decls


def _rotary(x: str, lead: str, token: str) -> str:
    """``x * cos + rotate_half(x) * sin`` along ``e``, for tokens on rank ``token``."""
    return (
        f"{x}[{lead}e, {token}] * COS[{token}, e] "
        f"+ ({x}[{lead}e-EH, {token}] - {x}[{lead}e+EH, {token}]) * SIN[{token}, e]"
    )


def _half(e: SizeValue) -> SizeValue:
    """``E/2``, the rotary half; an odd head dim has no rotate-half."""
    if isinstance(e, int):
        if e % 2:
            raise LibraryError(f"transformer_block: rotary embeddings need an even e, got e={e}")
        return e // 2
    return sympy.sympify(e) / 2


def _ordered(sizes: dict[str, SizeValue]) -> dict[str, SizeValue]:
    """Sizes in a fixed, readable order (the ``ranks`` line of the text form)."""
    order = ("b", "p", "m", "d", "h", "g", "e", "eh", "f", "i", "m1", "m0")
    return {r: sizes[r] for r in order if r in sizes}
