"""What Triton and Mosaic lack, in ops they have: a kernel body rewritten op by op.

The JAX emitter's lowering of a cascade is ordinary jnp code; inside a kernel two of its
habits meet a compiler's gaps:

* **half-precision arithmetic** (``widen``): Pallas' Triton lowering takes bfloat16 and
  float16 operands for adds, multiplies, compares, selects and dots, but not for a division
  or a transcendental (``logistic`` is ``1 / (1 + exp(-x))``, a bfloat16 division it
  refuses). XLA's GPU backend meets the same gap the same way: the op runs in float32 and
  its result is rounded to the op's dtype, so every op still rounds where the program says.
* **mixed dots** (``widen``): a dot of a float32 and a bfloat16 operand (a VJP's float32
  cotangent times a bfloat16 tile) has both cast to float32, the type JAX computes it in;
* **batched dots** (``unbatch``): a row's sum of a product (``S[r] = D[r, c] * D[r, c]``)
  is a ``dot_general`` with the row as batch dim, which Triton refuses and Mosaic only
  takes in some shapes; as a product and a sum it is what a vector unit does anyway
  (a float32 sum, the dot's accumulation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

HALF = (jnp.bfloat16, jnp.float16)
# What Triton lowers natively in half precision: data movement, the ring ops, compares, dots.
NATIVE = frozenset(
    {
        *("add", "sub", "mul", "neg", "max", "min", "abs"),
        *("eq", "ne", "lt", "le", "gt", "ge", "select_n", "convert_element_type"),
        *("dot_general", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose"),
        *("reduce_max", "reduce_min", "iota", "concatenate", "slice", "copy", "copy_p"),
    }
)


def compatible(fn: Callable[..., Any], *, widen: bool, unbatch: bool) -> Callable[..., Any]:
    """``fn`` with half-precision ops outside ``NATIVE`` computed in float32 (``widen``) and
    batched dots as a product and a sum (``unbatch``); ``fn`` itself when asked for neither."""
    if not widen and not unbatch:
        return fn

    def run(*args: Any) -> Any:
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree_util.tree_leaves(args)
        outs = _eval(closed.jaxpr, closed.consts, leaves, widen, unbatch)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)

    return run


def _eval(
    jaxpr: core.Jaxpr, consts: list[Any], args: list[Any], widen: bool, unbatch: bool
) -> list[Any]:
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(a: Any) -> Any:
        return a.val if isinstance(a, core.Literal) else env[a]

    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        name, params = eqn.primitive.name, eqn.params
        inner = params.get("jaxpr")
        if isinstance(inner, core.ClosedJaxpr) and name in ("pjit", "jit"):
            outs = _eval(inner.jaxpr, inner.consts, ins, widen, unbatch)
        elif unbatch and name == "dot_general" and params["dimension_numbers"][1][0]:
            outs = [_product_sum(*ins, eqn.outvars[0].aval.dtype, params["dimension_numbers"])]
        elif widen and name == "dot_general" and len({x.dtype for x in ins}) > 1:
            # A dot of mixed operands (a float32 cotangent times a bfloat16 tile, as a VJP
            # makes them): Triton wants one element type; JAX means the wider one.
            wide = jnp.result_type(*ins)
            outs = [eqn.primitive.bind(*(x.astype(wide) for x in ins), **params)]
        elif widen and name not in NATIVE and any(_is_half(x) for x in ins):
            wide = [x.astype(jnp.float32) if _is_half(x) else x for x in ins]
            res = eqn.primitive.bind(*wide, **params)
            res = res if eqn.primitive.multiple_results else [res]
            outs = [y.astype(v.aval.dtype) for y, v in zip(res, eqn.outvars)]
        else:
            res = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(params))
            outs = res if eqn.primitive.multiple_results else [res]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _product_sum(x: jax.Array, y: jax.Array, dtype: Any, dims: Any) -> jax.Array:
    """``dot_general(x, y, dims)`` as a broadcast product summed in float32: both operands
    laid out (batch, x's free dims, y's free dims, contracted) and multiplied."""
    (xc, yc), (xb, yb) = dims
    xf = [d for d in range(x.ndim) if d not in (*xc, *xb)]
    yf = [d for d in range(y.ndim) if d not in (*yc, *yb)]
    x = jnp.transpose(x, (*xb, *xf, *xc)).astype(jnp.float32)
    y = jnp.transpose(y, (*yb, *yf, *yc)).astype(jnp.float32)
    nb, nxf, nyf = len(xb), len(xf), len(yf)
    x = lax.expand_dims(x, [nb + nxf + k for k in range(nyf)])
    y = lax.expand_dims(y, [nb + k for k in range(nxf)])
    product = x * y
    contracted = tuple(range(nb + nxf + nyf, product.ndim))
    return jnp.sum(product, axis=contracted).astype(dtype)


def _is_half(x: Any) -> bool:
    return hasattr(x, "dtype") and any(x.dtype == h for h in HALF)
