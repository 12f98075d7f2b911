"""User-facing errors: each names the spec line and column, or the op, that caused it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from einfuse.errors import EinfuseError

if TYPE_CHECKING:
    from einfuse.ir.cascade import SourceLoc

__all__ = ["EinfuseError", "ParseError", "SpecError", "VerifyError"]


class SpecError(EinfuseError):
    """An error located in a spec: prints ``file:line:col: message`` with the line and a caret."""

    def __init__(self, message: str, loc: SourceLoc | None = None, *, where: str = "") -> None:
        self.message = message
        self.loc = loc
        self.where = where
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        if self.loc is None:
            return head
        out = f"{self.loc}: {head}"
        if self.loc.text:
            out += f"\n    {self.loc.text}\n    {' ' * (self.loc.col - 1)}^"
        return out


class ParseError(SpecError):
    pass


class VerifyError(SpecError):
    pass
