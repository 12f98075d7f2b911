"""einfuse: an Einsum-cascade compiler and autotuner for JAX/XLA and Pallas.

The public API is this short list of re-exports. They load on first use, so the CLI
starts without importing jax, optuna or sympy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

# name -> module that defines it
_EXPORTS = {
    "Cascade": "einfuse.ir",
    "EinfuseError": "einfuse.errors",
    "ParseError": "einfuse.ir",
    "VerifyError": "einfuse.ir",
    "parse": "einfuse.ir",
    "verify": "einfuse.ir",
    "interpret": "einfuse.backends.reference",
    "tuned_pipeline": "einfuse.autotune.tuner",
    "export_best": "einfuse.autotune.store",
    "import_best": "einfuse.autotune.store",
    "estimate": "einfuse.cost_model.model",
    "get_target": "einfuse.cost_model.target",
    "jit": "einfuse.frontend",
    "emit_jax": "einfuse.backends.jax_backend",
    "inspect_hlo": "einfuse.backends.inspection",
    "load": "einfuse.ir.yaml_spec",
    "load_with_schedule": "einfuse.ir.yaml_spec",
    "Schedule": "einfuse.ir.schedule",
    "pass_counts": "einfuse.passes.pass_count",
    "run_passes": "einfuse.passes.manager",
}

__all__ = [
    "Cascade",
    "EinfuseError",
    "ParseError",
    "Schedule",
    "VerifyError",
    "__version__",
    "autotune",
    "emit_jax",
    "estimate",
    "export_best",
    "get_target",
    "import_best",
    "inspect_hlo",
    "interpret",
    "jit",
    "load",
    "load_with_schedule",
    "parse",
    "pass_counts",
    "run_passes",
    "tuned_pipeline",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name == "autotune":  # a callable package: einfuse.autotune(...) and its modules
        return importlib.import_module("einfuse.autotune")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'einfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from einfuse.autotune.store import export_best, import_best
    from einfuse.autotune.tuner import tuned_pipeline
    from einfuse.backends.inspection import inspect_hlo
    from einfuse.backends.jax_backend import emit_jax
    from einfuse.backends.reference import interpret
    from einfuse.cost_model.model import estimate
    from einfuse.cost_model.target import get_target
    from einfuse.errors import EinfuseError
    from einfuse.frontend import jit
    from einfuse.ir import Cascade, ParseError, VerifyError, parse, verify
    from einfuse.ir.schedule import Schedule
    from einfuse.ir.yaml_spec import load, load_with_schedule
    from einfuse.passes.manager import run_passes
    from einfuse.passes.pass_count import pass_counts
