"""Loading specs: .ein text and TeAAL-style YAML, the Schedule of its mapping, and errors."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from einfuse.backends.reference import interpret
from einfuse.ir import ParseError, SpecError, VerifyError, bind_sizes, parse
from einfuse.ir.schedule import Schedule
from einfuse.ir.yaml_spec import load, load_with_schedule
from tests.strategies import random_inputs

SPECS = Path(__file__).resolve().parent.parent / "examples" / "specs"

ATTENTION_YAML = """\
einsum:
  declaration:
    Q: [E, P]
    K: [E, M]
    V: [F, M]
    QK: [M, P]
    GM: [P]
    SN: [M, P]
    SD: [P]
    A: [M, P]
    AV: [F, P]
  shape: {E: 4, F: 3, M: 6, P: 5}
  expressions:
    - QK[m, p] = Q[e, p] * K[e, m]
    - GM[p] = max(m) QK[m, p]
    - SN[m, p] = exp(QK[m, p] - GM[p])
    - SD[p] = sum(M).SN[m, p]
    - A[m, p] = SN[m, p] / SD[p]
    - AV[f, p] = A[m, p] * V[f, m]
mapping:
  rank-order:
    K: [M, E]
  partitioning:
    QK:
      M: [uniform_shape(256)]
    AV:
      M: [uniform_shape(256)]
      P: [uniform_shape(64), uniform_shape(16)]
  loop-order:
    QK: [M1, P, M0, E]
    AV: [P, M1, M0, F]
  spacetime:
    AV:
      space: [P, F.coord]
      time: [M1, M0]
"""

ATTENTION_TEXT = """\
ranks e=4, f=3, m=6, p=5
inputs Q[e, p], K[e, m], V[f, m]
QK[m, p] = Q[e, p] * K[e, m]
GM[p] = max(m) QK[m, p]
SN[m, p] = exp(QK[m, p] - GM[p])
SD[p] = SN[m, p]
A[m, p] = SN[m, p] / SD[p]
AV[f, p] = A[m, p] * V[f, m]
outputs AV
"""

MATMUL_YAML = """\
einsum:
  declaration:
    A: [K, M]
    B: [K, N]
    Z: [M, N]
  expressions:
    - Z[m,n] = A[k,m] * B[k,n]
mapping:
  rank-order:
    A: [K, M]
  partitioning:
    Z:
      K: [uniform_shape(128)]
      (M, K0): [flatten()]
      MK0: [uniform_occupancy(A.16384)]
  loop-order:
    Z: [K1, MK01, N, MK00]
  spacetime:
    Z:
      space: [MK00.pos]
      time: [K1, MK01, N]
architecture:
  Accelerator:
  - name: System
    attributes: {clock_frequency: 500000000}
format:
  A:
    flattened:
      rank-order: [K1, MK01, MK00]
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(tmp_path: Path, text: str, kind: type[SpecError] = ParseError) -> SpecError:
    p = write(tmp_path, text)
    with pytest.raises(kind) as info:
        load(p)
    return info.value


def assert_at(err: SpecError, path: Path, line: int, col: int) -> None:
    assert err.loc is not None
    assert (err.loc.file, err.loc.line, err.loc.col) == (str(path), line, col)
    rendered = str(err).splitlines()
    assert rendered[0].startswith(f"{path}:{line}:{col}: ")
    assert rendered[1] == "    " + path.read_text().splitlines()[line - 1]
    assert rendered[2] == "    " + " " * (col - 1) + "^"


# ------------------------------------------------------------------ cascades
def test_teaal_attention_yaml_loads_as_the_text_cascade(tmp_path: Path) -> None:
    c = load(write(tmp_path, ATTENTION_YAML))
    assert c == parse(ATTENTION_TEXT)
    assert c.writer("SD") is not None and c.writer("SD").reduced_ranks == ("m",)


