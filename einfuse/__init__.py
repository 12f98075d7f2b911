"""einfuse: an Einsum-cascade compiler and autotuner for JAX/XLA and Pallas.

The public API is this short list of re-exports. They load on first use, so the CLI
starts without importing jax, optuna or sympy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "Cascade": "einfuse.ir",
    "EinfuseError": "einfuse.errors",
    "ParseError": "einfuse.ir",
    "VerifyError": "einfuse.ir",
    "parse": "einfuse.ir",
    "verify": "einfuse.ir",
    "interpret": "einfuse.backends.reference",
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
    "emit_jax",
    "inspect_hlo",
    "interpret",
    "jit",
    "load",
    "load_with_schedule",
    "parse",
    "pass_counts",
    "run_passes",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'einfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from einfuse.backends.inspection import inspect_hlo
    from einfuse.backends.jax_backend import emit_jax
    from einfuse.backends.reference import interpret
    from einfuse.errors import EinfuseError
    from einfuse.frontend import jit
    from einfuse.ir import Cascade, ParseError, VerifyError, parse, verify
    from einfuse.ir.schedule import Schedule
    from einfuse.ir.yaml_spec import load, load_with_schedule
    from einfuse.passes.manager import run_passes
    from einfuse.passes.pass_count import pass_counts
