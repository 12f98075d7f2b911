"""The overlap passes' shape questions, asked of a cascade: the choosers their ``auto`` takes.

``chunk_gain``, ``reorder_norm_gain`` and ``split_gain`` price shapes (tokens, widths, TP
degree, dtype); the passes hold cascades. This module reads the shapes off a cascade:

* a reduce-scatter or all-reduce ``AR[t, d] = P[y, t, d]`` (its body a plain read of partial
  sums): ``tp`` is the size of the summed device rank; the partial sums' first rank that is no
  device rank is the token rank (``tokens``), the product of the rest ``n``; ``k`` is the
  product of the sizes of the ranks its producer matmul ``P[x, t, d] = A[..] * W[..]`` sums
  over (device ranks excluded). No producer that sums: nothing to overlap, it does not pay.
* reorder-norm's all-reduce: ``tokens`` and ``hidden`` from its output's ranks the same way.
* split-tokens: a ``LayerShape`` from the cascade's collectives that read a producer matmul,
  in program order. The first is the attention sublayer's output projection, the second the
  MLP's down projection (``tp_block``'s layout): ``hidden`` is the partial sums' width;
  ``head_dim`` the size of the last rank the first producer sums over, ``heads = tp * k1 /
  head_dim``; ``ffn = tp * k2``. Assumed: ``kv_heads = heads`` (GQA groups are not read off:
  the QKV GEMM is priced as multi-head) and one causal sequence of all tokens. A cascade with
  fewer than two such collectives is not a layer and split-tokens is not priced (not applied).

Each chooser returns ``(value, why)`` with the cost model's ``why`` line, None or False when
the rewrite does not pay. ``saving_s`` prices one pass as the autotuner gave it (chunk count,
offset) for its model objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from einfuse.cost_model.collectives import collective_time
from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.gemm import dtype_bytes
from einfuse.cost_model.overlap import ChunkGain, chunk_gain, interconnect_for
from einfuse.cost_model.overlap import reorder_norm_gain as _reorder_norm_gain
from einfuse.cost_model.target import Target, get_target
from einfuse.cost_model.token_split import WAVE_ROUNDING, LayerShape, split_gain
from einfuse.ir.cascade import Cascade
from einfuse.ir.devices import Communication, collectives
from einfuse.ir.dtypes import tensor_dtypes
from einfuse.ir.expr import Access
from einfuse.passes.overlap_common import register_chooser

MAX_CHUNKS = 16


@dataclass(frozen=True, slots=True)
class GemmShape:
    """A producer ``[tokens, k] @ [k, n]`` per device and its collective over ``tp`` devices."""

    tokens: int
    n: int
    k: int
    tp: int
    dtype: str
    kind: str


def as_target(target: object) -> Target:
    return get_target(target, calibrate=False) if isinstance(target, str) else target  # type: ignore[return-value]


def _size(c: Cascade, rank: str) -> int:
    size = c.size(rank)
    if not isinstance(size, int):
        raise CostModelError(f"the size of {rank} must be a bound integer, got {size}")
    return int(size)


def _comm(c: Cascade, name: str) -> Communication:
    comm = next((m for m in collectives(c) if m.einsum == name), None)
    if comm is None or comm.kind not in ("all_reduce", "reduce_scatter"):
        raise CostModelError(f"{name} is not an all-reduce or reduce-scatter")
    return comm


def _plain(c: Cascade, ranks: tuple[str, ...]) -> list[str]:
    return [r for r in ranks if c.device_axis(r) is None]


def collective_shape(c: Cascade, name: str) -> GemmShape:
    """The shape ``chunk_gain`` prices for collective ``name`` (see the module docstring)."""
    comm = _comm(c, name)
    e = c.writer(name)
    assert e is not None
    if not isinstance(e.expr, Access):
        raise CostModelError(f"{name} does not read its partial sums plainly")
    src = e.expr.tensor
    producer = c.writer(src)
    summed = _plain(c, producer.reduced_ranks) if producer is not None else []
    if not summed:
        raise CostModelError(f"{src} is no matmul (sums nothing): no compute to overlap")
    ranks = _plain(c, c.tensor_ranks(src))
    tokens = _size(c, ranks[0])
    n = math.prod(_size(c, r) for r in ranks[1:])
    k = math.prod(_size(c, r) for r in summed)
    tp = _size(c, comm.reduced_rank or "")
    return GemmShape(tokens, n, k, tp, tensor_dtypes(c)[src], comm.kind)


def norm_shape(c: Cascade, name: str) -> tuple[int, int, int, str]:
    """(tokens, hidden, tp, dtype) of an all-reduce, for ``reorder_norm_gain``."""
    comm = _comm(c, name)
    ranks = _plain(c, c.tensor_ranks(name))
    tokens = _size(c, ranks[0])
    hidden = math.prod(_size(c, r) for r in ranks[1:])
    return tokens, hidden, _size(c, comm.reduced_rank or ""), tensor_dtypes(c)[name]


def layer_shape(c: Cascade, rank: str) -> tuple[LayerShape, int, str]:
    """The layer ``split_gain`` prices, its TP degree and dtype (see the module docstring)."""
    shapes = []
    for m in collectives(c):
        if m.kind in ("all_reduce", "reduce_scatter"):
            try:
                shapes.append((m.einsum, collective_shape(c, m.einsum)))
            except CostModelError:
                continue
    if len(shapes) < 2:
        raise CostModelError(
            f"split_gain prices a whole layer (attention and MLP, each ending in a collective "
            f"of a matmul's partial sums); this cascade has {len(shapes)}"
        )
    (attn_name, attn), (_, mlp) = shapes[0], shapes[1]
    producer = c.writer(c.writer(attn_name).expr.tensor)  # type: ignore[union-attr]
    summed = _plain(c, producer.reduced_ranks)  # type: ignore[union-attr]
    head_dim = _size(c, summed[-1])
    heads = attn.tp * attn.k // head_dim
    # (kv heads, groups, dim) as tp_block sums them: GQA's kv heads lead; else multi-head
    kv = attn.tp * math.prod(_size(c, r) for r in summed[:-2]) if len(summed) > 2 else heads
    layer = LayerShape(
        tokens=_size(c, rank),
        hidden=attn.n,
        ffn=mlp.k * mlp.tp,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
    )
    return layer, attn.tp, attn.dtype


# --------------------------------------------------------------------------- choices
def best_chunks(
    shape: GemmShape, target: Target, bidirectional: bool = False
) -> tuple[ChunkGain | None, str]:
    """The fastest chunk count the ring can run (it divides each device's ``tokens / tp``
    rows; even when bidirectional), or None and the cost model's why."""
    args = dict(tp=shape.tp, target=target, dtype=shape.dtype, kind=shape.kind)
    free = chunk_gain(shape.tokens, shape.n, shape.k, **args, bidirectional=bidirectional)  # type: ignore[arg-type]
    best = None
    for n in range(2, MAX_CHUNKS + 1):
        if shape.tokens % (shape.tp * n) or (bidirectional and n % 2):
            continue
        g = chunk_gain(shape.tokens, shape.n, shape.k, **args, bidirectional=bidirectional,
                       chunks=n)  # type: ignore[arg-type]  # fmt: skip
        if g.applies and (best is None or g.overlapped_s < best.overlapped_s):
            best = g
    if best is None:
        why = free.why if not free.applies else f"no chunk count divides {shape.tokens} tokens"
        return None, why
    return best, best.why


