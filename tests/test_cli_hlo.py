"""The `einfuse` CLI: start-up, the `hlo` command, its --args specs and its user errors."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einfuse
from einfuse.backends.inspection import STAGES
from einfuse.cli import CliError, main
from einfuse.cli import hlo as hlo_command
from einfuse.cli.args import DTYPE_NAMES, load_function, parse_arg_specs, random_inputs
from einfuse.cli.errors import is_user_error
from einfuse.ir.errors import SpecError

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = str(FIXTURES / "small_model.py")
ATTENTION_ARGS = "f32[8,16] f32[12,16] f32[12,4]"


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(capsys, *argv):
    """Exit code 2 and exactly one `einfuse: error:` line on stderr; returns that line."""
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("einfuse: error: "), err
    return lines[0]


# --- start-up ------------------------------------------------------------------------------


def test_python_m_einfuse_prints_the_version():
    result = subprocess.run(
        [sys.executable, "-m", "einfuse", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"einfuse {einfuse.__version__}"


def test_help_does_not_import_jax():
    script = (
        "import sys\n"
        "from einfuse.cli import main\n"
        "codes = [main(['--help']), main(['hlo', '--help'])]\n"
        "print(codes, 'jax' in sys.modules, 'optuna' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[0, 0] False False"


def test_help_lists_the_hlo_command(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "hlo" in out


def test_a_command_is_required(capsys):
    code, _, err = _run(capsys)
    assert code == 2
    assert "COMMAND" in err


def test_stage_choices_match_the_inspection_stages():
    assert hlo_command.STAGES == STAGES


# --- einfuse hlo: happy paths ---------------------------------------------------------------


def test_hlo_prints_optimized_hlo_by_default(capsys):
    code, out, _ = _run(capsys, "hlo", f"{MODEL}:attention", "--args", ATTENTION_ARGS)
    assert code == 0
    assert out.startswith("HloModule jit_attention")
    assert " dot(" in out


def test_hlo_prints_stablehlo_on_request(capsys):
    code, out, _ = _run(
        capsys, "hlo", f"{MODEL}:attention", "--args", ATTENTION_ARGS, "--stage", "stablehlo"
    )
    assert code == 0
    assert out.startswith("module @jit_attention")
    assert out.count("stablehlo.dot_general") == 2


def test_hlo_summary_prints_the_table(capsys):
    code, out, _ = _run(capsys, "hlo", f"{MODEL}:attention", "--args", ATTENTION_ARGS, "--summary")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert ["dot", "2"] in rows
    assert any(row[:1] == ["flops"] for row in rows)


def test_hlo_finds_a_dotted_attribute(capsys):
    code, out, _ = _run(
        capsys, "hlo", f"{MODEL}:Layer.forward", "--args", "f32[8]", "--stage", "stablehlo"
    )
    assert code == 0
    assert "stablehlo.tanh" in out


def test_hlo_imports_a_module_by_name(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    code, out, _ = _run(capsys, "hlo", "small_model:matmul", "--args", "f32[4,8] f32[8,2]")
    assert code == 0
    assert "f32[4,2]" in out


def test_hlo_dump_writes_xla_pass_dumps(capsys, tmp_path):
    dump = tmp_path / "dump"
    code, out, err = _run(
        capsys, "hlo", f"{MODEL}:matmul", "--args", "f32[4,8] f32[8,2]", "--dump", str(dump)
    )
    assert code == 0
    assert out.startswith("HloModule jit_matmul")
    after = sorted(dump.glob("*after_optimizations.txt"))
    assert after, sorted(p.name for p in dump.iterdir())
    assert len(list(dump.glob("*.after_*"))) > 1  # pass by pass, not just the final module
    assert f"dump files to {dump}" in err
    assert str(after[0]) in err


def test_hlo_dump_relays_the_subprocess_user_error(capsys, tmp_path):
    line = _assert_user_error(
        capsys, "hlo", f"{MODEL}:matmul", "--args", "f32[4,8] f32[9,2]", "--dump", str(tmp_path)
    )
    assert "cannot trace" in line and "TypeError" in line


# --- einfuse hlo: user errors ---------------------------------------------------------------


def test_missing_file_is_a_user_error(capsys, tmp_path):
    line = _assert_user_error(capsys, "hlo", f"{tmp_path}/absent.py:f")
    assert "no such file" in line and "absent.py" in line


def test_missing_function_is_a_user_error(capsys):
    line = _assert_user_error(capsys, "hlo", f"{MODEL}:nope", "--args", "f32[2]")
    assert "has no attribute 'nope'" in line


def test_non_callable_target_is_a_user_error(capsys):
    line = _assert_user_error(capsys, "hlo", f"{MODEL}:NOT_A_FUNCTION")
    assert "not callable" in line and "int" in line


def test_module_that_fails_to_import_is_a_user_error(capsys, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    line = _assert_user_error(capsys, "hlo", f"{broken}:f")
    assert "RuntimeError: boom at import" in line


def test_unknown_module_is_a_user_error(capsys):
    line = _assert_user_error(capsys, "hlo", "no_such_module_xyz:f")
    assert "No module named 'no_such_module_xyz'" in line


def test_target_without_function_is_a_user_error(capsys):
    line = _assert_user_error(capsys, "hlo", MODEL)
    assert "MODULE:FUNCTION" in line


def test_malformed_args_name_the_token_and_its_position(capsys):
    line = _assert_user_error(capsys, "hlo", f"{MODEL}:matmul", "--args", "f32[4,8] f33[8,2]")
    assert "token 2 'f33[8,2]' (column 10)" in line
    assert "unknown dtype 'f33'" in line


def test_function_that_fails_to_trace_is_a_user_error(capsys):
    line = _assert_user_error(capsys, "hlo", f"{MODEL}:matmul", "--args", "f32[4,8] f32[9,2]")
    assert "cannot trace" in line and "TypeError" in line


def test_library_errors_count_as_user_errors():
    assert is_user_error(SpecError("bad spec"))
    assert is_user_error(CliError("bad path"))
    assert not is_user_error(KeyError("internal bug"))


def test_library_errors_print_without_a_traceback(capsys, monkeypatch):
    def failing_lower(fn, specs, passes=None, backend="jax", platform=None):
        raise SpecError("rank 'm' is bound twice")

    monkeypatch.setattr(hlo_command, "_lower", failing_lower)
    line = _assert_user_error(capsys, "hlo", f"{MODEL}:matmul", "--args", "f32[4,8] f32[8,2]")
    assert line == "einfuse: error: rank 'm' is bound twice"


# --- --args specs ---------------------------------------------------------------------------

_WIDE = {"float64", "int64", "uint64", "complex128"}  # need x64 mode, tested on their own
_DTYPE_TOKENS = sorted(name for name, dtype in DTYPE_NAMES.items() if dtype not in _WIDE)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_DTYPE_TOKENS), st.lists(st.integers(0, 4096), min_size=0, max_size=4)
        ),
        max_size=5,
    ),
    st.sampled_from([" ", "  ", ", ", "\n"]),
)
def test_arg_specs_parse_every_shape_and_dtype(specs, separator):
    text = separator.join(f"{dtype}[{','.join(map(str, shape))}]" for dtype, shape in specs)
    parsed = parse_arg_specs(text)
    assert [(tuple(s.shape), jnp.dtype(s.dtype)) for s in parsed] == [
        (tuple(shape), jnp.dtype(DTYPE_NAMES[dtype])) for dtype, shape in specs
    ]


def test_arg_specs_accept_scalars_long_names_and_spaces_in_brackets():
    parsed = parse_arg_specs("i32[] float32[2, 3] bool[4]")
    assert [(s.shape, s.dtype) for s in parsed] == [
        ((), jnp.dtype("int32")),
        ((2, 3), jnp.dtype("float32")),
        ((4,), jnp.dtype("bool")),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("f32[2,x]", "dimension 'x'"),
        ("f32[2,,3]", "dimension ''"),
        ("f32[2", "expected DTYPE[dims]"),
        ("f32", "expected DTYPE[dims]"),
        ("f32[-1]", "dimension '-1'"),
    ],
)
def test_malformed_arg_specs_are_refused(text, message):
    with pytest.raises(CliError, match="token 1") as info:
        parse_arg_specs(text)
    assert message in str(info.value)


def test_64_bit_specs_are_refused_without_x64_mode():
    with pytest.raises(CliError, match="64-bit mode"):
        parse_arg_specs("f64[3]")


def test_random_inputs_match_specs_and_are_seeded():
    specs = parse_arg_specs("f32[16,8] bf16[32] i32[64] u8[64] bool[64]")
    first, again, other = (random_inputs(specs, seed) for seed in (1, 1, 2))
    for spec, value in zip(specs, first):
        assert value.shape == spec.shape and value.dtype == spec.dtype
    floats, _, ints, uints, _ = (np.asarray(v, dtype=np.float64) for v in first)
    assert np.all(floats != 0) and 0.5 < floats.std() < 1.5
    assert ints.min() >= -8 and ints.max() < 8 and len(np.unique(ints)) > 4
    assert uints.min() >= 0 and uints.max() < 8
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_load_function_returns_the_callable():
    matmul = load_function(f"{MODEL}:matmul")
    x, w = random_inputs(parse_arg_specs("f32[3,5] f32[5,2]"), seed=0)
    np.testing.assert_allclose(matmul(x, w), np.asarray(x) @ np.asarray(w), rtol=1e-5)
    assert jax.jit(matmul)(x, w).shape == (3, 2)


def test_hlo_dump_reruns_with_the_same_passes(capsys, tmp_path, monkeypatch):
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(hlo_command.subprocess, "run", run)
    argv = ["hlo", f"{MODEL}:matmul", "--args", "f32[4,8] f32[8,2]", "--passes", "fuse{tile=16}"]
    _assert_user_error(capsys, *argv, "--dump", str(tmp_path))  # the fake run wrote no files
    (command,) = commands
    assert command[command.index("--passes") + 1] == "fuse{tile=16}"


# --- other platforms -------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_the_fused_loop_lowers_for_a_platform_this_machine_lacks(capsys, platform):
    code, out, _ = _run(
        capsys,
        *("hlo", f"{MODEL}:attention", "--args", "bf16[64,16] bf16[64,16] bf16[64,4]"),
        *("--passes", "fuse{tile=16}", "--platform", platform, "--stage", "stablehlo"),
    )
    assert code == 0 and "stablehlo.while" in out and "bf16" in out


def test_a_foreign_platform_cannot_be_compiled_here(capsys):
    line = _assert_user_error(
        capsys, "hlo", f"{MODEL}:attention", "--args", ATTENTION_ARGS, "--platform", "tpu"
    )
    assert "--platform tpu" in line and "--stage stablehlo" in line
