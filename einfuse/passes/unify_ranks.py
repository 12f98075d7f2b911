"""Give one logical axis one rank name across a cascade.

A rank variable is local to its Einsum, so ``DOT1[f, h, i, b] = X2[f, g, h, i] *
DIV1[f, h, b, g]`` may call the key axis ``g`` while the Einsum that wrote ``DIV1``
called it ``e``. Analyses that follow an axis through the cascade (pass counts,
partition, fuse) need the names to agree, so this pass renames: whenever a plain rank
variable indexes a dimension declared with another rank of the same size, the two
become one name (unless that would make two axes of one Einsum the same; device ranks keep
their names, since which device a read names is what it means). A size-1
dimension read at the constant 0 is read with its rank instead, which means the same.
"""

from __future__ import annotations

from einfuse.ir.cascade import Cascade, Einsum, TensorDecl
from einfuse.ir.expr import Access, Const, Expr, Size, Var, accesses, substitute
from einfuse.passes.manager import register_pass


class _Classes:
    """Union-find over rank names; the representative is the first name seen."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, r: str) -> str:
        self.parent.setdefault(r, r)
        while self.parent[r] != r:
            self.parent[r] = self.parent[self.parent[r]]
            r = self.parent[r]
        return r

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@register_pass("unify-ranks")
def unify_ranks(c: Cascade) -> Cascade:
    classes = _Classes()
    for t in c.inputs:
        for r in t.ranks:
            classes.find(r)
    for e in c.einsums:
        for r in e.ranks:
            classes.find(r)
    for e in c.einsums:
        for a in accesses(e.expr):
            if a.tensor == e.output:
                continue
            declared = c.tensor_ranks(a.tensor)
            for d, i in enumerate(a.indices):
                if not isinstance(i, Var) or not declared[d] or i.rank == declared[d]:
                    continue
                if c.size(i.rank) != c.size(declared[d]):
                    continue
                if c.device_axis(i.rank) or c.device_axis(declared[d]):
                    continue  # which device a read names is its meaning, not its spelling
                if _would_collide(c, classes, i.rank, declared[d]):
                    continue
                classes.union(declared[d], i.rank)
    mapping = {r: classes.find(r) for r in classes.parent if classes.find(r) != r}
    out = c if not mapping else _rename(c, mapping)
    return out.with_einsums([_size_one_reads(out, e) for e in out.einsums])


def _would_collide(c: Cascade, classes: _Classes, a: str, b: str) -> bool:
    """Merging would give two distinct axes of one Einsum (or one tensor) the same name."""
    ca, cb = classes.find(a), classes.find(b)
    groups = [e.ranks for e in c.einsums] + [t.ranks for t in c.inputs]
    for ranks in groups:
        found = {classes.find(r) for r in ranks}
        if ca in found and cb in found:
            return True
    return False


def _rename(c: Cascade, mapping: dict[str, str]) -> Cascade:
    def rename(expr: Expr) -> Expr:
        def repl(node: Expr) -> Expr | None:
            if isinstance(node, Var | Size) and node.rank in mapping:
                return type(node)(mapping[node.rank])
            return None

        return substitute(expr, repl)

    inputs = tuple(
        TensorDecl(t.name, tuple(mapping.get(r, r) for r in t.ranks), t.dtype, loc=t.loc)
        for t in c.inputs
    )
    einsums = [
        Einsum(
            e.output,
            tuple(rename(i) for i in e.indices),
            rename(e.expr),
            e.reduce,
            rename(e.init) if e.init is not None else None,
            loc=e.loc,
        )
        for e in c.einsums
    ]
    sizes = tuple((mapping.get(r, r), s) for r, s in c.sizes if r not in mapping)
    return Cascade(inputs, tuple(einsums), c.outputs, sizes, c.partitions, c.devices)


def _size_one_reads(c: Cascade, e: Einsum) -> Einsum:
    ranks = set(e.ranks)

    def fix(node: Expr) -> Expr | None:
        if not isinstance(node, Access) or node.tensor == e.output:
            return None
        declared = c.tensor_ranks(node.tensor)
        idx = list(node.indices)
        changed = False
        for d, i in enumerate(idx):
            r = declared[d]
            if i == Const(0) and r in ranks and c.size(r) == 1:
                idx[d], changed = Var(r), True
        return Access(node.tensor, tuple(idx)) if changed else node

    expr = substitute(e.expr, fix)
    return e if expr == e.expr else Einsum(e.output, e.indices, expr, e.reduce, e.init, loc=e.loc)
