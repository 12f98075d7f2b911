"""Transformer MLPs as Einsum cascades: GELU (BERT) and SwiGLU (Llama).

Input ``X[b, p, d]``, hidden rank ``i``, output ``Y[b, p, d]``; weights are inputs
(``W1[d, i]``, ``W2[i, d]``; ``W_GATE``, ``W_UP``, ``W_DOWN``). A bias is its own
Einsum after the contraction: inside a sum over ``d`` it would be added ``D`` times.
GELU is the exact erf form, ``0.5 * u * (1 + erf(u / sqrt(2)))``; SiLU is
``u * logistic(u)``.
"""

from __future__ import annotations

import math

import sympy

from einfuse.einsum_cascade.attention import (
    LibraryError,
    Lines,
    build_cascade,
    check_sizes,
    number,
)
from einfuse.einsum_cascade.norms import token_lead
from einfuse.ir import Cascade


def gelu_mlp_lines(x: str, out: str, *, lead: str, bias: bool, prefix: str = "") -> Lines:
    """``out = gelu(x W1 + W1_B) W2 + W2_B`` (biases when ``bias``)."""
    n = prefix
    decls = [f"{n}W1[d, i]", f"{n}W2[i, d]"]
    if bias:
        decls[1:1] = [f"{n}W1_B[i]"]
        decls.append(f"{n}W2_B[d]")
        lines = [
            f"{n}XW1[{lead}i] = {x}[{lead}d] * {n}W1[d, i]",
            f"{n}U[{lead}i] = {n}XW1[{lead}i] + {n}W1_B[i]",
        ]
    else:
        lines = [f"{n}U[{lead}i] = {x}[{lead}d] * {n}W1[d, i]"]
    u = f"{n}U[{lead}i]"
    lines.append(f"{n}GU[{lead}i] = 0.5 * {u} * (1 + erf({u} * {number(1 / math.sqrt(2))}))")
    if bias:
        lines += [
            f"{n}XW2[{lead}d] = {n}GU[{lead}i] * {n}W2[i, d]",
            f"{out}[{lead}d] = {n}XW2[{lead}d] + {n}W2_B[d]",
        ]
    else:
        lines.append(f"{out}[{lead}d] = {n}GU[{lead}i] * {n}W2[i, d]")
    return lines, decls


def swiglu_mlp_lines(x: str, out: str, *, lead: str, prefix: str = "") -> Lines:
    """``out = (silu(x W_GATE) * (x W_UP)) W_DOWN``, without biases as in Llama."""
    n = prefix
    lines = [
        f"{n}XG[{lead}i] = {x}[{lead}d] * {n}W_GATE[d, i]",
        f"{n}XU[{lead}i] = {x}[{lead}d] * {n}W_UP[d, i]",
        f"{n}SG[{lead}i] = {n}XG[{lead}i] * logistic({n}XG[{lead}i]) * {n}XU[{lead}i]",
        f"{out}[{lead}d] = {n}SG[{lead}i] * {n}W_DOWN[i, d]",
    ]
    return lines, [f"{n}W_GATE[d, i]", f"{n}W_UP[d, i]", f"{n}W_DOWN[i, d]"]


def gelu_mlp(bias: bool = True, batch: bool = True, **sizes: int | sympy.Expr) -> Cascade:
    """GELU MLP: inputs ``X[b, p, d]``, ``W1``, ``W2`` (and biases); output ``Y[b, p, d]``."""
    lead = token_lead(batch)
    given = check_sizes("gelu_mlp", sizes, ("b",) * batch + ("p", "d", "i"))
    lines, decls = gelu_mlp_lines("X", "Y", lead=lead, bias=bias)
    text = [f"inputs X[{lead}d], {', '.join(decls)}", *lines, "outputs Y"]
    return build_cascade("gelu_mlp", text, given)


def swiglu_mlp(batch: bool = True, **sizes: int | sympy.Expr) -> Cascade:
    """SwiGLU MLP: inputs ``X[b, p, d]``, ``W_GATE``, ``W_UP``, ``W_DOWN``; output ``Y``."""
    lead = token_lead(batch)
    given = check_sizes("swiglu_mlp", sizes, ("b",) * batch + ("p", "d", "i"))
    lines, decls = swiglu_mlp_lines("X", "Y", lead=lead)
    text = [f"inputs X[{lead}d], {', '.join(decls)}", *lines, "outputs Y"]
    return build_cascade("swiglu_mlp", text, given)


def matmul_chain(n: int, **sizes: int | sympy.Expr) -> Cascade:
    """``n`` matmuls in a row, left to right: ``C1 = A0 A1``, ``Ck = C(k-1) Ak``; output ``Cn``.

    Inputs ``A0[i0, i1]`` .. ``An[in, i(n+1)]``: the MLP's skeleton without activations,
    the smallest cascade on which fusion and tiling of consecutive contractions show.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LibraryError(
            f"matmul_chain: n (the number of matmuls) must be an int >= 1, not {n!r}"
        )
    ranks = tuple(f"i{k}" for k in range(n + 2))
    given = check_sizes("matmul_chain", sizes, ranks)
    decls = ", ".join(f"A{k}[i{k}, i{k + 1}]" for k in range(n + 1))
    lines = [f"inputs {decls}", "C1[i0, i2] = A0[i0, i1] * A1[i1, i2]"]
    lines += [
        f"C{k}[i0, i{k + 1}] = C{k - 1}[i0, i{k}] * A{k}[i{k}, i{k + 1}]" for k in range(2, n + 1)
    ]
    return build_cascade("matmul_chain", [*lines, f"outputs C{n}"], given)
