"""Read optimized HLO module text into computations and their instructions.

Only what the summary needs is kept of an instruction: its name, opcode, operand names and the
raw attribute text after the operand list. Lines XLA wraps join the instruction above them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Instruction:
    """`[ROOT] %name = SHAPE opcode(operands), attributes`, the attributes kept as text."""

    name: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    shape: str = ""  # the result's shape text: `f32[64,8]{1,0}` or a `(...)` tuple of them


@dataclass(frozen=True, slots=True)
class Computation:
    """A named `{ ... }` block of instructions: the entry, a fused body, a loop body, ..."""

    name: str
    instructions: tuple[Instruction, ...]


_MODULE_RE = re.compile(r"^\s*HloModule\s+([^\s,]+)")
_HEADER_RE = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{\s*$")
_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_ARRAY_SHAPE_RE = re.compile(r"[a-z][a-z0-9]*\[[^\]]*\](?:\{[^}]*\})?")
_OPCODE_RE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
_COMPUTATION_REF_RE = re.compile(r"(?:^|[,\s])(to_apply|calls)=(\{[^}]*\}|%?[\w.\-]+)")


def module_names(text: str) -> tuple[str, ...]:
    """The names on the `HloModule` lines of `text`, in order."""
    return tuple(m.group(1) for line in text.splitlines() if (m := _MODULE_RE.match(line)))


def computations(text: str) -> Iterator[Computation]:
    """Computations in module text; a wrapped line's attributes join the instruction above."""
    name: str | None = None
    body: list[Instruction] = []
    for line in text.splitlines():
        if name is None:
            header = _HEADER_RE.match(line)
            if header and not _MODULE_RE.match(line):
                name, body = header.group(1), []
        elif line.lstrip().startswith("}"):
            yield Computation(name, tuple(body))
            name = None
        elif (inst := _parse_instruction(line)) is not None:
            body.append(inst)
        elif body and line.strip():
            body[-1] = replace(body[-1], attributes=f"{body[-1].attributes} {line.strip()}")


def _parse_instruction(line: str) -> Instruction | None:
    """`[ROOT] %name = SHAPE opcode(operands), attributes`, or None if `line` is not one."""
    definition = _DEF_RE.match(line)
    if not definition:
        return None
    pos = definition.end()
    if line.startswith("(", pos):
        pos = _matching_paren(line, pos)
        if pos < 0:
            return None
    else:
        shape = _ARRAY_SHAPE_RE.match(line, pos)
        if not shape:
            return None
        pos = shape.end()
    opcode = _OPCODE_RE.match(line, pos)
    if not opcode:
        return None
    close = _matching_paren(line, opcode.end() - 1)
    if close < 0:
        return None
    operand_text = line[opcode.end() : close - 1]
    operands = tuple(
        part.split()[-1].lstrip("%") for part in _split_top_level(operand_text) if part.split()
    )
    shape_text = line[definition.end() : opcode.start()].strip()
    return Instruction(definition.group(1), opcode.group(1), operands, line[close:], shape_text)


def _matching_paren(text: str, open_at: int) -> int:
    """Index just past the `)` matching the `(` at `open_at`, or -1 if it is not closed."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


# Bytes per element of HLO's primitive types (sub-byte types rounded up to a byte).
_ELEMENT_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2}
_ELEMENT_BYTES |= {"bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ELEMENT_BYTES |= {"c64": 8, "c128": 16}
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of the arrays in a shape's text (a tuple's elements summed; tokens are free)."""
    total = 0
    for dtype, dims in _ARRAY_RE.findall(shape):
        size = 1 if dtype.startswith("f8") else _ELEMENT_BYTES.get(dtype, 0)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def computation_refs(attributes: str) -> Iterator[tuple[str, list[str]]]:
    for match in _COMPUTATION_REF_RE.finditer(attributes):
        names = match.group(2).strip("{}").split(",")
        yield match.group(1), [n.strip().lstrip("%") for n in names if n.strip()]
