"""Look inside what XLA made of a function: StableHLO, optimized HLO and a summary of it.

Seeing the optimized HLO is harder than it should be (jax#22270, jax#21990), so this module makes
it one call: `hlo_text` for the text of either stage, `inspect_hlo` for a summary (op counts,
fusions, collectives with their async start/done pairs, and XLA's own cost and memory analyses),
and `xla_dump_flags` for XLA's full pass-by-pass dump.

The summary is read from the optimized HLO *text*, not from XLA's C++ objects, because the text
is the one interface that stays stable across jax versions and that users can paste in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax

from einfuse.backends.hlo_counts import summarize_hlo_text
from einfuse.backends.hlo_summary import HloSummary, XlaCost, XlaMemory

Stage = Literal["stablehlo", "optimized"]
STAGES: tuple[Stage, ...] = ("stablehlo", "optimized")


def hlo_text(obj: jax.stages.Lowered | jax.stages.Compiled, stage: Stage = "optimized") -> str:
    """The StableHLO of a Lowered (`.as_text()`) or the optimized HLO (`.compile().as_text()`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown HLO stage {stage!r}; expected one of {', '.join(STAGES)}")
    if stage == "stablehlo":
        if not isinstance(obj, jax.stages.Lowered):
            raise TypeError(
                f"StableHLO needs a jax.stages.Lowered (from jit(f).lower(...)), "
                f"got {type(obj).__name__}; a Compiled has only optimized HLO"
            )
        return obj.as_text()
    compiled = _compiled(obj)
    text = compiled.as_text()
    if text is None:
        raise RuntimeError("this XLA backend does not provide the optimized HLO text")
    return text


def hlo_fingerprint(lowered: jax.stages.Lowered) -> str:
    """A short hash of a Lowered's StableHLO, module name and locations left out: two programs
    share it only if XLA is handed the same computation (what the tuner measured and what
    ``einfuse.jit`` replays are compared by it)."""
    text = _MODULE_NAME.sub("module @m", lowered.as_text())
    return hashlib.sha256(_LOCATION.sub("", text).encode()).hexdigest()[:16]


_MODULE_NAME = re.compile(r"module @[\w.$-]+")
_LOCATION = re.compile(r"\s*loc\([^\n]*?\)(?=\s*$)", re.M)


def inspect_hlo(obj: jax.stages.Lowered | jax.stages.Compiled | str) -> HloSummary:
    """Summarize optimized HLO: from a Lowered (compiled here), a Compiled, or HLO module text.

    XLA's cost and memory analyses need an executable, so they are None for plain text.
    """
    if isinstance(obj, str):
        return summarize_hlo_text(obj, cost=None, memory=None)
    compiled = _compiled(obj)
    return summarize_hlo_text(
        hlo_text(compiled, "optimized"),
        cost=_xla_cost(compiled.cost_analysis()),
        memory=_xla_memory(compiled.memory_analysis()),
    )


def xla_dump_flags(directory: str) -> str:
    """XLA_FLAGS for XLA's pass-by-pass HLO dump into `directory`.

    XLA reads XLA_FLAGS once, when jax initializes its backend, so these only take effect in a
    process that has them in its environment before its first computation: run a subprocess.
    """
    if not directory or any(ch.isspace() for ch in directory):
        raise ValueError(f"XLA_FLAGS cannot carry a dump directory with spaces: {directory!r}")
    return f"--xla_dump_to={directory} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=.*"


# --- reading the compiled executable -----------------------------------------------------------


def _compiled(obj: object) -> jax.stages.Compiled:
    if isinstance(obj, jax.stages.Compiled):
        return obj
    if isinstance(obj, jax.stages.Lowered):
        return obj.compile()
    raise TypeError(
        f"expected a jax.stages.Lowered or jax.stages.Compiled (or HLO text), "
        f"got {type(obj).__name__}"
    )


def _xla_cost(raw: Any) -> XlaCost | None:
    """Older jax returns a list with one dict per module, newer a dict: accept both."""
    if raw is None:
        return None
    per_module = [raw] if isinstance(raw, Mapping) else list(raw)
    if not per_module:
        return None

    def total(key: str) -> float | None:
        values = [float(m[key]) for m in per_module if m and key in m]
        return sum(values) if values else None

    return XlaCost(total("flops"), total("transcendentals"), total("bytes accessed"))


def _xla_memory(raw: Any) -> XlaMemory | None:
    """`CompiledMemoryStats` has attributes; accept a mapping too, for other jax versions."""
    if raw is None:
        return None

    def get(name: str) -> int | None:
        value = raw.get(name) if isinstance(raw, Mapping) else getattr(raw, name, None)
        return None if value is None else int(value)

    return XlaMemory(
        argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"),
        generated_code_bytes=get("generated_code_size_in_bytes"),
        peak_bytes=get("peak_memory_in_bytes"),
    )
