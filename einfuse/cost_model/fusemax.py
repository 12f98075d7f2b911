"""FuseMax's mapping of the 1-pass attention cascade onto its 2D and 1D PE arrays.

The mapping (Nayak et al., MICRO 2024, section V; artifact ``src/accel/proposal.py``):

* the key rank is partitioned by the array size, ``M0 = PE`` (256), and the 2D array runs every
  Einsum whose iteration space holds a whole ``M0 x P0`` tile: the contractions ``BQK`` and
  ``SLNV``, the tile maximum ``LM``, the exponentials ``SLN`` (``exp_cost_in_macs`` = 7 PE
  cycles each, 6 MACs and an add) and the tile sums ``SLD``. Their ``M0 x P`` tiles stay in the
  PEs' register files;
* the 1D array runs what is left, per query and step: the running max ``RM``, the correction
  ``PRM`` (an exponential), the rescaled running sums ``RD`` and ``RNV``, and after the loop the
  division ``AV = RNV / RD``;
* batch and head ranks are walked one at a time; the query rank is tiled by ``P1 x PE`` where
  ``P1`` is the largest factor of ``P / PE`` whose tiles fit the global buffer and registers
  (K and V tiles are then fetched once per ``P1 x PE`` queries).

Why the 2D array's utilization rises with the sequence length, as the model derives it rather
than assumes it. Per ``256 x 256`` step (one key tile against 256 queries) the 2D array does, per
element, ``E + F`` MACs plus 10 ops (max 1, subtract 1, exp 7, sum 1): ``E + F + 10`` = 138
cycles. The 1D array does, per query, ``1 + 8 + 2 + 2F`` ops (``RM``; ``PRM``'s subtract and
exp; ``RD``'s multiply-add; ``RNV``'s per ``f``): ``2F + 11`` = 139 cycles. The arrays work on
different steps at once, so the loop runs at the pace of the busier 1D array, and whatever else
the 1D array must do adds to the time: the epilogue ``AV = RNV / RD``, ``F x P / 256`` cycles per
head, which no 2D work hides. With ``u = M P / 65536`` (the 2D cycles of one op per element):

    util_2D = (E + F + 10) u / ((2F + 11) u + F P / 256) = (E + F + 10) / (2F + 11 + 256 F / M)

which is 138 / (139 + 16384 / M) for BERT (E = F = 64): 0.89 at M = 1K, 0.97 at 4K and 0.99
from 16K on, the paper's figures: the rough form ``1 / (1 + c F 256 / (M (E + F)))`` with
``c = (E + F) / (E + F + 10)``, plus the 1-cycle imbalance between the arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.model import CostModel
from einfuse.cost_model.target import Target, get_target
from einfuse.ir.cascade import Cascade
from einfuse.ir.schedule import Schedule


def array_dim(target: Target) -> int:
    """PEs along one side of the 2D array: the 1D array's lanes (256 on FuseMax)."""
    vector = target.unit("vector")
    if vector.lanes is None:
        raise CostModelError(f"target {target.name!r}: the vector unit gives no lane count")
    return vector.lanes


def fusemax_mapping(
    cascade: Cascade,
    target: str | Target = "fusemax",
    sizes: Mapping[str, int] | None = None,
    query_rank: str = "p",
) -> Schedule:
    """The paper's schedule for a fused (1-pass) attention cascade on a FuseMax-like target."""
    from einfuse.passes.fuse import fused_groups

    t = get_target(target) if isinstance(target, str) else target
    groups = fused_groups(cascade)
    if not groups or groups[0].inner is None:
        raise CostModelError(
            "fusemax_mapping needs a fused 1-pass cascade (a loop over a partitioned rank); "
            "run the fuse pass or use attention(form='1pass')"
        )
    group = groups[0]
    loop, inner = group.rank, group.inner
    pe = array_dim(t)
    matrix, vector = t.unit("matrix").name, t.unit("vector").name
    registers = next(lvl.name for lvl in reversed(t.memory) if lvl.managed)
    model = CostModel(cascade, t, sizes)
    if query_rank not in model.sizes:
        raise CostModelError(f"fusemax_mapping: the cascade has no query rank {query_rank!r}")
    kernel = next(k for k in model.kernels if k.loop_rank == loop)
    options: dict[str, str | int] = {}
    placement: dict[str, str] = {}
    for i in kernel.einsums:
        e, w = cascade.einsums[i], model.work[i]
        on_2d = i in kernel.members and inner in e.ranks
        options[f"unit.{e.output}"] = matrix if on_2d else vector
        if on_2d and inner in e.output_ranks and (w.macs or w.terms):
            placement[e.output] = registers
    everywhere = set.intersection(*(set(cascade.tensor_ranks(d.name)) for d in cascade.inputs))
    tiles = {r: 1 for r in everywhere if r in model.sizes}
    tiles[inner] = pe
    outputs = [r for o in cascade.outputs for r in cascade.tensor_ranks(o)]
    order = [r for r in dict.fromkeys(outputs) if r in tiles or r == query_rank]
    base = Schedule.of(tiles=tiles, loop_order=(*order, loop), placement=placement, options=options)
    blocks = max(1, -(-model.sizes[query_rank] // pe))
    for p1 in sorted((d for d in range(1, blocks + 1) if blocks % d == 0), reverse=True):
        schedule = base.with_tiles({query_rank: p1 * pe})
        if model.report(schedule).fits:
            return schedule
    raise CostModelError(f"fusemax_mapping: even a {pe}-query tile does not fit {t.name}")
