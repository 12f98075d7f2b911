"""Measure the fixed costs of XLA:CPU loops that a roofline misses (see ``overheads``).

Three small jitted kernels, each a ``fori_loop`` so that Python dispatch does not count:

* an empty-ish loop (one fused element-wise update of a tiny carry): the cost of a loop step;
* a loop whose body is a chain of tiny dependent dots: the cost of one more operation;
* loops whose body accumulates one dot of sliced tiles, ``c += a[:, k] @ b[k, :]``, for a few
  tile shapes ``(m, n, k)``: least squares of the time per step against ``1``, the MACs, the
  result elements ``m n`` and the operand elements ``m k + k n`` gives what a small matrix
  multiply costs beyond its MACs per result element (written, then added into the partial sum)
  and per operand element (packed into the GEMM's panels). Thin tiles pay mostly these.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

_STEPS = 2000
_CHAIN = 8
# Tile shapes (m, n, k): fat, thin k (result-heavy), thin n (operand-heavy), small, tiny.
_DOT_SHAPES = ((256, 256, 256), (256, 256, 8), (512, 512, 32), (256, 16, 256), (64, 64, 64))
_DOT_SHAPES += ((16, 16, 16), (128, 128, 16))


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_loop_step_s(repeats: int) -> float:
    """Seconds per iteration of a ``fori_loop`` whose body is one tiny fused update."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    fn = jax.jit(lambda x: lax.fori_loop(0, _STEPS, lambda i, y: y * 0.999 + 1e-3, x))
    return median_seconds(fn, jnp.ones((8,), jnp.float32), repeats=repeats) / _STEPS


def measure_op_s(loop_step_s: float, repeats: int) -> float:
    """Seconds per operation in a loop body: a chain of tiny dependent 8 x 8 dots."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def body(i: Any, y: Any) -> Any:
        for _ in range(_CHAIN):
            y = y @ y
        return y

    fn = jax.jit(lambda y: lax.fori_loop(0, _STEPS, body, y))
    y = jnp.eye(8, dtype=jnp.float32) * 0.5
    per_step = median_seconds(fn, y, repeats=repeats) / _STEPS
    return max(0.0, per_step - loop_step_s) / _CHAIN


def measure_dot_step_s(m: int, n: int, k: int, repeats: int, steps: int = 32) -> float:
    """Seconds per step of ``c += a[:, tile] @ b[tile, :]`` with (m, k) and (k, n) tiles."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    a = jnp.full((m, k * steps), 0.01, jnp.float32)
    b = jnp.full((k * steps, n), 0.01, jnp.float32)

    def body(i: Any, c: Any) -> Any:
        a_tile = lax.dynamic_slice(a, (0, i * k), (m, k))
        b_tile = lax.dynamic_slice(b, (i * k, 0), (k, n))
        return c + a_tile @ b_tile

    fn = jax.jit(lambda c: lax.fori_loop(0, steps, body, c))
    return median_seconds(fn, jnp.zeros((m, n), jnp.float32), repeats=repeats) / steps


def fit_dot_element_costs(
    shapes: tuple[tuple[int, int, int], ...], seconds: list[float]
) -> tuple[float, float]:
    """(seconds per result element, per operand element) of a dot step, by least squares of
    ``t = t0 + MACs / R + c_result m n + c_operand (m k + k n)``; negative fits read as 0."""
    rows = [[1.0, m * n * k, m * n, m * k + k * n] for m, n, k in shapes]
    a, t = np.asarray(rows, dtype=float), np.asarray(seconds, dtype=float)
    scale = np.abs(a).max(axis=0)  # columns span 1 to 1e7: solve on a unit scale
    coef, *_ = np.linalg.lstsq(a / scale, t, rcond=None)
    coef = coef / scale
    return max(0.0, float(coef[2])), max(0.0, float(coef[3]))


def measure_overheads(repeats: int) -> tuple[float, float, float, float]:
    """(loop step, op, dot result element, dot operand element) seconds on this host."""
    loop_step = measure_loop_step_s(repeats)
    op = measure_op_s(loop_step, repeats)
    seconds = [measure_dot_step_s(m, n, k, repeats) for m, n, k in _DOT_SHAPES]
    result, operand = fit_dot_element_costs(_DOT_SHAPES, seconds)
    return loop_step, op, result, operand
