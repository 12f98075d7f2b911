"""The text form: printing and parsing round-trip exactly; parse errors point at the spot."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings

from einfuse.ir import (
    Access,
    Cascade,
    Const,
    Einsum,
    Op,
    ParseError,
    Size,
    TensorDecl,
    Var,
    format_expr,
    parse,
)
from einfuse.ir.expr import INFIX, OPS, arity
from tests.cascades import ATTENTION_3PASS
from tests.strategies import cascades, exprs, text_cascades

X = Access("X", (Var("i"),))
Y = Access("Y", (Var("i"),))
Z = Access("Z", (Var("i"),))


def statement(expr: Op | Access | Const | Var | Size, reduce: str = "sum") -> Cascade:
    """A one-Einsum cascade ``T[i] = expr`` over inputs X, Y, Z (and A[i, j], B[i], S[])."""
    inputs = tuple(TensorDecl(n, ("i",)) for n in "XYZ")
    inputs += (TensorDecl("A", ("i", "j")), TensorDecl("B", ("i",)), TensorDecl("S", ()))
    return Cascade(inputs, (Einsum("T", (Var("i"),), expr, reduce),), ("T",))


def assert_round_trip(c: Cascade) -> None:
    text = str(c)
    assert parse(text) == c, text
    assert str(parse(text)) == text


# ------------------------------------------------------------------ round trips
@settings(max_examples=60)
@given(cascades())
def test_drawn_cascades_round_trip(c: Cascade) -> None:
    assert_round_trip(c)


@settings(max_examples=60)
@given(text_cascades())
def test_cascades_with_symbolic_sizes_dtypes_and_wild_constants_round_trip(c: Cascade) -> None:
    assert_round_trip(c)


@settings(max_examples=150)
@given(exprs(ranks=("i", "j", "k", "m0")))
def test_any_expression_round_trips(e: Op) -> None:
    assert_round_trip(statement(e))


@pytest.mark.parametrize(
    "value, text",
    [
        (-3, "-3"),
        (1e-05, "1e-05"),
        (-1e-05, "-1e-05"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (2.0, "2.0"),
        (1e300, "1e+300"),
        (5e-324, "5e-324"),
        (-0.0, "-0.0"),
    ],
)
def test_odd_constants_print_exactly_and_round_trip(value: float, text: str) -> None:
    assert format_expr(Const(value)) == text
    c = statement(Op("add", (X, Const(value))))
    assert_round_trip(c)
    back = parse(str(c)).einsums[0].expr
    assert isinstance(back, Op) and type(back.args[1].value) is type(value)


@pytest.mark.parametrize(
    "expr, text",
    [
        (Op("neg", (Op("neg", (X,)),)), "-(-X[i])"),
        (Op("neg", (Const(2),)), "-(2)"),
        (Op("neg", (Const(-math.inf),)), "-(-inf)"),
        (Op("neg", (Op("mul", (X, Y)),)), "-(X[i] * Y[i])"),
        (Op("mul", (Op("neg", (X,)), Y)), "-X[i] * Y[i]"),
        (Op("sub", (X, Op("neg", (Y,)))), "X[i] - -Y[i]"),
        (Op("sub", (X, Const(-2))), "X[i] - -2"),
        (Op("sub", (X, Op("sub", (Y, Z)))), "X[i] - (Y[i] - Z[i])"),
        (Op("sub", (Op("sub", (X, Y)), Z)), "X[i] - Y[i] - Z[i]"),
        (Op("div", (X, Op("mul", (Y, Z)))), "X[i] / (Y[i] * Z[i])"),
        (Op("mul", (Op("add", (X, Y)), Z)), "(X[i] + Y[i]) * Z[i]"),
        (Op("add", (Op("lt", (X, Y)), Z)), "(X[i] < Y[i]) + Z[i]"),
        (Op("lt", (Op("lt", (X, Y)), Z)), "(X[i] < Y[i]) < Z[i]"),
        (Op("eq", (X, Op("ne", (Y, Z)))), "X[i] == (Y[i] != Z[i])"),
        (Op("where", (Op("le", (Var("i"), Var("j"))), X, Const(-math.inf))), None),
        (Op("pow", (Op("neg", (Size("i"),)), Const(0.5))), "pow(-I, 0.5)"),
        (Access("A", (Var("i"), Op("add", (Op("mul", (Var("j"), Size("k"))), Var("k"))))), None),
        (Access("B", (Op("sub", (Var("i"), Const(-1))),)), "B[i--1]"),
    ],
)
def test_precedence_and_negation_print_minimally_and_round_trip(expr: Op, text: str | None) -> None:
    if text is not None:
        assert format_expr(expr) == text
    assert_round_trip(statement(expr))


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_operator_round_trips(op: str) -> None:
    args = (X, Y, Z)[: arity(op)]
    expr = Op(op, args)
    printed = format_expr(expr)
    if op in INFIX:
        assert f" {INFIX[op]} " in printed
    elif op != "neg":
        assert printed.startswith(f"{op}(")
    assert_round_trip(statement(expr))


def test_sum_of_a_max_of_ranks_is_not_read_as_a_max_reduction() -> None:
    # ``T[i] = max(i, j) - X[i]`` would parse as ``max`` over (i, j) of ``-X[i]``.
    c = statement(Op("sub", (Op("max", (Var("i"), Var("j"))), X)))
    assert "= (max(i, j) - X[i])" in str(c)
    assert_round_trip(c)


def test_max_of_tensors_prints_without_parentheses() -> None:
    c = statement(Op("sub", (Op("max", (X, Y)), Z)))
    assert "T[i] = max(X[i], Y[i]) - Z[i]" in str(c)
    assert_round_trip(c)


def test_reductions_print_their_ranks() -> None:
    c = statement(Access("A", (Var("i"), Var("j"))), reduce="max")
    assert "T[i] = max(j) A[i, j]" in str(c)
    assert_round_trip(c)


def test_design_attention_example_parses_unchanged() -> None:
    c = parse(ATTENTION_3PASS)
    assert [e.output for e in c.einsums] == ["QK", "GM", "SN", "SD", "A", "AV"]
    by_name = {e.output: e for e in c.einsums}
    assert by_name["QK"].reduced_ranks == ("e",)
    assert (by_name["GM"].reduce, by_name["GM"].reduced_ranks) == ("max", ("m",))
    assert by_name["SD"].reduced_ranks == ("m",)
    assert by_name["AV"].reduced_ranks == ("m",)
    assert c.outputs == ("AV",)
    assert_round_trip(c)


def test_recurrence_with_partitioned_ranks_round_trips() -> None:
    text = (
        "ranks e=64, m0=256, m1=ceiling(M/256)\n"
        "partition m -> m1, m0 by 256\n"
        "inputs Q[e, p], K[e, m]: bfloat16\n"
        "QK[m1, m0, p] = Q[e, p] * K[e, m1*M0+m0]\n"
        "LM[m1, p] = max(m0) QK[m1, m0, p]\n"
        "RM[0, p] = -inf\n"
        "RM[m1+1, p] = max(RM[m1, p], LM[m1, p])\n"
        "GM[p] = RM[M1, p]\n"
        "outputs GM\n"
    )
    c = parse(text)
    assert str(c) == text
    rm = c.writer("RM")
    assert rm is not None and rm.init == Const(-math.inf) and rm.iterative_rank == "m1"


# ------------------------------------------------------------------ parse errors
def parse_error(text: str) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse(text, file="spec.ein")
    return info.value


def assert_points_at(err: ParseError, line: int, col: int, source: str) -> None:
    """The error names ``spec.ein:line:col`` and draws a caret under that column."""
    assert err.loc is not None
    assert (err.loc.line, err.loc.col) == (line, col)
    rendered = str(err).splitlines()
    assert rendered[0].startswith(f"spec.ein:{line}:{col}: ")
    assert rendered[1] == f"    {source}"
    assert rendered[2] == "    " + " " * (col - 1) + "^"


def test_unknown_operator_lists_the_known_ones() -> None:
    err = parse_error("inputs X[i]\nT[i] = softplus(X[i])\noutputs T")
    assert_points_at(err, 2, 8, "T[i] = softplus(X[i])")
    assert "unknown operator 'softplus'" in err.message
    for op in OPS - set(INFIX):
        assert op in err.message


def test_wrong_arity_names_the_operator_and_counts() -> None:
    err = parse_error("inputs X[i]\nT[i] = exp(X[i], X[i])\noutputs T")
    assert_points_at(err, 2, 8, "T[i] = exp(X[i], X[i])")
    assert "exp takes 1 argument(s), got 2" in err.message


def test_where_with_two_arguments_is_an_arity_error() -> None:
    err = parse_error("inputs X[i]\nT[i] = where(i < 2, X[i])\noutputs T")
    assert_points_at(err, 2, 8, "T[i] = where(i < 2, X[i])")
    assert "where takes 3 argument(s), got 2" in err.message


def test_bad_character_is_pointed_at() -> None:
    err = parse_error("inputs X[i]\nT[i] = X[i] $ 2\noutputs T")
    assert_points_at(err, 2, 13, "T[i] = X[i] $ 2")
    assert "unexpected character '$'" in err.message


def test_missing_closing_bracket() -> None:
    err = parse_error("inputs X[i]\nT[i = X[i]\noutputs T")
    assert_points_at(err, 2, 5, "T[i = X[i]")
    assert "expected ']', found '='" in err.message


def test_unterminated_expression_points_past_the_end() -> None:
    err = parse_error("inputs X[i]\nT[i] = X[i] +\noutputs T")
    assert_points_at(err, 2, 14, "T[i] = X[i] +")
    assert "expected an expression, found end of line" in err.message


def test_unclosed_call() -> None:
    err = parse_error("inputs X[i]\nT[i] = exp(X[i]\noutputs T")
    assert_points_at(err, 2, 16, "T[i] = exp(X[i]")
    assert "expected ')', found end of line" in err.message


def test_upper_case_rank_in_a_declaration() -> None:
    err = parse_error("inputs X[i], Y[J]\noutputs X")
    assert_points_at(err, 1, 16, "inputs X[i], Y[J]")
    assert "rank name 'J' must be lower case" in err.message


def test_upper_case_rank_in_the_ranks_line() -> None:
    err = parse_error("ranks m=4, N=8\noutputs X")
    assert_points_at(err, 1, 12, "ranks m=4, N=8")
    assert "rank name 'N' must be lower case" in err.message


def test_reduction_list_must_match_the_reduced_ranks() -> None:
    err = parse_error("inputs X[i, j, k]\nT[i] = max(j) X[i, j, k]\noutputs T")
    assert_points_at(err, 2, 1, "T[i] = max(j) X[i, j, k]")
    assert "max(j) does not match the ranks reduced away (j, k)" in err.message


def test_initial_value_without_a_recurrence() -> None:
    err = parse_error("inputs X[i]\nT[0] = 0\nT[i] = X[i]\noutputs T")
    assert_points_at(err, 2, 1, "T[0] = 0")
    assert "T has an initial value but is not a recurrence" in err.message


def test_initial_value_with_nothing_after_it() -> None:
    err = parse_error("inputs X[i]\nT[0] = 0\noutputs X")
    assert_points_at(err, 2, 1, "T[0] = 0")
    assert "must precede the recurrence it starts" in err.message


def test_initial_value_given_twice() -> None:
    err = parse_error("T[0] = 0\nT[0] = 1\nT[i+1] = T[i]\noutputs T")
    assert_points_at(err, 2, 1, "T[0] = 1")
    assert "initial value of T given twice" in err.message


def test_bad_size_expression_points_at_the_size() -> None:
    err = parse_error("ranks e=4, m=ceiling(M/\noutputs X")
    assert_points_at(err, 1, 14, "ranks e=4, m=ceiling(M/")
    assert "bad size expression 'ceiling(M/'" in err.message


def test_comparisons_do_not_chain() -> None:
    err = parse_error("T[] = 1 < 2 < 3\noutputs T")
    assert_points_at(err, 1, 13, "T[] = 1 < 2 < 3")
    assert "comparisons do not chain" in err.message


def test_bare_upper_case_name_that_is_no_size() -> None:
    err = parse_error("inputs X[i]\nT[i] = X[i] * Foo\noutputs T")
    assert_points_at(err, 2, 15, "T[i] = X[i] * Foo")
    assert "'Foo' is neither a rank" in err.message


def test_comments_and_blank_lines_keep_line_numbers() -> None:
    err = parse_error("# attention\n\ninputs X[i]  # queries\nT[i] = X[i] +\noutputs T")
    assert_points_at(err, 4, 14, "T[i] = X[i] +")


def test_missing_outputs_line() -> None:
    err = parse_error("inputs X[i]\nT[i] = X[i]\n")
    assert err.loc is None
    assert "no 'outputs' line" in str(err)