def _asked(fn: Callable[[], tuple[object, str]]) -> tuple[object, str]:
    try:
        return fn()
    except CostModelError as exc:
        return None, f"not applied: {exc}"


@register_chooser("chunks")
def chunks_for(target: object, bidirectional: bool = False) -> Callable[[Cascade, str], object]:
    """``chunk-collective{chunks=auto}``: the chunk count per collective, or None."""
    t = as_target(target)

    def choose(c: Cascade, name: str) -> tuple[object, str]:
        def ask() -> tuple[object, str]:
            g, why = best_chunks(collective_shape(c, name), t, bidirectional)
            return (g.chunks if g else None), why

        return _asked(ask)

    return choose


@register_chooser("offset")
def offset_for(target: object, wave: int = WAVE_ROUNDING) -> Callable[[Cascade, str], object]:
    """``split-tokens{offset=auto}``: the split offset for the pass's ``wave``, or None."""
    t = as_target(target)

    def choose(c: Cascade, rank: str) -> tuple[object, str]:
        def ask() -> tuple[object, str]:
            layer, tp, dtype = layer_shape(c, rank)
            g = split_gain(layer, tp=tp, target=t, dtype=dtype)
            if not g.applies:
                return None, g.why
            return g.first - -(-layer.tokens // wave) * wave // 2, g.why

        return _asked(ask)

    return choose


@register_chooser("pays")
def pays_for(target: object) -> Callable[[Cascade, str], tuple[bool, str]]:
    """``reorder-norm{when=pays}``: whether reordering this all-reduce pays."""
    t = as_target(target)

    def pays(c: Cascade, name: str) -> tuple[bool, str]:
        def ask() -> tuple[object, str]:
            tokens, hidden, tp, dtype = norm_shape(c, name)
            g = _reorder_norm_gain(tokens, hidden, tp=tp, target=t, dtype=dtype)
            return g.applies, g.why

        ok, why = _asked(ask)
        return bool(ok), why

    return pays


# --------------------------------------------------------------------------- pricing
def serial_comm_s(c: Cascade, target: object) -> float:
    """Every all-reduce / reduce-scatter of ``c`` run after its producer, nothing overlapped
    (what the program's compute time leaves out)."""
    t = as_target(target)
    total = 0.0
    for m in collectives(c):
        if m.kind not in ("all_reduce", "reduce_scatter"):
            continue
        ranks = _plain(c, c.tensor_ranks(m.einsum))
        nbytes = math.prod(_size(c, r) for r in ranks) * dtype_bytes(tensor_dtypes(c)[m.einsum])
        tp = _size(c, m.reduced_rank or "")
        if m.kind == "reduce_scatter":
            nbytes *= tp  # the shard's output: the collective moves the whole
        total += collective_time(m.kind, nbytes, tp, interconnect_for(t, tp))
    return total


def saving_s(
    c: Cascade, name: str, what: str, options: Mapping[str, object], target: object
) -> float | None:
    """Seconds overlap pass ``name`` with ``options`` saves on ``what`` (a collective, or
    split-tokens' token rank), priced on the cascade it was given; None where the model says
    it does not pay (below ``MIN_GAIN``). ``narrowed``: reorder-norm made an all-reduce read
    only at each device's rows a reduce-scatter (half the ring's traffic, no norm moved)."""
    t = as_target(target)
    if name == "reorder-norm" and options.get("narrowed"):  # a reduce-scatter, no gather
        tokens, hidden, tp, dtype = norm_shape(c, what)
        nbytes, ic = tokens * hidden * dtype_bytes(dtype), interconnect_for(t, tp)
        return collective_time("all_reduce", nbytes, tp, ic) - collective_time(
            "reduce_scatter", nbytes, tp, ic
        )
    if name == "reorder-norm":
        tokens, hidden, tp, dtype = norm_shape(c, what)
        r = _reorder_norm_gain(tokens, hidden, tp=tp, target=t, dtype=dtype)
        return r.serial_s - r.reordered_s if r.applies else None
    if name == "chunk-collective":
        both = bool(options.get("bidirectional", False))
        shape = collective_shape(c, what)
        chunks = options.get("chunks", 1)
        if chunks == "auto":
            g, _ = best_chunks(shape, t, both)
        else:
            g = chunk_gain(shape.tokens, shape.n, shape.k, tp=shape.tp, target=t,
                           dtype=shape.dtype, kind=shape.kind, bidirectional=both,  # type: ignore[arg-type]
                           chunks=int(chunks))  # type: ignore[call-overload]  # fmt: skip
        return g.serial_s - g.overlapped_s if g is not None and g.applies else None
    wave = int(options.get("wave", WAVE_ROUNDING))  # type: ignore[call-overload]
    layer, tp, dtype = layer_shape(c, what)
    offset = options.get("offset", 0)
    if offset == "auto":
        offset = offset_for(t, wave)(c, what)[0]
        if offset is None:
            return None
    # the pass splits at round_up(T, wave)/2 + offset; split_gain at round_up(T, 256)/2 + own
    first = -(-layer.tokens // wave) * wave // 2 + int(offset)  # type: ignore[call-overload]
    own = first - -(-layer.tokens // WAVE_ROUNDING) * WAVE_ROUNDING // 2
    s = split_gain(layer, tp=tp, target=t, dtype=dtype, offset=own)
    return s.serial_s - s.split_s if s.applies else None
