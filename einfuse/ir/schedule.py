"""The Schedule: the mapping the autotuner chooses, travelling beside a cascade.

A Cascade says *what* is computed; a Schedule says *how*: tile sizes per rank, the
loop order, which ranks run in parallel (and on which mesh axis), which memory level
holds each tensor, and the options of the passes. It is frozen and stored as sorted
tuples of pairs, so equal schedules hash equal and make cheap cache keys. It has one
text form that prints and parses (``Schedule.parse(str(s)) == s``)::

    tile m=512, p=128; order p, m1, m0; parallel p, h=x; place Q=vmem, K=hbm
    option fuse=true, chunks=4, keep_tokens=0.5; extra "rank-order.A"="[M, K]"

Clauses are separated by ``;`` or new lines and may repeat (a key may not). Option
values are ``true``/``false``, ints, floats (``inf`` too) or strings (bare words or
JSON-quoted). ``extra`` keeps mapping entries read from a spec that nothing uses yet,
as text, so that loading a spec and printing its schedule never drops them.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from einfuse.ir.cascade import SourceLoc
from einfuse.ir.errors import ParseError

OptionValue = bool | int | float | str

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_TOKEN = re.compile(
    r"\s*(?:(?P<str>\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<num>[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|[+-]inf(?![\w.\-]))"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)|(?P<punct>[=,;]))"
)
_WORDS: dict[str, OptionValue] = {"true": True, "false": False, "inf": math.inf}
CLAUSES = ("tile", "order", "parallel", "place", "option", "extra")


def _pairs(value: Any, what: str) -> tuple[tuple[str, Any], ...]:
    """A mapping or pairs, as a tuple sorted by key; duplicate keys are an error."""
    items = list(value.items()) if isinstance(value, Mapping) else [tuple(p) for p in value]
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"schedule {what}: {dup!r} given twice")
    for k, _ in items:
        if not isinstance(k, str) or not k:
            raise ValueError(f"schedule {what}: key {k!r} is not a non-empty string")
    return tuple(sorted(items))


@dataclass(frozen=True, slots=True)
class Schedule:
    """Tiles, loop order, parallel ranks, memory placement, pass options, unused extras.

    Fields accept mappings (or pairs) and are stored as tuples sorted by key;
    ``loop_order`` keeps its order (outermost first). ``parallel`` maps a rank to the
    mesh axis it is bound to, or None for plain parallelism (a grid dimension).
    """

    tiles: tuple[tuple[str, int], ...] = ()
    loop_order: tuple[str, ...] = ()
    parallel: tuple[tuple[str, str | None], ...] = ()
    placement: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, OptionValue], ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        tiles = tuple((r, _plain(t)) for r, t in _pairs(self.tiles, "tiles"))
        for r, t in tiles:
            if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
                raise ValueError(f"schedule tile {r}={t!r}: a tile is a positive int")
        order = tuple(self.loop_order)
        if len(set(order)) != len(order):
            raise ValueError(f"schedule loop order {', '.join(order)} repeats a rank")
        parallel = _pairs(
            self.parallel.items()
            if isinstance(self.parallel, Mapping)
            else [(p, None) if isinstance(p, str) else p for p in self.parallel],
            "parallel",
        )
        placement = _pairs(self.placement, "placement")
        options = tuple((k, _plain(v)) for k, v in _pairs(self.options, "options"))
        for k, v in options:
            if not isinstance(v, bool | int | float | str):
                raise ValueError(f"schedule option {k}={v!r}: use a bool, int, float or str")
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"schedule option {k} is NaN")
        extra = tuple((k, str(v)) for k, v in _pairs(self.extra, "extra"))
        for field, value in (
            ("tiles", tiles),
            ("loop_order", order),
            ("parallel", parallel),
            ("placement", placement),
            ("options", options),
            ("extra", extra),
        ):
            object.__setattr__(self, field, value)

    @classmethod
    def of(
        cls,
        *,
        tiles: Mapping[str, int] | None = None,
        loop_order: Iterable[str] = (),
        parallel: Mapping[str, str | None] | Iterable[str] | None = None,
        placement: Mapping[str, str] | None = None,
        options: Mapping[str, OptionValue] | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> Schedule:
        """Build from plain mappings (the typed spelling of the constructor)."""
        return cls(
            tuple((tiles or {}).items()),
            tuple(loop_order),
            parallel or (),  # type: ignore[arg-type]
            tuple((placement or {}).items()),
            tuple((options or {}).items()),
            tuple((extra or {}).items()),
        )

    # -- accessors ------------------------------------------------------------------
    def tile(self, rank: str, default: int | None = None) -> int | None:
        return dict(self.tiles).get(rank, default)

    def option(self, name: str, default: OptionValue | None = None) -> OptionValue | None:
        return dict(self.options).get(name, default)

    def place(self, tensor: str, default: str | None = None) -> str | None:
        return dict(self.placement).get(tensor, default)

    def axis(self, rank: str) -> str | None:
        """The mesh axis a parallel rank is bound to (None if unbound or not parallel)."""
        return dict(self.parallel).get(rank)

    def is_parallel(self, rank: str) -> bool:
        return rank in dict(self.parallel)

    def with_tiles(self, tiles: Mapping[str, int] | None = None, /, **more: int) -> Schedule:
        return replace(self, tiles=tuple({**dict(self.tiles), **(tiles or {}), **more}.items()))

    def with_options(
        self, options: Mapping[str, OptionValue] | None = None, /, **more: OptionValue
    ) -> Schedule:
        merged = {**dict(self.options), **(options or {}), **more}
        return replace(self, options=tuple(merged.items()))

    def with_loop_order(self, *ranks: str) -> Schedule:
        return replace(self, loop_order=ranks)

    def with_placement(
        self, placement: Mapping[str, str] | None = None, /, **more: str
    ) -> Schedule:
        merged = {**dict(self.placement), **(placement or {}), **more}
        return replace(self, placement=tuple(merged.items()))

    # -- JSON (export/import of tuned results) ----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "tiles": dict(self.tiles),
            "loop_order": list(self.loop_order),
            "parallel": dict(self.parallel),
            "placement": dict(self.placement),
            "options": dict(self.options),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        unknown = set(data) - {"tiles", "loop_order", "parallel", "placement", "options", "extra"}
        if unknown:
            raise ValueError(f"unknown schedule fields: {', '.join(sorted(unknown))}")
        return cls.of(**data)

    # -- text ---------------------------------------------------------------------------
    def clauses(self) -> list[str]:
        """The text form, one clause per entry of the returned list."""
        out = []
        if self.tiles:
            out.append("tile " + ", ".join(f"{_key(r)}={t}" for r, t in self.tiles))
        if self.loop_order:
            out.append("order " + ", ".join(_key(r) for r in self.loop_order))
        if self.parallel:
            items = (_key(r) if a is None else f"{_key(r)}={_key(a)}" for r, a in self.parallel)
            out.append("parallel " + ", ".join(items))
        if self.placement:
            out.append("place " + ", ".join(f"{_key(t)}={_key(m)}" for t, m in self.placement))
        if self.options:
            out.append("option " + ", ".join(f"{_key(k)}={_value(v)}" for k, v in self.options))
        if self.extra:
            out.append("extra " + ", ".join(f"{_key(k)}={json.dumps(v)}" for k, v in self.extra))
        return out

    def __str__(self) -> str:
        return "; ".join(self.clauses())

    @classmethod
    def parse(cls, text: str, file: str = "") -> Schedule:
        """Parse the text form; errors name the line and column with a caret."""
        return _Parser(file).parse(text)


def _plain(v: Any) -> Any:
    """NumPy (or other) scalars as Python bool/int/float, so equal values hash equal."""
    if isinstance(v, bool | str):
        return v
    if getattr(getattr(v, "dtype", None), "kind", "") == "b":  # numpy.bool_
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _key(name: str) -> str:
    return name if _NAME.match(name) and name not in _WORDS else json.dumps(name)


def _value(v: OptionValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
    return _key(v)


class _Parser:
    """Line-by-line tokenizer and clause reader for ``Schedule.parse``."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.fields: dict[str, dict[str, Any]] = {c: {} for c in CLAUSES if c != "order"}
        self.order: list[str] | None = None

    def parse(self, text: str) -> Schedule:
        for lineno, raw in enumerate(text.splitlines(), start=1):
            self.loc = SourceLoc(lineno, 1, raw.rstrip(), self.file)
            toks = self.tokenize(raw)
            clause: list[tuple[str, str, int]] = []
            for tok in [*toks, ("punct", ";", len(raw.rstrip()) + 1)]:
                if tok[1] == ";" and tok[0] == "punct":
                    if clause:
                        self.clause(clause, tok[2])
                    clause = []
                else:
                    clause.append(tok)
        f = self.fields
        return Schedule.of(
            tiles=f["tile"],
            loop_order=self.order or (),
            parallel=f["parallel"],
            placement=f["place"],
            options=f["option"],
            extra=f["extra"],
        )

    def error(self, msg: str, col: int) -> ParseError:
        return ParseError(
            msg, SourceLoc(self.loc.line, col, self.loc.text, self.file), where="schedule"
        )

    def tokenize(self, line: str) -> list[tuple[str, str, int]]:
        toks, pos = [], 0
        while pos < len(line):
            rest = line[pos:]
            if not rest.strip() or rest.lstrip().startswith("#"):
                break
            m = _TOKEN.match(line, pos)
            if m is None or m.lastgroup is None:
                col = pos + len(rest) - len(rest.lstrip()) + 1
                raise self.error(f"unexpected character {line[col - 1]!r}", col)
            toks.append((m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup) + 1))
            pos = m.end()
        return toks

    def clause(self, toks: list[tuple[str, str, int]], end: int) -> None:
        kind, word, col = toks[0]
        if kind != "name" or word not in CLAUSES:
            raise self.error(f"unknown clause {word!r}; known: {', '.join(CLAUSES)}", col)
        items = self.items(toks[1:], end, keyed=word != "order")
        if word == "order":
            if self.order is not None:
                raise self.error("loop order given twice", col)
            self.order = []
            for k, _, kcol in items:
                if k in self.order:
                    raise self.error(f"rank {k!r} appears twice in the loop order", kcol)
                self.order.append(k)
            return
        table = self.fields[word]
        for key, value, kcol in items:
            if key in table:
                raise self.error(f"{word} {key!r} given twice", kcol)
            table[key] = self.convert(word, key, value, kcol)

    def items(
        self, toks: list[tuple[str, str, int]], end: int, keyed: bool
    ) -> list[tuple[str, tuple[str, str, int] | None, int]]:
        """``key[=value]`` items separated by commas."""
        out, i = [], 0
        while True:
            if i >= len(toks) or toks[i][0] not in ("name", "str"):
                col = toks[i][2] if i < len(toks) else end
                raise self.error("expected a name", col)
            key = json.loads(toks[i][1]) if toks[i][0] == "str" else toks[i][1]
            kcol, value = toks[i][2], None
            i += 1
            if keyed and i < len(toks) and toks[i][1] == "=":
                if i + 1 >= len(toks) or toks[i + 1][0] == "punct":
                    raise self.error("expected a value after '='", toks[i][2] + 1)
                value, i = toks[i + 1], i + 2
            out.append((key, value, kcol))
            if i >= len(toks):
                return out
            if toks[i][1] != ",":
                raise self.error(f"expected ',' or ';', found {toks[i][1]!r}", toks[i][2])
            i += 1

    def convert(self, clause: str, key: str, tok: tuple[str, str, int] | None, col: int) -> Any:
        if tok is None:
            if clause == "parallel":
                return None
            raise self.error(f"{clause} {key!r} needs a value ({key}=...)", col)
        kind, text, vcol = tok
        if clause == "tile":
            if kind != "num" or not re.fullmatch(r"\d+", text) or int(text) <= 0:
                raise self.error(f"tile {key}={text}: a tile is a positive int", vcol)
            return int(text)
        if clause == "option":
            if kind == "num":
                if "inf" in text:
                    return -math.inf if text.startswith("-") else math.inf
                return float(text) if any(c in text for c in ".eE") else int(text)
            if kind == "name":
                return _WORDS.get(text, text)
        if kind == "num":
            raise self.error(f"{clause} {key}: expected a name or a quoted string", vcol)
        return json.loads(text) if kind == "str" else text
