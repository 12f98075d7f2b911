"""Schedule: frozen, hashable, prints and parses, with convenience accessors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.ir import ParseError
from einfuse.ir.schedule import Schedule

EXAMPLE = (
    "tile m=512, p=128; order p, m1, m0; parallel p, h=x; place Q=vmem, K=hbm; "
    "option fuse=true, chunks=4"
)

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
odd_names = st.one_of(names, st.text(min_size=1, max_size=8))
option_values = st.one_of(
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["true", "false", "inf", "-inf", "4", "0.5", "fast-path", ""]),
)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    return Schedule.of(
        tiles=draw(st.dictionaries(names, st.integers(1, 1 << 20), max_size=4)),
        loop_order=draw(st.lists(names, unique=True, max_size=5)),
        parallel=draw(st.dictionaries(names, st.one_of(st.none(), names), max_size=3)),
        placement=draw(st.dictionaries(odd_names, odd_names, max_size=3)),
        options=draw(st.dictionaries(odd_names, option_values, max_size=4)),
        extra=draw(st.dictionaries(odd_names, st.text(max_size=20), max_size=3)),
    )


@settings(max_examples=200)
@given(schedules())
def test_text_round_trips(s: Schedule) -> None:
    text = str(s)
    assert Schedule.parse(text) == s
    assert str(Schedule.parse(text)) == text


@settings(max_examples=50)
@given(schedules())
def test_multi_line_text_round_trips(s: Schedule) -> None:
    assert Schedule.parse("\n".join(s.clauses())) == s


@settings(max_examples=50)
@given(schedules())
def test_json_dict_round_trips(s: Schedule) -> None:
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_example_parses_into_fields() -> None:
    s = Schedule.parse(EXAMPLE)
    assert dict(s.tiles) == {"m": 512, "p": 128}
    assert s.loop_order == ("p", "m1", "m0")
    assert dict(s.parallel) == {"p": None, "h": "x"}
    assert dict(s.placement) == {"Q": "vmem", "K": "hbm"}
    assert dict(s.options) == {"fuse": True, "chunks": 4}
    assert s.extra == ()


def test_order_of_mapping_entries_does_not_matter() -> None:
    a = Schedule.parse("tile m=512, p=128; place Q=vmem, K=hbm")
    b = Schedule.parse("place K=hbm, Q=vmem\ntile p=128, m=512")
    assert a == b and hash(a) == hash(b)
    assert str(a) == str(b)


def test_loop_order_is_ordered() -> None:
    assert Schedule.parse("order m, p") != Schedule.parse("order p, m")


def test_schedules_are_frozen_and_usable_as_keys() -> None:
    s = Schedule.parse(EXAMPLE)
    with pytest.raises(AttributeError):
        s.tiles = ()  # type: ignore[misc]
    assert {s: 1}[Schedule.parse(EXAMPLE)] == 1


def test_empty_schedule_prints_empty() -> None:
    assert str(Schedule()) == ""
    assert Schedule.parse("") == Schedule()
    assert Schedule.parse("  # nothing chosen yet\n;\n") == Schedule()


def test_option_value_types() -> None:
    s = Schedule.parse(
        'option a=true, b=false, c=4, d=-2, e=0.5, f=1e-05, g=inf, h=-inf, i=fast, j="4"'
    )
    expected = {
        "a": True,
        "b": False,
        "c": 4,
        "d": -2,
        "e": 0.5,
        "f": 1e-05,
        "g": math.inf,
        "h": -math.inf,
        "i": "fast",
        "j": "4",
    }
    assert dict(s.options) == expected
    assert [type(v) for _, v in s.options] == [type(expected[k]) for k, _ in s.options]


def test_strings_that_look_like_other_values_are_quoted() -> None:
    s = Schedule.of(options={"a": "true", "b": "4", "c": "two words", "d": 'say "hi"\n'})
    assert str(s) == 'option a="true", b="4", c="two words", d="say \\"hi\\"\\n"'
    assert Schedule.parse(str(s)) == s


def test_extra_keeps_text_verbatim() -> None:
    s = Schedule.of(extra={"rank-order.A": "[M, K]", "partitioning.Z.(M, K)": "[flatten()]"})
    text = str(s)
    assert text == 'extra "partitioning.Z.(M, K)"="[flatten()]", rank-order.A="[M, K]"'
    assert dict(Schedule.parse(text).extra) == dict(s.extra)


def test_comments_are_ignored_outside_strings() -> None:
    s = Schedule.parse('tile m=4  # rows\nextra note="a # b"')
    assert dict(s.tiles) == {"m": 4}
    assert s.extra == (("note", "a # b"),)


def test_accessors_with_defaults() -> None:
    s = Schedule.parse(EXAMPLE)
    assert s.tile("m") == 512
    assert s.tile("e") is None and s.tile("e", 64) == 64
    assert s.option("fuse") is True and s.option("keep_tokens", 1.0) == 1.0
    assert s.place("Q") == "vmem" and s.place("V", "hbm") == "hbm"
    assert s.axis("h") == "x" and s.axis("p") is None
    assert s.is_parallel("p") and not s.is_parallel("m")


def test_with_tiles_and_options_return_new_schedules() -> None:
    s = Schedule.parse(EXAMPLE)
    t = s.with_tiles(m=64, e=32).with_options({"keep-ratio": 0.5}, chunks=8)
    assert (t.tile("m"), t.tile("e"), t.tile("p")) == (64, 32, 128)
    assert (t.option("chunks"), t.option("keep-ratio"), t.option("fuse")) == (8, 0.5, True)
    assert s.tile("m") == 512 and s.option("chunks") == 4
    assert s.with_loop_order("m0", "p").loop_order == ("m0", "p")
    assert s.with_placement(V="smem").place("V") == "smem"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tiles": {"m": 0}}, "a tile is a positive int"),
        ({"tiles": {"m": True}}, "a tile is a positive int"),
        ({"tiles": {"m": 2.5}}, "a tile is a positive int"),
        ({"loop_order": ("m", "m")}, "repeats a rank"),
        ({"options": {"x": math.nan}}, "is NaN"),
        ({"options": {"x": [1]}}, "use a bool, int, float or str"),
    ],
)
def test_invalid_values_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule.of(**kwargs)


def test_duplicate_pairs_are_rejected() -> None:
    with pytest.raises(ValueError, match="'m' given twice"):
        Schedule(tiles=(("m", 4), ("m", 8)))


@pytest.mark.parametrize(
    "text, col, message",
    [
        ("tile m=0", 8, "tile m=0: a tile is a positive int"),
        ("tile m=x", 8, "tile m=x: a tile is a positive int"),
        ("bogus x", 1, "unknown clause 'bogus'; known: tile, order, parallel, place, option"),
        ("order a, b, a", 13, "rank 'a' appears twice in the loop order"),
        ("tile m=4; tile m=8", 16, "tile 'm' given twice"),
        ("option x=", 10, "expected a value after '='"),
        ("place Q", 7, "place 'Q' needs a value (Q=...)"),
        ("tile m=4 p=5", 10, "expected ',' or ';', found 'p'"),
        ("option a=$", 10, "unexpected character '$'"),
        ("parallel h=4", 12, "parallel h: expected a name or a quoted string"),
        ("tile", 5, "expected a name"),
        ('extra a="unterminated', 9, "unexpected character '\"'"),
    ],
)
def test_parse_errors_point_at_the_spot(text: str, col: int, message: str) -> None:
    with pytest.raises(ParseError) as info:
        Schedule.parse("place X=hbm\n" + text, file="s.sched")
    err = info.value
    assert err.loc is not None and (err.loc.line, err.loc.col) == (2, col)
    assert message in err.message
    lines = str(err).splitlines()
    assert lines[0].startswith(f"s.sched:2:{col}: schedule: ")
    assert lines[1:] == [f"    {text}", "    " + " " * (col - 1) + "^"]


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown schedule fields: tile"):
        Schedule.from_dict({"tile": {"m": 4}})
