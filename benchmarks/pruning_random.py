"""Random pruning, the control for ``benchmarks.pruning``: the same pipelines with the
importance replaced by seeded noise at every pruning point, so the kept counts, the shapes and
the time are those of the real schedule and only the choice of tokens or heads differs.

A schedule written ``random:prune-tokens{...}`` (or ``random:prune-heads{...}``) is built
inside ``random_selection()``, which swaps the passes' top-k op factories for ones that rank
by noise. Random tokens are drawn among the tokens that receive attention (the real ones:
padding receives none, and pruning it first is no skill of the importance); the first token
(CLS) stays, as in the real pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

PREFIX = "random:"


@contextlib.contextmanager
def random_selection(seed: int = 0) -> Iterator[None]:
    """Within: prune-tokens and prune-heads keep random tokens and heads."""
    from einfuse.passes import prune_heads_rewrite, prune_rewrite

    saved = prune_rewrite._top_k_gather, prune_heads_rewrite._top_k_heads
    prune_rewrite._top_k_gather = _noisy(saved[0], seed, tokens=True)
    prune_heads_rewrite._top_k_heads = _noisy(saved[1], seed, tokens=False)
    try:
        yield
    finally:
        prune_rewrite._top_k_gather, prune_heads_rewrite._top_k_heads = saved


def _noisy(factory: Callable[..., Any], seed: int, tokens: bool) -> Callable[..., Any]:
    """``factory`` whose op ranks by noise (one draw per pruning point and row)."""
    import jax
    import jax.numpy as jnp

    def make(*args: Any, name: str, **kwargs: Any) -> Any:
        inner = factory(*args, name=name, **kwargs)

        def op(acc: jax.Array, *rest: jax.Array) -> tuple[jax.Array, ...]:
            key = jax.random.fold_in(jax.random.PRNGKey(seed), acc.shape[-1])
            noise = 1 + jax.random.uniform(key, acc.shape, acc.dtype)
            return inner(jnp.where(acc > 0, noise, 0) if tokens else noise, *rest)

        op.__name__ = op.__qualname__ = name  # explain and the benchmark find it by name
        return jax.jit(op)

    return make


def build(passes: str, jit: Callable[..., Any], fn: Callable[..., Any]) -> Any:
    """``jit(fn, passes=...)``, with random selection for a ``random:`` schedule. The pipeline
    runs at the first call, so the compiled program is made here, inside the context."""
    if not passes.startswith(PREFIX):
        return jit(fn, passes=passes or None)
    return _Traced(jit(fn, passes=passes[len(PREFIX) :]))


class _Traced:
    """A jitted function whose first trace (where the passes run) happens under
    ``random_selection``; later calls reuse that trace."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def _ensure(self, *args: Any) -> None:
        with random_selection():
            self.f.trace(*args)

    def __call__(self, *args: Any) -> Any:
        self._ensure(*args)
        return self.f(*args)

    def lower(self, *args: Any) -> Any:
        self._ensure(*args)
        return self.f.lower(*args)

    def trace(self, *args: Any) -> Any:
        self._ensure(*args)
        return self.f.trace(*args)