def test_yaml_einsums_point_at_their_yaml_lines(tmp_path: Path) -> None:
    p = write(tmp_path, ATTENTION_YAML)
    c = load(p)
    assert [(e.loc.file, e.loc.line, e.loc.col) for e in c.einsums] == [
        (str(p), line, 7) for line in range(14, 20)
    ]


def test_teaal_matmul_computes_a_transposed_times_b(tmp_path: Path) -> None:
    c = load(write(tmp_path, MATMUL_YAML))
    assert [t.name for t in c.inputs] == ["A", "B"] and c.outputs == ("Z",)
    x = random_inputs(c, seed=3, bind={"k": 5, "m": 4, "n": 3})
    got = interpret(c, x)["Z"]
    np.testing.assert_allclose(got, x["A"].T @ x["B"], rtol=1e-12)


def test_teaal_declared_scalars_may_be_used_bare(tmp_path: Path) -> None:
    spec = """\
einsum:
  declaration: {A: [K, M], B: [K, N], C: [M, N], T1: [M, N], Z: [M, N], a: [], b: []}
  expressions:
    - T1[m, n] = sum(K).(A[k, m] * B[k, n])
    - Z[m, n] = a * T1[m, n] + b * C[m, n]
"""
    c = load(write(tmp_path, spec))
    assert str(c.writer("Z").expr) == "a[] * T1[m, n] + b[] * C[m, n]"
    x = random_inputs(c, seed=5, bind={"k": 4, "m": 3, "n": 2})
    want = x["a"] * (x["A"].T @ x["B"]) + x["b"] * x["C"]
    np.testing.assert_allclose(interpret(c, x)["Z"], want, rtol=1e-12)


def test_extensions_inputs_outputs_dtype_shape_and_partitions(tmp_path: Path) -> None:
    spec = """\
einsum:
  declaration: {K: [E, M], Q: [E, P], QK: [M1, M0, P], LM: [M1, P], RM: [M1, P], GM: [P]}
  shape: {E: 4, M: 10, M0: 4, M1: "ceiling(M/4)", P: 3}
  partitions: ["m -> m1, m0 by 4"]
  inputs: [Q, K]
  outputs: [GM, LM]
  dtype: {Q: bfloat16}
  expressions:
    - QK[m1, m0, p] = Q[e, p] * K[e, m1*M0+m0]
    - LM[m1, p] = max(m0) where(m1*M0+m0 < M, QK[m1, m0, p], -inf)
    - RM[0, p] = -inf
    - RM[m1+1, p] = max(RM[m1, p], LM[m1, p])
    - GM[p] = RM[M1, p]
"""
    c = load(write(tmp_path, spec))
    assert [(t.name, t.dtype) for t in c.inputs] == [("Q", "bfloat16"), ("K", "float32")]
    assert c.outputs == ("GM", "LM")
    assert bind_sizes(c, {"m": 10})["m1"] == 3 and c.partitions[0].tile == 4
    x = random_inputs(c, seed=7, bind={"m": 10})
    q = x["Q"].astype(ml_dtypes.bfloat16).astype(np.float64)  # a bfloat16 input is rounded
    want = (q.T @ x["K"]).max(axis=1)
    np.testing.assert_allclose(interpret(c, x, {"M": 10})["GM"], want, rtol=1e-12)


def test_ein_files_load_with_an_empty_schedule(tmp_path: Path) -> None:
    p = write(tmp_path, ATTENTION_TEXT, "attention.ein")
    c, s = load_with_schedule(p)
    assert c == parse(ATTENTION_TEXT) and s == Schedule()


def test_example_specs_describe_the_same_cascade() -> None:
    ein = load(SPECS / "attention_3pass.ein")
    teaal, schedule = load_with_schedule(SPECS / "attention_teaal.yaml")
    assert ein == teaal
    assert schedule.tile("m") == 256 and schedule.loop_order


