"""Measure the fixed costs of XLA:CPU loops that a roofline misses (see ``overheads``).

Three small jitted kernels, each a ``fori_loop`` so that Python dispatch does not count:

* an empty-ish loop (one fused element-wise update of a tiny carry): the cost of a loop step;
* a loop whose body is a chain of tiny dependent dots: the cost of one more operation;
* loops whose body accumulates one dot of sliced tiles, ``c += a[:, k] @ b[k, :]``, for a few
  tile shapes ``(m, n, k)``, some with ``b`` used whole instead of sliced: least squares of the
  time per step against ``1``, the MACs, the result elements ``m n``, the operand elements
  ``m k + k n`` and the sliced elements gives what a small matrix multiply costs beyond its
  MACs per result element (written, then added into the partial sum), per operand element
  (packed into the GEMM's panels) and per element of a tile sliced out of a larger tensor
  (XLA:CPU copies it into a buffer of its own, then the dot reads the copy). Thin tiles pay
  mostly the first two; tiles sliced again every step (a loop order that re-fetches a large
  operand) the third.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

_STEPS = 2000
_CHAIN = 8
# Tile shapes (m, n, k, b sliced): fat, thin k (result-heavy), thin n (operand-heavy), small,
# tiny; and pairs that differ only in whether the large b tile is sliced each step.
_DOT_SHAPES = ((256, 256, 256, True), (256, 256, 8, True), (512, 512, 32, True))
_DOT_SHAPES += ((256, 16, 256, True), (64, 64, 64, True), (16, 16, 16, True), (128, 128, 16, True))
_DOT_SHAPES += ((16, 128, 512, True), (16, 128, 512, False), (16, 512, 128, True))
_DOT_SHAPES += ((16, 512, 128, False), (64, 32, 128, True), (64, 32, 128, False))
_DOT_SHAPES += ((256, 256, 256, False),)
# Thin tiles against a whole operand of 16K-131K elements, shallow and deep contractions: the
# blockwise loop's shape (a few query rows times a whole key tile), where each call re-packs
# the large operand for few rows; without them the operand cost is barely determined.
_THIN_OPERANDS = ((64, 256), (64, 2048), (256, 512), (32, 4096))  # (k, n)
_DOT_SHAPES += tuple((m, n, k, False) for m in (8, 32, 128) for k, n in _THIN_OPERANDS)


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


def measure_dot_step_s(
    m: int, n: int, k: int, repeats: int, *, slice_b: bool = True, steps: int = 32
) -> float:
    """Seconds per step of ``c += a[:, tile] @ b[tile, :]`` with (m, k) and (k, n) tiles.

    With ``slice_b`` false the step multiplies by one (k, n) ``b`` as it is, so only ``a`` is
    sliced. The operands are arguments holding random values: sliced out of a constant they
    would fold to broadcasts, and XLA would hoist the dot out of the loop.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    keys = jax.random.split(jax.random.key(0))
    a = jax.random.uniform(keys[0], (m, k * steps), jnp.float32, -0.01, 0.01)
    b = jax.random.uniform(keys[1], (k * steps if slice_b else k, n), jnp.float32, -0.01, 0.01)

    def body(i: Any, c: Any, a: Any, b: Any) -> Any:
        a_tile = lax.dynamic_slice(a, (0, i * k), (m, k))
        b_tile = lax.dynamic_slice(b, (i * k, 0), (k, n)) if slice_b else b
        return c + a_tile @ b_tile

    fn = jax.jit(lambda c, a, b: lax.fori_loop(0, steps, lambda i, c: body(i, c, a, b), c))
    c = jnp.zeros((m, n), jnp.float32)
    return median_seconds(fn, c, a, b, repeats=repeats) / steps


def fit_dot_element_costs(
    shapes: tuple[tuple[int, int, int, bool], ...], seconds: list[float]
) -> tuple[float, float, float]:
    """(seconds per result element, per operand element, per sliced element) of a dot step.

    Shapes are ``(m, n, k, b sliced)``. The sliced-element cost comes from the pairs that differ
    only in slicing ``b``: the median of their step-time difference per element of ``b``. The
    rest is least squares of ``t - c_slice sliced = t0 + MACs / R + c_result m n + c_operand
    (m k + k n)`` over the shapes, ``sliced`` being ``m k`` plus ``k n`` where ``b`` is sliced.
    The least squares weighs each shape by its inverse time (relative error), so the small
    calls a tiled loop makes count as much as the large ones. Negative figures read as 0.
    """
    measured = dict(zip(shapes, seconds))
    pairs = [
        (t - measured[(m, n, k, False)]) / (k * n)
        for (m, n, k, sliced), t in measured.items()
        if sliced and (m, n, k, False) in measured
    ]
    per_slice = max(0.0, float(np.median(pairs))) if pairs else 0.0
    rows = [[1.0, m * n * k, m * n, m * k + k * n] for m, n, k, _ in shapes]
    sliced = [m * k + (k * n if b else 0) for m, n, k, b in shapes]
    a = np.asarray(rows, dtype=float)
    t = np.asarray(seconds, dtype=float) - per_slice * np.asarray(sliced, dtype=float)
    weight = 1.0 / np.maximum(np.asarray(seconds, dtype=float), 1e-12)[:, None]
    scale = np.abs(a).max(axis=0)  # columns span 1 to 1e7: solve on a unit scale
    coef, *_ = np.linalg.lstsq(a / scale * weight, t * weight[:, 0], rcond=None)
    coef = coef / scale
    return max(0.0, float(coef[2])), max(0.0, float(coef[3])), per_slice


def measure_overheads(repeats: int) -> tuple[float, float, float, float, float]:
    """(loop step, op, dot result element, dot operand element, sliced element) seconds."""
    loop_step = measure_loop_step_s(repeats)
    op = measure_op_s(loop_step, repeats)
    seconds = [measure_dot_step_s(m, n, k, repeats, slice_b=b) for m, n, k, b in _DOT_SHAPES]
    return loop_step, op, *fit_dot_element_costs(_DOT_SHAPES, seconds)
