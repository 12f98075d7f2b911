"""The Pallas backend: each fused group one kernel (``attention``), each row-wise group
(RMSNorm/LayerNorm with the matmul and epilogue after it) one kernel (``rowwise``), the rest
as the JAX backend emits it, so ``backend="pallas"`` never computes less than ``"jax"``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from einfuse.backends.jax_backend import JaxCascade
from einfuse.backends.pallas.attention import PallasBlockwise
from einfuse.backends.pallas.config import (
    DEFAULT_QUERY_TILE,
    KERNEL,
    ROWWISE,
    SCHEDULE_FIELDS,
    KernelConfig,
)
from einfuse.backends.pallas.rowwise import lower_rowwise
from einfuse.ir.cascade import Cascade
from einfuse.ir.schedule import Schedule

__all__ = ["SCHEDULE_FIELDS", "KernelConfig", "PallasBlockwise", "emit_pallas"]


def emit_pallas(
    cascade: Cascade,
    sizes: Mapping[str, int] | None = None,
    *,
    schedule: Schedule | None = None,
    query_tile: int = DEFAULT_QUERY_TILE,
    jit: bool = True,
    interpret_tpu: bool = False,
    **options: Any,
) -> JaxCascade:
    """Like ``emit_jax``, with every fused group's loop a ``pallas_call``; ``interpret_tpu``
    runs the TPU kernel in Mosaic's interpreter (to check it on a CPU)."""
    config = KernelConfig.from_schedule(schedule, interpret_tpu)
    loop = functools.partial(PallasBlockwise, config=config)
    if schedule is not None and schedule.option(KERNEL) is False:
        loop = None  # the JAX loop, chosen by the autotuner
    plain = lower_rowwise
    if schedule is not None and schedule.option(ROWWISE) is False:
        plain = None
    return JaxCascade(
        cascade,
        None if sizes is None else dict(sizes),
        jit=jit,
        query_tile=query_tile,
        schedule=schedule,
        loop=loop,
        plain=plain,
        **options,
    )