# ------------------------------------------------------------------ schedules
def test_attention_mapping_becomes_a_schedule(tmp_path: Path) -> None:
    _, s = load_with_schedule(write(tmp_path, ATTENTION_YAML))
    assert dict(s.tiles) == {"m": 256}
    assert s.loop_order == ("p", "m1", "m0", "f")  # the Einsum writing the output
    assert dict(s.parallel) == {"p": None, "f": None}
    assert dict(s.extra) == {
        "rank-order.K": "[M, E]",
        "partitioning.AV.P": "[uniform_shape(64), uniform_shape(16)]",
        "loop-order.QK": "[M1, P, M0, E]",
        "spacetime.AV.time": "[M1, M0]",
    }


def test_unused_mapping_and_sections_are_kept_verbatim(tmp_path: Path) -> None:
    _, s = load_with_schedule(write(tmp_path, MATMUL_YAML))
    assert dict(s.tiles) == {"k": 128}
    assert s.loop_order == ("k1", "mk01", "n", "mk00")
    assert s.parallel == ()
    extra = dict(s.extra)
    assert extra["partitioning.Z.(M, K0)"] == "[flatten()]"
    assert extra["partitioning.Z.MK0"] == "[uniform_occupancy(A.16384)]"
    assert extra["spacetime.Z.space"] == "[MK00.pos]"
    assert extra["spacetime.Z.time"] == "[K1, MK01, N]"
    assert extra["rank-order.A"] == "[K, M]"
    assert extra["architecture"] == (
        "{Accelerator: [{name: System, attributes: {clock_frequency: 500000000}}]}"
    )
    assert extra["format"] == "{A: {flattened: {rank-order: [K1, MK01, MK00]}}}"
    assert Schedule.parse(str(s)) == s


def test_conflicting_tiles_keep_the_first_and_the_rest_in_extra(tmp_path: Path) -> None:
    spec = ATTENTION_YAML.replace(
        "    AV:\n      M: [uniform_shape(256)]", "    AV:\n      M: [uniform_shape(512)]"
    )
    _, s = load_with_schedule(write(tmp_path, spec))
    assert s.tile("m") == 256
    assert dict(s.extra)["partitioning.AV.M"] == "[uniform_shape(512)]"


def test_spec_without_mapping_has_an_empty_schedule(tmp_path: Path) -> None:
    spec = "einsum:\n  declaration: {A: [K]}\n  expressions: ['S[] = A[k]']\nmapping:\n"
    c, s = load_with_schedule(write(tmp_path, spec))
    assert c.outputs == ("S",) and s == Schedule()


# ------------------------------------------------------------------ errors
def test_expression_syntax_error_points_into_the_yaml_line(tmp_path: Path) -> None:
    text = ATTENTION_YAML.replace("exp(QK[m, p] - GM[p])", "exp(QK[m, p] - GM[p]")
    err = load_error(tmp_path, text)
    assert_at(err, tmp_path / "spec.yaml", 16, 38)
    assert "expected ')', found end of line" in err.message


def test_unknown_operator_in_a_quoted_expression(tmp_path: Path) -> None:
    text = ATTENTION_YAML.replace(
        "- SN[m, p] = exp(QK[m, p] - GM[p])", "- 'SN[m, p] = softplus(QK[m, p] - GM[p])'"
    )
    err = load_error(tmp_path, text)
    assert_at(err, tmp_path / "spec.yaml", 16, 19)
    assert "unknown operator 'softplus'" in err.message


def test_column_accounts_for_rewritten_scalars(tmp_path: Path) -> None:
    spec = "einsum:\n  declaration: {A: [K], a: []}\n  expressions:\n    - S[] = a * A[k] $\n"
    err = load_error(tmp_path, spec)
    assert_at(err, tmp_path / "spec.yaml", 4, 22)
    assert "unexpected character '$'" in err.message


