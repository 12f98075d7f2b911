"""The verifier: each problem raises VerifyError naming the Einsum and, from text, the line."""

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
    Partition,
    Size,
    SpecError,
    TensorDecl,
    Var,
    VerifyError,
    parse,
    verify,
)
from tests.strategies import cascades, text_cascades

X = Access("X", (Var("i"),))


def verify_error(text: str) -> VerifyError:
    """Parse ``text`` (as spec.ein) and return the error its verification raises."""
    c = parse(text, file="spec.ein")
    with pytest.raises(VerifyError) as info:
        verify(c)
    return info.value


def assert_names(err: VerifyError, einsum: str, line: int) -> None:
    assert err.where == f"einsum {einsum}"
    assert err.loc is not None and err.loc.line == line
    assert str(err).startswith(f"spec.ein:{line}:1: einsum {einsum}: ")


def built_error(*einsums: Einsum, inputs: tuple[TensorDecl, ...] = ()) -> VerifyError:
    inputs = inputs or (TensorDecl("X", ("i",)),)
    c = Cascade(inputs, einsums, (einsums[-1].output,))
    with pytest.raises(VerifyError) as info:
        verify(c)
    return info.value


@settings(max_examples=60)
@given(cascades())
def test_every_drawn_cascade_verifies(c: Cascade) -> None:
    assert verify(c) is c


@settings(max_examples=30)
@given(text_cascades())
def test_every_drawn_text_cascade_verifies(c: Cascade) -> None:
    assert verify(c) is c


def test_verify_errors_are_spec_errors() -> None:
    assert issubclass(VerifyError, SpecError)


def test_undefined_tensor() -> None:
    err = verify_error("inputs X[i]\nT[i] = X[i] * Y[i]\noutputs T")
    assert_names(err, "T", 2)
    assert "reads undefined tensor Y: it is neither an input nor written" in err.message


def test_read_of_a_later_tensor_is_a_cycle() -> None:
    err = verify_error("inputs X[i]\nT[i] = U[i]\nU[i] = T[i] + X[i]\noutputs U")
    assert_names(err, "T", 2)
    assert "reads undefined tensor U: it is written later (a cycle)" in err.message


def test_rank_used_with_two_sizes() -> None:
    err = verify_error("ranks i=4, j=5\ninputs X[i]\nT[j] = X[j]\noutputs T")
    assert_names(err, "T", 3)
    assert "rank j (size 5) indexes rank i of X (size 4): a rank used with two sizes" in (
        err.message
    )


def test_rank_used_with_two_symbolic_sizes() -> None:
    err = verify_error("inputs X[i]\nT[j] = X[j]\noutputs T")
    assert "rank j (size J) indexes rank i of X (size I)" in err.message


def test_reads_across_ranks_of_equal_size_are_fine() -> None:
    c = parse("ranks i=4, j=4\ninputs X[i, j]\nT[i, j] = X[j, i]\noutputs T")
    assert verify(c) is c


def test_tensor_written_twice() -> None:
    err = verify_error("inputs X[i]\nT[i] = X[i]\nT[i] = X[i] * 2\noutputs T")
    assert_names(err, "T", 3)
    assert "tensor T written twice (already written)" in err.message


def test_input_written_by_an_einsum() -> None:
    err = verify_error("inputs X[i]\nX[i] = 2\noutputs X")
    assert_names(err, "X", 2)
    assert "tensor X written twice (an input)" in err.message


def test_input_declared_twice() -> None:
    with pytest.raises(VerifyError, match="input X declared twice"):
        verify(parse("inputs X[i], X[j]\noutputs X"))


def test_max_reduction_over_no_rank() -> None:
    err = built_error(Einsum("T", (Var("i"),), X, reduce="max"))
    assert err.where == "einsum T"
    assert "max reduction over no rank" in err.message


def test_unknown_reduction() -> None:
    err = built_error(Einsum("T", (), X, reduce="mean"))
    assert "unknown reduction 'mean'; known: sum, max, min, prod" in err.message


def test_unknown_operator_built_programmatically() -> None:
    err = built_error(Einsum("T", (Var("i"),), Op("softplus", (X,))))
    assert err.where == "einsum T"
    assert "unknown operator 'softplus'" in err.message


def test_operator_arity_built_programmatically() -> None:
    err = built_error(Einsum("T", (Var("i"),), Op("exp", (X, X))))
    assert "exp takes 1 argument(s), got 2" in err.message


def test_output_never_written() -> None:
    with pytest.raises(VerifyError) as info:
        verify(parse("inputs X[i]\nT[i] = X[i]\noutputs T, Z"))
    assert info.value.where == "outputs"
    assert "output Z is never written" in info.value.message


def test_access_with_the_wrong_number_of_indices() -> None:
    err = verify_error("inputs X[i, j]\nT[i] = X[i]\noutputs T")
    assert_names(err, "T", 2)
    assert "X[i] has 1 indices but X has 2 ranks" in err.message


def test_non_affine_index() -> None:
    err = verify_error("inputs X[i]\nT[i] = X[exp(i)]\noutputs T")
    assert_names(err, "T", 2)
    assert "index exp(i) of X is not affine" in err.message


def test_tensor_read_inside_an_index_is_not_affine() -> None:
    err = verify_error("inputs X[i], Y[i]\nT[i] = X[Y[i]]\noutputs T")
    assert "index Y[i] of X is not affine" in err.message


