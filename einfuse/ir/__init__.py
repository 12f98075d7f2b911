"""The Einsum-cascade IR: expressions, Einsums, Cascades, their text form and verifier."""

from einfuse.ir.cascade import (
    Cascade,
    Einsum,
    Partition,
    SourceLoc,
    TensorDecl,
    bind_size,
    bind_sizes,
    default_size,
)
from einfuse.ir.errors import EinfuseError, ParseError, SpecError, VerifyError
from einfuse.ir.expr import Access, Const, Expr, Op, Size, Var, call
from einfuse.ir.text_parse import parse
from einfuse.ir.text_print import format_cascade, format_expr
from einfuse.ir.text_sizes import parse_size
from einfuse.ir.verify import verify

__all__ = [
    "Access",
    "Cascade",
    "Const",
    "EinfuseError",
    "Einsum",
    "Expr",
    "Op",
    "ParseError",
    "Partition",
    "Size",
    "SourceLoc",
    "SpecError",
    "TensorDecl",
    "Var",
    "VerifyError",
    "bind_size",
    "bind_sizes",
    "call",
    "default_size",
    "format_cascade",
    "format_expr",
    "parse",
    "parse_size",
    "verify",
]
