"""RMSNorm and LayerNorm as Einsum cascades over the model rank ``d``.

Inputs ``X[b, p, d]`` (batch, token, model dim) and per-feature weights; output
``Y[b, p, d]``. Means are sums over ``d`` of ``x / D``, so each statistic is one
reduction Einsum and the normalisation one elementwise Einsum, which is what a fusion
pass needs to see to put a norm in the same kernel as its producer.

The ``*_lines`` builders take the names of their input and output and a prefix for
everything else, so a transformer block can place two norms side by side
(``N1_W``, ``N2_W``).
"""

from __future__ import annotations

import sympy

from einfuse.einsum_cascade.attention import Lines, build_cascade, check_sizes, number
from einfuse.ir import Cascade


def token_lead(batch: bool) -> str:
    """Index text of the ranks in front of ``d``: ``"b, p, "`` or ``"p, "``."""
    return "b, p, " if batch else "p, "


def rmsnorm_lines(x: str, out: str, *, lead: str, eps: float, prefix: str = "") -> Lines:
    """``out = x * rsqrt(mean(x^2) + eps) * W``; returns (einsum lines, input decls)."""
    t, n = lead.rstrip(", "), prefix
    lines = [
        f"{n}MS[{t}] = {x}[{lead}d] * {x}[{lead}d] / D",
        f"{n}RS[{t}] = rsqrt({n}MS[{t}] + {number(eps)})",
        f"{out}[{lead}d] = {x}[{lead}d] * {n}RS[{t}] * {n}W[d]",
    ]
    return lines, [f"{n}W[d]"]


def layernorm_lines(x: str, out: str, *, lead: str, eps: float, prefix: str = "") -> Lines:
    """``out = (x - mean) * rsqrt(var + eps) * W + BIAS``; returns (lines, input decls)."""
    t, n = lead.rstrip(", "), prefix
    lines = [
        f"{n}MU[{t}] = {x}[{lead}d] / D",
        f"{n}XC[{lead}d] = {x}[{lead}d] - {n}MU[{t}]",
        f"{n}VAR[{t}] = {n}XC[{lead}d] * {n}XC[{lead}d] / D",
        f"{n}RS[{t}] = rsqrt({n}VAR[{t}] + {number(eps)})",
        f"{out}[{lead}d] = {n}XC[{lead}d] * {n}RS[{t}] * {n}W[d] + {n}BIAS[d]",
    ]
    return lines, [f"{n}W[d]", f"{n}BIAS[d]"]


def rmsnorm(eps: float = 1e-6, batch: bool = True, **sizes: int | sympy.Expr) -> Cascade:
    """RMSNorm (Llama): inputs ``X[b, p, d]``, ``W[d]``; output ``Y[b, p, d]``."""
    lead = token_lead(batch)
    given = check_sizes("rmsnorm", sizes, ("b",) * batch + ("p", "d"))
    lines, decls = rmsnorm_lines("X", "Y", lead=lead, eps=eps)
    text = [f"inputs X[{lead}d], {', '.join(decls)}", *lines, "outputs Y"]
    return build_cascade("rmsnorm", text, given)


def layernorm(eps: float = 1e-5, batch: bool = True, **sizes: int | sympy.Expr) -> Cascade:
    """LayerNorm (BERT): inputs ``X[b, p, d]``, ``W[d]``, ``BIAS[d]``; output ``Y[b, p, d]``."""
    lead = token_lead(batch)
    given = check_sizes("layernorm", sizes, ("b",) * batch + ("p", "d"))
    lines, decls = layernorm_lines("X", "Y", lead=lead, eps=eps)
    text = [f"inputs X[{lead}d], {', '.join(decls)}", *lines, "outputs Y"]
    return build_cascade("layernorm", text, given)
