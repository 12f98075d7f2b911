"""Passes registered by name and run from a pipeline string: ``"partition{rank=m,tile=512},fuse"``.

A pass is a pure function ``Cascade -> Cascade`` taking its options as keyword
arguments. The manager parses the pipeline, checks names and options against each
pass's signature before running anything, verifies between passes when asked, and
keeps every intermediate cascade stamped with the pass that made it.

A *program pass* (``register_program_pass``) takes a whole lifted Program instead: pruning
crosses regions (importance accumulates from layer to layer, a pruned token leaves every later
layer), so it cannot be a cascade pass. It shares the registry, the pipeline syntax and the
option checks; ``einfuse.passes.program`` runs it, with a program verifier and history.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from einfuse.ir.cascade import Cascade
from einfuse.ir.dtypes import keep_output_dtypes
from einfuse.ir.errors import EinfuseError
from einfuse.ir.verify import verify

PassFn = Callable[..., Cascade]

_REGISTRY: dict[str, PassFn] = {}
_PROGRAM_PASSES: set[str] = set()
_PASS_RE = re.compile(r"\s*([a-z][a-z0-9_-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


class PipelineError(EinfuseError):
    pass


Steps = tuple[tuple[str, Cascade], ...]
_STEPS: ContextVar[list[tuple[str, Cascade]] | None] = ContextVar("einfuse_steps", default=None)


def record_steps(steps: Steps) -> None:
    """Called by a pass that is several rewrites in one (``fuse``): name each intermediate
    cascade, so ``--print-after-all`` shows every rewrite that changes rounding. A no-op
    when no pipeline is recording."""
    sink = _STEPS.get()
    if sink is not None:
        sink.extend(steps)


@contextmanager
def _recording() -> Iterator[list[tuple[str, Cascade]]]:
    sink: list[tuple[str, Cascade]] = []
    token = _STEPS.set(sink)
    try:
        yield sink
    finally:
        _STEPS.reset(token)


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Register ``fn`` under a kebab-case name; its keyword arguments are its options."""

    def deco(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"pass {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def register_program_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Register ``fn(program, **options) -> Program``: a pass over a whole lifted program."""

    def deco(fn: PassFn) -> PassFn:
        register_pass(name)(fn)
        _PROGRAM_PASSES.add(name)
        return fn

    return deco


def is_program_pass(name: str) -> bool:
    _load_builtin_passes()
    return name in _PROGRAM_PASSES


def split_pipeline(pipeline: str | None) -> tuple[list[PassSpec], str]:
    """The program passes of a pipeline, and the rest as a region pipeline string.

    Program passes run first, on the lifted program, so they must lead the pipeline: a region
    pass (``fuse``) before one would silently run after it.
    """
    specs = parse_pipeline(pipeline) if pipeline else []
    n = 0
    while n < len(specs) and specs[n].name in _PROGRAM_PASSES:
        n += 1
    late = [s.name for s in specs[n:] if s.name in _PROGRAM_PASSES]
    if late:
        raise PipelineError(
            f"program pass {late[0]} must come before the region passes "
            f"({', '.join(s.name for s in specs if s.name not in _PROGRAM_PASSES)})"
            ": program passes run first, on the whole lifted program"
        )
    return specs[:n], ",".join(str(s) for s in specs[n:])


def registered_passes() -> dict[str, PassFn]:
    _load_builtin_passes()
    return dict(_REGISTRY)


def _load_builtin_passes() -> None:
    # Importing the modules registers their passes; kept lazy so the CLI starts fast.
    import einfuse.passes.builtin  # noqa: F401


@dataclass(frozen=True, slots=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}{{{','.join(f'{k}={v}' for k, v in self.options)}}}"


def _parse_value(text: str) -> object:
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse and check a pipeline string against the registry, before any pass runs."""
    passes = registered_passes()
    out: list[PassSpec] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _PASS_RE.match(text, pos)
        if m is None or m.end() == pos:
            raise PipelineError(f"bad pipeline at column {pos + 1}: {text[pos:]!r}")
        name, opts = m.group(1), m.group(2)
        if name not in passes:
            raise PipelineError(f"unknown pass {name!r}; registered: {', '.join(sorted(passes))}")
        options: list[tuple[str, object]] = []
        for item in filter(None, (s.strip() for s in (opts or "").split(","))):
            if "=" not in item:
                raise PipelineError(f"option {item!r} of pass {name} must be key=value")
            k, v = item.split("=", 1)
            options.append((k.strip(), _parse_value(v)))
        _check_options(name, passes[name], dict(options))
        out.append(PassSpec(name, tuple(options)))
        pos = m.end()
    return out


def _check_options(name: str, fn: PassFn, options: dict[str, object]) -> None:
    params = list(inspect.signature(fn).parameters.values())[1:]
    known = {p.name for p in params}
    for k in options:
        if k not in known:
            opts = ", ".join(sorted(known)) or "none"
            raise PipelineError(f"pass {name} has no option {k!r}; its options: {opts}")
    for p in params:
        if p.default is inspect.Parameter.empty and p.name not in options:
            raise PipelineError(f"pass {name} needs option {p.name}")


@dataclass(frozen=True)
class PassResult:
    """The final cascade and every intermediate one, each stamped with its pass.

    ``steps[k]`` holds the named rewrites pass ``history[k]`` made on the way (empty for most).
    """

    cascade: Cascade
    history: tuple[tuple[str, Cascade], ...] = field(default=())
    steps: tuple[Steps, ...] = field(default=())

    def print_after_all(self) -> str:
        out = []
        for k, (name, c) in enumerate(self.history):
            sub = self.steps[k] if k < len(self.steps) else ()
            out.extend(f"// ----- after {name}: {step}\n{s}" for step, s in sub)
            out.append(f"// ----- after {name}\n{c}")
        return "\n".join(out)


def apply_pass(spec: PassSpec, subject: Any) -> Any:
    """One registered pass on its subject (a cascade, or a program for a program pass); a
    TypeError or ValueError it raises (an option value it cannot take) names the pass."""
    try:
        return registered_passes()[spec.name](subject, **dict(spec.options))
    except EinfuseError:
        raise
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"pass {spec}: {exc}") from exc


def run_passes(
    cascade: Cascade, pipeline: str | list[PassSpec], *, check: bool = True
) -> PassResult:
    """Run a pipeline; with ``check`` the verifier runs before and after every pass."""
    specs = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    if check:
        verify(cascade)
    history = [("input", cascade)]
    steps: list[Steps] = [()]
    for spec in specs:
        if spec.name in _PROGRAM_PASSES:
            raise PipelineError(
                f"{spec.name} is a program pass: it runs on a whole lifted program "
                "(einfuse.jit, or `einfuse passes FILE.py:FUNCTION --args ...`), not on one cascade"
            )
        with _recording() as sink:
            cascade = keep_output_dtypes(cascade, apply_pass(spec, cascade))
        if check:
            verify(cascade)
        history.append((str(spec), cascade))
        steps.append(tuple(sink))
    return PassResult(cascade, tuple(history), tuple(steps))
