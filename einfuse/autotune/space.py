"""The search space: which (pipeline, Schedule) pairs the autotuner may choose from.

The space is a list of categorical `Param`s. Each one says what it sets: a pass toggle or a
pass option (which builds the pipeline string), a rank's tile, the loop order, a tensor's
memory placement, or a schedule option (which build the `Schedule`). Params may be active only
under another's value (``fuse.tile`` only when ``fuse`` is on), so a point is the tuple of the
active params' values, hashable and canonical.

Passes and backends declare their own parameters: a *provider* is a function from a
`SpaceContext` to params, registered by name with `register_space`. The built-in providers
(tiles, loop order, placement, fuse) live in `space_providers`; a new pass (pruning ratios,
overlap chunks) adds one more provider next to its code and nothing here changes.

Every param has a heuristic default, so the default point is always in the space and always
deterministic: it is what the compiler does before any tuning.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from einfuse.ir.dtypes import ITEMSIZE

if TYPE_CHECKING:
    import optuna

    from einfuse.cost_model.target import Target
    from einfuse.ir.cascade import Cascade

Choice = bool | int | float | str
Point = tuple[tuple[str, Choice], ...]
ParamKind = Literal["pass", "pass_option", "tile", "loop_order", "placement", "option"]
SCHEDULE_KINDS: frozenset[str] = frozenset({"tile", "loop_order", "placement", "option"})
PIPELINE_KINDS: frozenset[str] = frozenset({"pass", "pass_option"})


@dataclass(frozen=True, slots=True)
class Param:
    """One categorical choice. ``subject`` is the pass, rank, tensor or option it sets.

    ``when`` makes it active only while another (earlier) param has the given value.
    ``claims`` lists ranks a pass option tiles itself, so the plain tile of those ranks is
    offered only while that pass is off.
    """

    name: str
    kind: ParamKind
    subject: str
    choices: tuple[Choice, ...]
    default: Choice
    option: str = ""
    when: tuple[str, Choice] | None = None
    claims: tuple[str, ...] = ()

    def consumed_by(self, consumes: frozenset[str]) -> bool:
        """Whether a backend consuming these kinds or param names reads this param."""
        return self.kind in consumes or self.name in consumes

    def __post_init__(self) -> None:
        if self.default not in self.choices:
            raise ValueError(f"param {self.name}: default {self.default!r} not in its choices")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"param {self.name}: repeated choices {self.choices}")


@dataclass(frozen=True, slots=True)
class SpaceOptions:
    """Knobs of space construction (all bounded, so the default space stays sweepable)."""

    min_tile: int = 8
    min_tiled_size: int = 128  # ranks smaller than this are never tiled (head dims)
    default_tile: int = 512
    max_divisor_choices: int = 4  # non-power-of-two divisors kept per rank
    max_loop_ranks: int = 3
    providers: tuple[str, ...] | None = None  # None: every registered provider
    backend: str = "jax"  # the backend the candidates are emitted by (its own params, tiles)


@dataclass(frozen=True, slots=True)
class SpaceContext:
    """What a provider may look at: the cascade bound to sizes on a target."""

    cascade: Cascade
    target: Target
    sizes: Mapping[str, int]
    options: SpaceOptions = field(default_factory=SpaceOptions)

    @property
    def word_bytes(self) -> int:
        sizes = [_itemsize(t.dtype) for t in self.cascade.inputs if t.dtype != "bool"]
        return max(sizes, default=self.target.word_bytes)

    @property
    def on_chip_bytes(self) -> float:
        """Capacity a tile must fit: the largest managed level, else the largest cache."""
        levels = self.target.memory[1:]
        managed = [m.capacity_bytes for m in levels if m.managed]
        if managed:
            return max(managed)
        return levels[0].capacity_bytes if levels else self.target.memory[0].capacity_bytes

    def tile_choices(self, rank: str, minimum: int | None = None) -> tuple[int, ...]:
        """Powers of two and divisors of the rank's size, up to it, that fit on chip."""
        size = self.sizes[rank]
        low = minimum or self.options.min_tile
        powers = {1 << k for k in range(low.bit_length() - 1, size.bit_length()) if 1 << k < size}
        divisors = sorted(
            (d for d in _divisors(size) if low <= d < size and d % low == 0 and d not in powers),
            reverse=True,
        )[: self.options.max_divisor_choices]
        slab = self.word_bytes * self._smallest_slab(rank)
        tiles = {*powers, *divisors, size}
        fits = sorted(t for t in tiles if t >= low and t * slab <= self.on_chip_bytes)
        return tuple(fits) or (min(size, low),)

    def _smallest_slab(self, rank: str) -> int:
        """Elements per unit of tile in the smallest tensor holding ``rank`` (others minimal)."""
        slabs = []
        for t in self.cascade.inputs:
            if rank in t.ranks:
                others = [min(self.sizes[r], self.options.min_tile) for r in t.ranks if r != rank]
                slabs.append(max(1, math.prod(others)))
        return min(slabs, default=1)

    def default_tile(self, choices: Sequence[int], preferred: int | None = None) -> int:
        """The largest choice not above the preferred tile (the smallest if all are)."""
        want = preferred or self.options.default_tile
        below = [c for c in choices if c <= want]
        return max(below) if below else min(choices)


