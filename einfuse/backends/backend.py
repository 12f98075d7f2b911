"""The seam between the compile path and a code generator: a `Backend`.

A backend takes a canonical region's cascade (after its pipeline) and its Schedule and
returns the function that computes it. It declares what the rest of einfuse may rely on:

- ``schedule_fields``: the Schedule params that change what it emits (``fuse.query_tile``
  for the JAX backend's blockwise loop); candidates that differ only elsewhere are one
  program to the autotuner, measured once;
- ``placements``: the memory levels a Schedule may place an intermediate tensor in and have
  it carried out (none for JAX: XLA decides where tensors live; none for Pallas, whose
  kernel holds its intermediates on chip), so the autotuner never offers a placement that
  is searched but not done; the Pallas backend places its key inputs (``vmem`` whole per
  program or ``hbm`` streamed by DMA on a TPU) through its own space provider;
- ``platforms``: what it lowers for.

Backends are named (``einfuse.jit(backend=...)``, ``--backend``) and the name is part of
the tuning key: a result tuned for one backend is never replayed on another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from einfuse.ir.cascade import Cascade
from einfuse.ir.errors import EinfuseError

Emit = Callable[[Cascade, Mapping[str, int] | None, Any], Callable[..., tuple[Any, ...]]]


class UnknownBackend(EinfuseError):
    """A backend name no registered backend answers to."""


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    emit: Emit
    schedule_fields: frozenset[str]
    placements: frozenset[str] = frozenset()
    platforms: tuple[str, ...] = ()


def _jax() -> Backend:
    from einfuse.backends.jax_backend import emit_jax

    def emit(cascade: Cascade, sizes: Mapping[str, int] | None, schedule: Any) -> Any:
        return emit_jax(cascade, None if sizes is None else dict(sizes), schedule=schedule)

    # Of a Schedule only the query tile of a fused group's blockwise loop changes the program.
    return Backend(
        "jax", emit, frozenset({"fuse.query_tile"}), frozenset(), ("cpu", "cuda", "rocm", "tpu")
    )


def _pallas() -> Backend:
    from einfuse.backends.pallas import SCHEDULE_FIELDS, emit_pallas

    def emit(cascade: Cascade, sizes: Mapping[str, int] | None, schedule: Any) -> Any:
        return emit_pallas(cascade, sizes, schedule=schedule)

    return Backend("pallas", emit, SCHEDULE_FIELDS, frozenset(), ("cpu", "cuda", "rocm", "tpu"))


BACKENDS: dict[str, Callable[[], Backend]] = {"jax": _jax, "pallas": _pallas}
DEFAULT_BACKEND = "jax"


def get_backend(backend: str | Backend | None = None) -> Backend:
    """The backend of this name (None: the default); a `Backend` is returned as it is."""
    if isinstance(backend, Backend):
        return backend
    name = backend or DEFAULT_BACKEND
    make = BACKENDS.get(name)
    if make is None:
        raise UnknownBackend(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return make()
