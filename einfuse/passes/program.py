"""Running program passes: a pipeline over a whole lifted Program, with verifier and history.

The counterpart of ``run_passes`` for passes registered with ``register_program_pass``. The
program verifier checks what a program pass can break and a cascade pass cannot: every
region's cascade is valid and agrees with the shapes of the values it reads and writes, and
every value is defined before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from einfuse.ir.errors import EinfuseError
from einfuse.ir.verify import verify
from einfuse.passes.manager import PassSpec, PipelineError, parse_pipeline

if TYPE_CHECKING:
    from einfuse.einsum_cascade.lift import Program


class ProgramVerifyError(EinfuseError):
    """A program whose regions disagree with the values they read or write."""


def verify_program(program: Program) -> Program:
    """Check every region against the avals of its values, and definition before use."""
    from einfuse.einsum_cascade.lift import Opaque

    defined = set(program.inputs) | {v for v, _ in program.consts}
    k = 0
    for seg in program.segments:
        if isinstance(seg, Opaque):
            reads = [a for a in seg.eqn.invars if isinstance(a, int)]
            writes = [a for a in seg.eqn.outvars if isinstance(a, int)]
            where = f"opaque {seg.primitive} at {seg.source}"
        else:
            verify(seg.cascade)
            reads, writes, where = list(seg.inputs), list(seg.outputs), f"region {k}"
            _check_shapes(program, seg, where)
            k += 1
        missing = [v for v in reads if v not in defined]
        if missing:
            raise ProgramVerifyError(f"{where} reads %{missing[0]} before it is defined")
        defined.update(writes)
    missing = [a for a in program.outputs if isinstance(a, int) and a not in defined]
    if missing:
        raise ProgramVerifyError(f"program output %{missing[0]} is never defined")
    return program


def _check_shapes(program: Program, region: object, where: str) -> None:
    cascade = region.cascade  # type: ignore[attr-defined]
    pairs = list(zip(region.inputs, region.input_tensors))  # type: ignore[attr-defined]
    pairs += list(zip(region.outputs, region.output_tensors))  # type: ignore[attr-defined]
    for value, tensor in pairs:
        have = tuple(program.avals[value].shape)
        want = cascade.tensor_shape(tensor)
        if all(isinstance(n, int) for n in want) and have != want:
            raise ProgramVerifyError(
                f"{where}: tensor {tensor}{list(want)} holds %{value} of shape {list(have)}"
            )


@dataclass(frozen=True)
class ProgramPassResult:
    """The final program and every intermediate one, each stamped with its pass."""

    program: Program
    history: tuple[tuple[str, Program], ...] = field(default=())

    def print_after_all(self) -> str:
        return "\n".join(f"// ----- after {name}\n{p}" for name, p in self.history)


def run_program_passes(
    program: Program, pipeline: str | list[PassSpec], *, check: bool = True
) -> ProgramPassResult:
    """Run program passes in order; with ``check`` the program verifier runs around each."""
    from einfuse.passes.manager import apply_pass, is_program_pass

    specs = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    if check:
        verify_program(program)
    history = [("input", program)]
    for spec in specs:
        if not is_program_pass(spec.name):
            raise PipelineError(f"{spec.name} is a region pass, not a program pass")
        program = apply_pass(spec, program)
        if check:
            verify_program(program)
        history.append((str(spec), program))
    return ProgramPassResult(program, tuple(history))