def test_undeclared_bare_name_is_not_silently_a_rank(tmp_path: Path) -> None:
    text = ATTENTION_YAML.replace("A[m, p] * V[f, m]", "a * A[m, p] * V[f, m]")
    err = load_error(tmp_path, text)
    assert_at(err, tmp_path / "spec.yaml", 19, 7)
    assert "rank a is not declared" in err.message


def test_teaal_take_is_refused(tmp_path: Path) -> None:
    spec = (
        "einsum:\n  declaration: {A: [K, M], B: [K, N], T: [K, M, N]}\n"
        "  expressions:\n    - T[k,m,n] = take(A[k,m], B[k,n], 1)\n"
    )
    err = load_error(tmp_path, spec)
    assert_at(err, tmp_path / "spec.yaml", 4, 18)
    assert "take(...) is TeAAL's sparse intersection filter" in err.message


def test_verify_errors_point_at_the_yaml_expression(tmp_path: Path) -> None:
    text = ATTENTION_YAML.replace("- GM[p] = max(m) QK[m, p]", "- GM[p] = max(m) QK[m]")
    err = load_error(tmp_path, text, VerifyError)
    assert_at(err, tmp_path / "spec.yaml", 15, 7)
    assert "QK[m] has 1 indices but QK has 2 ranks" in err.message


def test_written_tensor_must_match_its_declaration(tmp_path: Path) -> None:
    text = ATTENTION_YAML.replace("- A[m, p] = SN[m, p] / SD[p]", "- A[p, m] = SN[m, p] / SD[p]")
    err = load_error(tmp_path, text)
    assert_at(err, tmp_path / "spec.yaml", 18, 7)
    assert "A is declared [M, P] but written with ranks [p, m]" in err.message


def test_invalid_yaml(tmp_path: Path) -> None:
    err = load_error(tmp_path, "einsum:\n  declaration: {A: [K]\n  expressions: []\n")
    assert_at(err, tmp_path / "spec.yaml", 3, 3)
    assert "invalid YAML" in err.message


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    err = load_error(tmp_path, "einsum:\n  declaration: {A: [K], A: [M]}\n  expressions: []\n")
    assert_at(err, tmp_path / "spec.yaml", 2, 25)
    assert "einsum.declaration: A given twice" in err.message


def test_unknown_einsum_entry(tmp_path: Path) -> None:
    err = load_error(tmp_path, "einsum:\n  declarations: {A: [K]}\n  expressions: []\n")
    assert_at(err, tmp_path / "spec.yaml", 2, 3)
    assert "unknown einsum entry 'declarations'; known: declaration, expressions" in err.message


def test_missing_einsum_section(tmp_path: Path) -> None:
    err = load_error(tmp_path, "mapping: {}\n")
    assert "no 'einsum' section" in err.message


def test_input_without_declaration(tmp_path: Path) -> None:
    spec = "einsum:\n  declaration: {A: [K]}\n  inputs: [A, B]\n  expressions: ['S[] = A[k]']\n"
    err = load_error(tmp_path, spec)
    assert_at(err, tmp_path / "spec.yaml", 3, 15)
    assert "input B has no declaration" in err.message


def test_bad_shape_size_expression(tmp_path: Path) -> None:
    spec = (
        "einsum:\n  declaration: {A: [K]}\n  shape: {K: 'ceiling('}\n"
        "  expressions: ['S[] = A[k]']\n"
    )
    err = load_error(tmp_path, spec)
    assert_at(err, tmp_path / "spec.yaml", 3, 14)
    assert "bad size expression 'ceiling('" in err.message


def test_ein_errors_name_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "inputs X[i]\nT[i] = X[i] +\noutputs T\n", "bad.ein")
    with pytest.raises(ParseError) as info:
        load(p)
    assert_at(info.value, p, 2, 14)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(
        SpecError, match=r"unknown spec format '\.json': use \.ein, \.yaml or \.yml"
    ):
        load(write(tmp_path, "{}", "spec.json"))