def _divisors(n: int) -> set[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return {*small, *(n // d for d in small)}


def _itemsize(dtype: str) -> int:
    """Bytes per element (``einfuse.ir.dtypes.ITEMSIZE``; NumPy for anything else)."""
    if dtype in ITEMSIZE:
        return ITEMSIZE[dtype]
    import numpy as np

    return np.dtype(dtype).itemsize


SpaceProvider = Callable[[SpaceContext], Sequence[Param]]
_PROVIDERS: dict[str, SpaceProvider] = {}


def register_space(name: str) -> Callable[[SpaceProvider], SpaceProvider]:
    """Register a provider of params; passes and backends declare their own this way."""

    def deco(fn: SpaceProvider) -> SpaceProvider:
        if name in _PROVIDERS and _PROVIDERS[name] is not fn:
            raise ValueError(f"space provider {name!r} registered twice")
        _PROVIDERS[name] = fn
        return fn

    return deco


def space_providers() -> dict[str, SpaceProvider]:
    from einfuse.autotune import providers  # noqa: F401  (registers the built-ins)

    return dict(_PROVIDERS)


# --------------------------------------------------------------------------- candidates
@dataclass(frozen=True, slots=True)
class Candidate:
    """What a point means: a pass pipeline and the Schedule of the cascade it produces."""

    pipeline: str
    schedule: Any  # einfuse.ir.schedule.Schedule
    point: Point

    @property
    def key(self) -> str:
        """Canonical text: equal keys mean the same program and schedule."""
        return f"{self.pipeline}|{self.schedule}"


@dataclass(frozen=True, slots=True)
class SearchSpace:
    params: tuple[Param, ...]

    # -- points ---------------------------------------------------------------
    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"no param {name!r}; params: {', '.join(p.name for p in self.params)}")

    def _complete(self, values: Mapping[str, Choice]) -> Point:
        """The point with these values where active, defaults elsewhere, inactive ones dropped."""
        chosen: dict[str, Choice] = {}
        for p in self.params:
            if p.when is None or chosen.get(p.when[0], _MISSING) == p.when[1]:
                value = values.get(p.name, p.default)
                chosen[p.name] = value if value in p.choices else p.default
        return tuple(chosen.items())

    def point(self, values: Mapping[str, Choice] | None = None) -> Point:
        return self._complete(values or {})

    def default_point(self) -> Point:
        return self._complete({})

    def points(self) -> Iterator[Point]:
        """Every point once, in a deterministic order (the default's choices first)."""

        def walk(index: int, chosen: dict[str, Choice]) -> Iterator[Point]:
            if index == len(self.params):
                yield tuple(chosen.items())
                return
            p = self.params[index]
            if p.when is not None and chosen.get(p.when[0], _MISSING) != p.when[1]:
                yield from walk(index + 1, chosen)
                return
            for c in (p.default, *(c for c in p.choices if c != p.default)):
                chosen[p.name] = c
                yield from walk(index + 1, chosen)
                del chosen[p.name]

        return walk(0, {})

    def size(self) -> int:
        """Number of points, counted without enumerating the independent params."""
        drivers = {p.when[0] for p in self.params if p.when is not None}

        def count(index: int, chosen: dict[str, Choice]) -> int:
            if index == len(self.params):
                return 1
            p = self.params[index]
            if p.when is not None and chosen.get(p.when[0], _MISSING) != p.when[1]:
                return count(index + 1, chosen)
            if p.name not in drivers:
                return len(p.choices) * count(index + 1, chosen)
            total = 0
            for c in p.choices:
                chosen[p.name] = c
                total += count(index + 1, chosen)
                del chosen[p.name]
            return total

        return count(0, {})

    def random_point(self, rng: random.Random) -> Point:
        chosen: dict[str, Choice] = {}
        for p in self.params:
            if p.when is None or chosen.get(p.when[0], _MISSING) == p.when[1]:
                chosen[p.name] = rng.choice(p.choices)
        return tuple(chosen.items())

    def neighbors(self, point: Point) -> Iterator[Point]:
        """Points differing in one active param (dependent params follow their defaults)."""
        values = dict(point)
        for name, value in point:
            for c in self.param(name).choices:
                if c != value:
                    yield self._complete({**values, name: c})

    def suggest(self, trial: optuna.trial.BaseTrial) -> Point:
        """Ask Optuna for a point (define-by-run, so conditional params stay conditional)."""
        chosen: dict[str, Choice] = {}
        for p in self.params:
            if p.when is None or chosen.get(p.when[0], _MISSING) == p.when[1]:
                chosen[p.name] = trial.suggest_categorical(p.name, p.choices)
        return tuple(chosen.items())

    def distributions(self, point: Point) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution

        return {name: CategoricalDistribution(self.param(name).choices) for name, _ in point}

    # -- meaning ----------------------------------------------------------------
    def project(self, point: Point, consumes: frozenset[str]) -> Point:
        """The point with every param these kinds or names do not cover back at its default."""
        keep = {name: v for name, v in point if self.param(name).consumed_by(consumes)}
        return self._complete(keep)

    def pipeline(self, point: Point) -> str:
        values = dict(point)
        parts = []
        for p in self.params:
            if p.kind == "pass" and values.get(p.name) is True:
                opts = [
                    f"{q.option}={values[q.name]}"
                    for q in self.params
                    if q.kind == "pass_option" and q.subject == p.subject and q.name in values
                ]
                parts.append(f"{p.subject}{{{','.join(opts)}}}" if opts else p.subject)
        return ",".join(parts)

    def candidate(self, point: Point) -> Candidate:
        from einfuse.autotune.providers import schedule_of

        values = dict(point)
        by_kind: dict[str, list[tuple[str, Choice]]] = {k: [] for k in SCHEDULE_KINDS}
        for p in self.params:
            if p.kind in SCHEDULE_KINDS and p.name in values:
                by_kind[p.kind].append((p.subject, values[p.name]))
        return Candidate(self.pipeline(point), schedule_of(by_kind), point)

    def digest(self) -> str:
        text = json.dumps([_param_json(p) for p in self.params], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def restricted(self, names: Sequence[str]) -> SearchSpace:
        """Only the named params (others stay at their defaults): a smaller space to sweep."""
        return SearchSpace(tuple(p for p in self.params if p.name in names))

    def describe(self) -> str:
        lines = [f"{self.size()} points"]
        for p in self.params:
            cond = f" when {p.when[0]}={p.when[1]}" if p.when else ""
            lines.append(f"  {p.name} ({p.kind}){cond}: {list(p.choices)} default {p.default}")
        return "\n".join(lines)


_MISSING = object()


def _param_json(p: Param) -> dict[str, Any]:
    return {
        "name": p.name,
        "kind": p.kind,
        "subject": p.subject,
        "choices": list(p.choices),
        "default": p.default,
        "option": p.option,
        "when": list(p.when) if p.when else None,
    }


def build_space(
    cascade: Cascade,
    target: Target,
    sizes: Mapping[str, int],
    options: SpaceOptions | None = None,
) -> SearchSpace:
    """The space of ``cascade`` bound to ``sizes`` on ``target``, from the registered providers."""
    ctx = SpaceContext(cascade, target, dict(sizes), options or SpaceOptions())
    registry = space_providers()
    names = ctx.options.providers if ctx.options.providers is not None else tuple(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown space providers {unknown}; registered: {sorted(registry)}")
    params: list[Param] = []
    for name in names:
        params.extend(registry[name](ctx))
    return SearchSpace(_resolve_claims(params))


def _resolve_claims(params: list[Param]) -> tuple[Param, ...]:
    """A rank tiled by a pass option keeps its plain tile param only while that pass is off.

    A tile param with claims of its own belongs to the pass (``fuse.query_tile``) and stays.
    """
    toggles = {p.subject: p for p in params if p.kind == "pass"}
    by_name = {p.name: p for p in params}
    claimed: dict[str, Param] = {}
    for p in params:
        if p.kind == "pass_option" and p.subject in toggles:
            claimed.update(dict.fromkeys(p.claims, toggles[p.subject]))
        elif p.kind == "tile" and p.claims and p.when and p.when[0] in by_name:
            claimed.update(dict.fromkeys(p.claims, by_name[p.when[0]]))
    out = []
    for p in params:
        if p.kind == "tile" and p.subject in claimed and not p.claims:
            toggle = claimed[p.subject]
            if p.when is not None:
                continue  # already conditional on something else: leave the rank to the pass
            p = replace(p, when=(toggle.name, False))
        out.append(p)
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"space providers declared a param twice: {names}")
    order = {p.name: i for i, p in enumerate(out)}
    for p in out:
        if p.when is not None and order.get(p.when[0], len(out)) >= order[p.name]:
            raise ValueError(f"param {p.name} depends on {p.when[0]}, which must come earlier")
    return tuple(out)


def loop_order_choices(ranks: Sequence[str], limit: int) -> tuple[str, ...]:
    """Permutations of (at most ``limit``) ranks, each as ``"p,m"`` text, given order first."""
    ranks = list(ranks)[:limit]
    return tuple(",".join(order) for order in itertools.permutations(ranks))
