"""The kernels that calibrate the host: matmul, element-wise, exp and stream bandwidth.

Each runs inside one jitted call (a ``fori_loop`` where the work is small) so that Python
dispatch does not dominate; the median of ``repeats`` timed calls after a warm-up. The
element-wise kernel runs in each dtype the host is priced for (XLA:CPU computes bfloat16
element-wise ops through float32 conversions, so their rate is not float32's); an exp costs
the same number of element-wise ops in each.
"""

from __future__ import annotations

from typing import Any

from einfuse.cost_model.calibrate_overheads import median_seconds


def measure_matmul(dtype: str, n: int, repeats: int) -> float:
    """MACs per second of an n x n x n jnp.dot."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.uniform(k, (n, n), jnp.float32, 0.5, 1.5).astype(dtype) for k in keys)
    return n**3 / median_seconds(jax.jit(jnp.dot), a, b, repeats=repeats)


def measure_stream_bandwidth(n_bytes: int, target_bytes: int, repeats: int) -> float:
    """Read+write bytes per second of an affine update of an `n_bytes` f32 buffer, in place."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def step(i: Any, y: Any) -> Any:  # one read and one write of the buffer per step
        return y * 0.999 + i.astype(jnp.float32) * 1e-9

    n = max(256, n_bytes // 4)
    iterations = max(1, target_bytes // (8 * n))
    fn = jax.jit(lambda x: lax.fori_loop(0, iterations, step, x))
    x = jnp.full((n,), 0.5, jnp.float32)
    return 8 * n * iterations / median_seconds(fn, x, repeats=repeats)


def measure_exp_rate(n_bytes: int, target_elements: int, repeats: int) -> float:
    """exp results per second, y <- exp(-y) on an in-cache buffer (stays in (0, 1])."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    n = max(256, n_bytes // 4)
    iterations = max(1, target_elements // n)
    fn = jax.jit(lambda x: lax.fori_loop(0, iterations, lambda i, y: jnp.exp(-y), x))
    x = jnp.full((n,), 0.5, jnp.float32)
    return n * iterations / median_seconds(fn, x, repeats=repeats)


_HORNER_STEPS = 16
FULL_MATMULS = (("float32", 256), ("float32", 1024), ("bfloat16", 512))
QUICK_MATMULS = (("float32", 128), ("bfloat16", 128))
DTYPES = ("float32", "bfloat16")  # priced on every unit of the host


def measure_vector_rate(
    n_bytes: int, target_elements: int, repeats: int, dtype: str = "float32"
) -> float:
    """Element-wise ops per second: a Horner polynomial (one multiply-add per step) per element."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def body(i: Any, y: Any) -> Any:
        z = y
        for k in range(_HORNER_STEPS):
            z = z * y + jnp.asarray(0.01 * k, y.dtype)
        return z * jnp.asarray(1e-3, y.dtype)

    n = max(256, n_bytes // 4)
    iterations = max(1, target_elements // n)
    fn = jax.jit(lambda x: lax.fori_loop(0, iterations, body, x))
    x = jnp.full((n,), 0.5, dtype)
    ops = (_HORNER_STEPS + 1) * n * iterations
    return ops / median_seconds(fn, x, repeats=repeats)
