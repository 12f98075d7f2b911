"""Dead-code elimination: drop Einsums whose output nobody reads.

Rewrites such as ``defer-division`` and ``fuse`` leave producers behind that they
inlined or replaced (the probabilities ``A`` of 3-pass attention, the global max ``GM``
once a running max stands in for it). Removing them is its own pass so that each
rewrite stays one idea, and so a user can see what the rewrite left behind.
Declared inputs stay even when unread: they are the cascade's interface.
"""

from __future__ import annotations

from collections.abc import Collection

from einfuse.ir.cascade import Cascade, Einsum
from einfuse.ir.expr import accesses
from einfuse.passes.manager import register_pass


@register_pass("dce")
def dce(c: Cascade) -> Cascade:
    """Keep only the Einsums that an output depends on."""
    return remove_unread(c)


def remove_unread(c: Cascade, only: Collection[str] | None = None) -> Cascade:
    """Remove unread Einsums; with ``only``, just those among the named tensors."""
    dead = unread(c) if only is None else unread(c) & set(only)
    if not dead:
        return c
    return c.with_einsums(tuple(e for e in c.einsums if e.output not in dead))


def unread(c: Cascade) -> set[str]:
    """Einsum outputs that no output depends on.

    One backward sweep suffices: an Einsum is live if an output or a live Einsum reads it.
    """
    live = set(c.outputs)
    for e in reversed(c.einsums):
        if e.output in live:
            live.update(reads(e))
    return {e.output for e in c.einsums} - live


def reads(e: Einsum) -> tuple[str, ...]:
    """Tensors an Einsum reads, its initial value included (``Einsum.inputs`` leaves it out)."""
    init = [a.tensor for a in accesses(e.init)] if e.init is not None else []
    return tuple(dict.fromkeys([*e.inputs, *init]))
