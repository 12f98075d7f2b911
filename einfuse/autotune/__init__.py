"""The autotuner: search (pipeline, Schedule) candidates with Optuna and remember the choice.

Modules, one idea each: `space` (params and points; `providers` declares the built-in ones),
`screen` (cost-model scoring), `measure` (compile, check, time), `measured` (the measured
Optuna study and its final race), `objectives` (model, measure, hybrid), `key` (what a result
depends on), `store` (storage, export/import), `tuner` (the `autotune` entry point and the
lookups for ``einfuse.jit``), `timing` (noise-aware timing). Names load on first use, so
importing the package stays cheap.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "autotune": "einfuse.autotune.tuner",
    "lookup_best": "einfuse.autotune.tuner",
    "tuned_pipeline": "einfuse.autotune.tuner",
    "TuningError": "einfuse.autotune.objectives",
    "TuneResult": "einfuse.autotune.result",
    "ProgramTuneResult": "einfuse.autotune.result",
    "SearchSpace": "einfuse.autotune.space",
    "SpaceOptions": "einfuse.autotune.space",
    "Param": "einfuse.autotune.space",
    "build_space": "einfuse.autotune.space",
    "register_space": "einfuse.autotune.space",
    "TuningKey": "einfuse.autotune.key",
    "TuningStore": "einfuse.autotune.store",
    "StoreError": "einfuse.autotune.store",
    "make_key": "einfuse.autotune.key",
    "export_best": "einfuse.autotune.store",
    "import_best": "einfuse.autotune.store",
}

__all__ = [
    "Param",
    "ProgramTuneResult",
    "SearchSpace",
    "SpaceOptions",
    "StoreError",
    "TuneResult",
    "TuningError",
    "TuningKey",
    "TuningStore",
    "autotune",
    "build_space",
    "export_best",
    "import_best",
    "lookup_best",
    "make_key",
    "register_space",
    "tuned_pipeline",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'einfuse.autotune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from einfuse.autotune.key import TuningKey, make_key
    from einfuse.autotune.objectives import TuningError
    from einfuse.autotune.result import ProgramTuneResult, TuneResult
    from einfuse.autotune.space import (
        Param,
        SearchSpace,
        SpaceOptions,
        build_space,
        register_space,
    )
    from einfuse.autotune.store import StoreError, TuningStore, export_best, import_best
    from einfuse.autotune.tuner import autotune, lookup_best, tuned_pipeline


class _CallablePackage(types.ModuleType):
    """``einfuse.autotune(...)`` is the public entry point and ``einfuse.autotune`` the
    package that holds it; making the package callable gives both one name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from einfuse.autotune.tuner import autotune

        return autotune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