def test_left_index_must_be_a_plain_rank() -> None:
    err = verify_error("inputs X[i]\nT[i+2] = X[i]\noutputs T")
    assert_names(err, "T", 2)
    assert "left index i+2 must be a plain rank" in err.message


def test_rank_twice_on_the_left() -> None:
    err = verify_error("inputs X[i]\nT[i, i] = X[i]\noutputs T")
    assert "rank i appears twice on the left" in err.message


def test_size_of_an_unknown_rank() -> None:
    err = built_error(Einsum("T", (Var("i"),), Op("mul", (X, Size("z")))))
    assert "size Z refers to no rank z" in err.message


def test_recurrence_without_initial_value() -> None:
    err = verify_error("inputs X[i]\nR[i+1] = R[i] + X[i]\noutputs R")
    assert_names(err, "R", 2)
    assert "recurrence has no initial value: add R[0] = ..." in err.message


def test_recurrence_that_also_reduces() -> None:
    err = verify_error("inputs X[i, j]\nR[0] = 0\nR[i+1] = R[i] + X[i, j]\noutputs R")
    assert_names(err, "R", 3)
    assert "a recurrence may not also reduce (over j)" in err.message


def test_recurrence_reading_itself_other_than_one_step_back() -> None:
    err = verify_error("inputs X[i]\nR[0] = 0\nR[i+1] = R[i+1] + X[i]\noutputs R")
    assert_names(err, "R", 3)
    assert "reads itself one step back, as R[i]; found R[i+1]" in err.message


def test_self_read_without_an_iterative_rank() -> None:
    err = verify_error("inputs X[i]\nR[i] = R[i] + X[i]\noutputs R")
    assert_names(err, "R", 2)
    assert "reads its own output but no left index is r+1" in err.message


def test_initial_value_depending_on_the_iterative_rank() -> None:
    err = verify_error("inputs X[i]\nR[0] = i\nR[i+1] = R[i] + X[i]\noutputs R")
    assert "initial value may not depend on the iterative rank i" in err.message


def test_initial_value_reading_an_undefined_tensor() -> None:
    err = verify_error("inputs X[i]\nR[0] = Y[]\nR[i+1] = R[i] + X[i]\noutputs R")
    assert_names(err, "R", 3)
    assert "initial value reads undefined tensor Y" in err.message


def test_initial_value_over_a_rank_not_on_the_left() -> None:
    err = verify_error("inputs X[i], Y[j]\nR[0] = Y[j]\nR[i+1] = R[i] + X[i]\noutputs R")
    assert "initial value uses rank(s) j that are not on the left" in err.message


def test_initial_value_reading_another_tensor_is_fine() -> None:
    c = parse("inputs X[i, p], Y[p]\nR[0, p] = Y[p]\nR[i+1, p] = R[i, p] + X[i, p]\noutputs R")
    assert verify(c) is c


def test_initial_value_on_a_non_recurrence_built_programmatically() -> None:
    err = built_error(Einsum("T", (Var("i"),), X, init=Const(0)))
    assert "has an initial value but is not a recurrence" in err.message


def test_nan_constant_is_rejected() -> None:
    err = built_error(Einsum("T", (Var("i"),), Op("add", (X, Const(math.nan)))))
    assert "constant nan is not a number" in err.message


def test_boolean_constant_is_rejected() -> None:
    err = built_error(Einsum("T", (Var("i"),), Op("mul", (X, Const(True)))))
    assert "constant True is not a number" in err.message


@pytest.mark.parametrize("name", ["inputs", "inf", "T-1"])
def test_tensor_names_that_cannot_be_printed(name: str) -> None:
    with pytest.raises(VerifyError, match=f"tensor name '{name}' cannot be written"):
        verify(Cascade((TensorDecl(name, ("i",)),), (), (name,)))


@pytest.mark.parametrize("rank", ["inf", "M", "m-1"])
def test_rank_names_that_cannot_be_printed(rank: str) -> None:
    with pytest.raises(VerifyError, match=f"rank name '{rank}' cannot be written"):
        verify(Cascade((TensorDecl("X", (rank,)),), (), ("X",)))


def test_partition_tile_must_match_the_inner_size() -> None:
    c = Cascade(
        (TensorDecl("X", ("m",)),),
        (Einsum("T", (Var("m1"), Var("m0")), Access("X", (Op("add", (Var("m1"), Var("m0"))),))),),
        ("T",),
        sizes=(("m0", 128), ("m1", 4)),
        partitions=(Partition("m", "m1", "m0", 256),),
    )
    with pytest.raises(VerifyError, match="m0 has size 128, not the tile 256"):
        verify(c)


def test_non_positive_size() -> None:
    with pytest.raises(VerifyError, match="rank i has size 0; sizes must be positive"):
        verify(parse("ranks i=0\ninputs X[i]\noutputs X"))


def test_an_unknown_input_dtype_is_refused_at_its_declaration() -> None:
    with pytest.raises(VerifyError, match="input Q: unknown dtype 'bfloat17'") as info:
        verify(parse("inputs Q[e, p]: bfloat17\nY[p] = Q[e, p]\noutputs Y"))
    assert info.value.loc is not None and info.value.loc.line == 1
