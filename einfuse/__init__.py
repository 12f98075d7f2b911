"""einfuse: an Einsum-cascade compiler and autotuner for JAX/XLA and Pallas.

The public API is this short list of re-exports; heavy modules (jax, optuna) load
only when the names that need them are first used.
"""

from einfuse.backends.reference import interpret
from einfuse.ir import Cascade, EinfuseError, ParseError, VerifyError, parse, verify
from einfuse.passes.manager import run_passes
from einfuse.passes.pass_count import pass_counts

__version__ = "0.1.0"

__all__ = [
    "Cascade",
    "EinfuseError",
    "ParseError",
    "VerifyError",
    "__version__",
    "interpret",
    "parse",
    "pass_counts",
    "run_passes",
    "verify",
]
