"""The lifter: a closed jaxpr becomes a Program of Einsum cascades and opaque equations.

``lift(closed_jaxpr)`` flattens nested calls, then walks the equations in order. Each
maximal run of liftable equations becomes one ``Region`` (a verified Cascade plus the
jaxpr values it reads and writes); any other equation becomes an ``Opaque`` segment that
the backend binds unchanged, so every JAX function still compiles and stays correct.
Which primitives lift, and how, is the rule table in ``lift_rules``.

A region remembers the original equations it replaced. Where JAX's derivative of the
emitted code would differ from the user's (``stop_gradient``, inlined custom_jvp/custom_vjp
bodies), the executor differentiates those original equations instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from jax._src import core

from einfuse.einsum_cascade.lift_flatten import Atom, FlatEqn, FlatProgram, flatten
from einfuse.einsum_cascade.lift_region import Decline, RegionBuilder, source_loc
from einfuse.einsum_cascade.lift_rules import RULES, is_view, kind, liftable
from einfuse.ir.cascade import Cascade
from einfuse.ir.errors import EinfuseError
from einfuse.ir.schedule import Schedule
from einfuse.ir.verify import verify


@dataclass(frozen=True, slots=True, eq=False)
class Region:
    """One cascade standing for a run of jaxpr equations.

    ``inputs``/``outputs`` are value ids; ``input_tensors``/``output_tensors`` the cascade
    tensors holding them (an output tensor may hold several ids). ``derivative`` says how
    to differentiate: ``emitted`` (JAX differentiates the emitted code), ``jvp`` or ``vjp``
    (the original equations' derivative, to keep stop_gradient and custom rules), or
    ``none`` (a program pass resized or extended it: differentiating it raises).
    """

    cascade: Cascade
    inputs: tuple[int, ...]
    input_tensors: tuple[str, ...]
    outputs: tuple[int, ...]
    output_tensors: tuple[str, ...]
    original: tuple[FlatEqn, ...]
    derivative: str
    primitives: tuple[str, ...]
    schedule: Schedule | None = None  # a tuned mapping the backend follows, if any
    mesh: Any = None  # a lifted shard_map's jax.sharding.Mesh, which emission runs on

    def with_cascade(self, cascade: Cascade, schedule: Schedule | None = None) -> Region:
        """The same region computed by another cascade (after passes), checked to fit."""
        names = {t.name for t in cascade.inputs}
        missing = [t for t in self.input_tensors if t not in names]
        lost = [t for t in self.output_tensors if t not in cascade.outputs]
        if missing or lost:
            raise EinfuseError(
                f"a pass changed the region's interface: inputs {missing or 'kept'}, "
                f"outputs {lost or 'kept'} are gone"
            )
        return replace(self, cascade=cascade, schedule=schedule or self.schedule)


@dataclass(frozen=True, slots=True, eq=False)
class Opaque:
    """An equation the lifter does not understand, bound unchanged at run time."""

    eqn: FlatEqn
    reason: str = ""  # why an equation that might have lifted (a shard_map) did not

    @property
    def primitive(self) -> str:
        return self.eqn.primitive

    @property
    def label(self) -> str:
        """The primitive, with the name of a named call (``jit prune_tokens_layer2_keep64``)."""
        name = self.eqn.params.get("name")
        return f"{self.primitive} {name}" if isinstance(name, str) else self.primitive

    @property
    def source(self) -> str:
        loc = source_loc(self.eqn.source)
        return f"{loc.file}:{loc.line}" if loc is not None else "<unknown>"


Segment = Region | Opaque


@dataclass(frozen=True, eq=False)
class Program:
    """A lifted function: segments in evaluation order over integer value ids."""

    inputs: tuple[int, ...]
    consts: tuple[tuple[int, Any], ...]
    segments: tuple[Segment, ...]
    outputs: tuple[Atom, ...]
    avals: Mapping[int, core.ShapedArray]

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(s for s in self.segments if isinstance(s, Region))

    @property
    def opaques(self) -> tuple[Opaque, ...]:
        return tuple(s for s in self.segments if isinstance(s, Opaque))

    def with_regions(self, regions: list[Region] | tuple[Region, ...]) -> Program:
        it = iter(regions)
        segments = tuple(next(it) if isinstance(s, Region) else s for s in self.segments)
        return replace(self, segments=segments)

    def __str__(self) -> str:
        return format_program(self)


def lift(closed: core.ClosedJaxpr, *, check: bool = True) -> Program:
    """Lift a closed jaxpr; ``check`` runs the verifier on every region's cascade."""
    flat = flatten(closed, liftable)
    lifts_at = [liftable(e) for e in flat.eqns]
    uses, last_use = value_uses(flat, lifts_at)
    segments: list[Segment] = []
    builder: RegionBuilder | None = None
    for k, eqn in enumerate(flat.eqns):
        lifts = lifts_at[k]
        if builder is not None and not lifts:
            segments.extend(_close(builder, last_use, k - 1, check))
            builder = None
        if not lifts:
            segments.append(_shard_map(eqn, check) if eqn.primitive == "shard_map" else Opaque(eqn))
            continue
        if builder is None:
            builder = RegionBuilder(flat.avals, uses)
        try:
            RULES[eqn.primitive].lift(builder, eqn)
        except Decline:
            segments.extend(_close(builder, last_use, k - 1, check))
            segments.append(Opaque(eqn))
            builder = None
            continue
        builder.eqns.append(eqn)
    if builder is not None:
        segments.extend(_close(builder, last_use, len(flat.eqns) - 1, check))
    return Program(flat.inputs, tuple(flat.consts), tuple(segments), flat.outputs, dict(flat.avals))


def value_uses(flat: FlatProgram, lifts: list[bool]) -> tuple[dict[int, int], dict[int, float]]:
    """Reads of each stored value (views count against what they view) and each id's last read."""
    root: dict[int, int] = {}
    uses: Counter[int] = Counter()
    last: dict[int, float] = {}
    for k, e in enumerate(flat.eqns):
        for a in e.invars:
            if isinstance(a, int):
                last[a] = k
        if lifts[k] and is_view(e):
            src = e.invars[0]
            root[e.outvars[0]] = root.get(src, src)  # type: ignore[arg-type]
            continue
        for a in e.invars:
            if isinstance(a, int):
                uses[root.get(a, a)] += 1
    for a in flat.outputs:
        if isinstance(a, int):
            uses[root.get(a, a)] += 1
            last[a] = float("inf")
    return dict(uses), last


def _shard_map(eqn: FlatEqn, check: bool) -> Segment:
    """A shard_map as one region in the global view (``lift_shard``), or opaque with why."""
    from einfuse.einsum_cascade.lift_shard import lift_shard_map

    try:
        lifted = lift_shard_map(eqn)
        b = lifted.builder
        cascade = b.cascade(lifted.outputs, ((b.me, b.axis), (b.other, b.axis)))
        if check:
            verify(cascade)
    except (Decline, EinfuseError) as exc:
        return Opaque(eqn, reason=f"shard_map not lifted: {exc}")
    return Region(
        cascade,
        lifted.inputs,
        tuple(d.name for _, d in b.inputs),
        tuple(v for v in eqn.outvars if isinstance(v, int)),
        lifted.outputs,
        (eqn,),
        "emitted",
        lifted.primitives,
        mesh=lifted.mesh,
    )


def _close(b: RegionBuilder, last_use: dict[int, float], end: int, check: bool) -> list[Segment]:
    """Finish a region: store what later segments read; drop it when nothing is read.

    Integers are index values in the IR, never stored, so integer results are not region
    outputs: the equations computing them are re-bound as opaque segments.
    """
    needed = [v for v in b.defined if last_use.get(v, -1) > end]
    ints = {v for v in needed if kind(b.avals[v].dtype) == "int"}
    outputs = [v for v in needed if v not in ints]
    regions: list[Segment] = []
    if outputs:
        tensors = [b.output(v) for v in outputs]
        cascade = b.cascade(tensors)
        if check:
            verify(cascade)
        original = _original(b.eqns)
        regions.append(
            Region(
                cascade,
                tuple(v for v, _ in b.inputs),
                tuple(d.name for _, d in b.inputs),
                tuple(outputs),
                tuple(tensors),
                tuple(original),
                _derivative(original),
                tuple(e.primitive for e in b.eqns),
            )
        )
    return regions + [Opaque(e) for e in _slice(b.eqns, ints)]


def _original(eqns: list[FlatEqn]) -> list[FlatEqn]:
    """The equations as JAX had them: an inlined custom call counts once, as the call."""
    out: list[FlatEqn] = []
    seen: set[int] = set()
    for e in eqns:
        item = e.group or e
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


def _derivative(original: list[FlatEqn]) -> str:
    customs = {e.custom for e in original}
    if "vjp" in customs:
        return "vjp"
    stops = [e for e in original if e.primitive == "stop_gradient"]
    if "jvp" in customs or any(not _softmax_shift(e, original) for e in stops):
        return "jvp"
    return "emitted"


_SHAPE_OPS = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims"})


def _softmax_shift(stop: FlatEqn, eqns: list[FlatEqn]) -> bool:
    """Whether a ``stop_gradient`` only shifts a softmax (``exp(x - sg(max x))`` divided by its
    own sum, as ``jax.nn.softmax`` writes it): the result does not depend on the shift, so
    its derivative is the same with or without the stop, and einfuse's own may run."""
    users: dict[int, list[FlatEqn]] = {}
    for e in eqns:
        for v in e.invars:
            if isinstance(v, int):
                users.setdefault(v, []).append(e)

    def through_shapes(e: FlatEqn) -> list[FlatEqn]:
        """The consumers of ``e``'s output, looking through reshapes and broadcasts."""
        out = []
        for u in users.get(e.outvars[0], []) if isinstance(e.outvars[0], int) else []:
            out += through_shapes(u) if u.primitive in _SHAPE_OPS else [u]
        return out

    subs = through_shapes(stop)
    if not subs or any(u.primitive != "sub" or not _second(u, stop, users) for u in subs):
        return False
    for sub in subs:
        exps = users.get(sub.outvars[0], []) if isinstance(sub.outvars[0], int) else []
        if len(exps) != 1 or exps[0].primitive != "exp":
            return False
        uses = users.get(exps[0].outvars[0], [])
        sums = [u for u in uses if u.primitive == "reduce_sum"]
        divs = [u for u in uses if u.primitive == "div" and u.invars[0] == exps[0].outvars[0]]
        if len(sums) != 1 or len(uses) != len(sums) + len(divs) or not divs:
            return False
        if any(sums[0] not in _producers(d.invars[1], eqns) for d in divs):
            return False
    return True


def _second(sub: FlatEqn, stop: FlatEqn, users: dict[int, list[FlatEqn]]) -> bool:
    """Whether ``stop``'s value (maybe reshaped) is what ``sub`` subtracts."""
    seen, todo = set(), [stop]
    while todo:
        e = todo.pop()
        if isinstance(e.outvars[0], int):
            seen.add(e.outvars[0])
            todo += [u for u in users.get(e.outvars[0], []) if u.primitive in _SHAPE_OPS]
    return sub.invars[1] in seen and sub.invars[0] not in seen


def _producers(v: Any, eqns: list[FlatEqn]) -> list[FlatEqn]:
    """The equation writing ``v`` and, through reshapes and broadcasts, the one before it."""
    by_out = {o: e for e in eqns for o in e.outvars if isinstance(o, int)}
    out = []
    while isinstance(v, int) and v in by_out:
        e = by_out[v]
        out.append(e)
        if e.primitive not in _SHAPE_OPS:
            break
        v = e.invars[0]
    return out


def _slice(eqns: list[FlatEqn], wanted: set[int]) -> list[FlatEqn]:
    """The equations (in order) that compute ``wanted`` from the region's inputs."""
    need, out = set(wanted), []
    for e in reversed(eqns):
        if need & {v for v in e.outvars if isinstance(v, int)}:
            out.append(e)
            need |= {v for v in e.invars if isinstance(v, int)}
    return out[::-1]


def format_program(program: Program) -> str:
    """The program as text: each region's cascade, each opaque op as a comment with its line."""
    lines: list[str] = []
    k = 0
    for s in program.segments:
        if isinstance(s, Opaque):
            why = f" ({s.reason})" if s.reason else ""
            lines.append(f"# opaque: {s.label} at {s.source}{why}")
            continue
        ins = ", ".join(f"%{v}->{t}" for v, t in zip(s.inputs, s.input_tensors))
        outs = ", ".join(f"{t}->%{v}" for v, t in zip(s.outputs, s.output_tensors))
        lines.append(f"# region {k}: {len(s.cascade.einsums)} einsums; in {ins}; out {outs}")
        lines.append(str(s.cascade).rstrip("\n"))
        k += 1
    return "\n".join(lines) + "\n"
