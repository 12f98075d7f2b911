"""`einfuse explain`: a spec's cost breakdown on a target, and clean errors."""

import pytest

import einfuse.cli as cli
from einfuse.cli import main
from tests.cascades import ATTENTION_3PASS as THREE_PASS

SIZES = "e=64,f=64,m=4096,p=4096"


@pytest.fixture(autouse=True)
def explain_registered(monkeypatch):
    """Until the command list names it, register `explain` for these tests."""
    if "explain" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "explain"))


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "attn.ein"
    path.write_text(THREE_PASS)
    return str(path)


def test_prints_the_breakdown_table_and_the_bottleneck(spec, capsys):
    assert main(["explain", spec, "--target", "h100", "--sizes", SIZES]) == 0
    out = capsys.readouterr().out
    for column in ("Einsum", "MACs", "vector", "transc.", "hbm", "shared_memory", "bound"):
        assert column in out
    for einsum in ("QK", "GM", "SN", "SD", "A", "AV"):
        assert f"\n{einsum} " in out
    assert "Predicted" in out and "bound by" in out


def test_pipeline_fuse_shows_one_fused_kernel(spec, capsys):
    assert main(["explain", spec, "--target", "h100", "--sizes", SIZES, "--pipeline", "fuse"]) == 0
    out = capsys.readouterr().out
    assert "loop m1" in out and "RNV" in out


def test_a_schedule_is_parsed_and_priced(spec, capsys):
    # The spec is float32 (its declared dtype): 256-key tiles of K and V fit shared memory.
    args = ["explain", spec, "--target", "h100", "--sizes", SIZES, "--pipeline", "fuse{tile=256}"]
    assert main([*args, "--schedule", "tile p=64; order p, m1"]) == 0
    out = capsys.readouterr().out
    assert "schedule: tile p=64; order p, m1" in out
    assert main([*args, "--schedule", "tile p=4096"]) == 1
    assert "rejected" in capsys.readouterr().out


def test_fusemax_mapping_on_the_fusemax_target(spec, capsys):
    args = ["explain", spec, "--target", "fusemax", "--sizes", SIZES, "--dtype", "bf16"]
    assert main([*args, "--pipeline", "fuse{tile=256}", "--fusemax-mapping"]) == 0
    out = capsys.readouterr().out
    assert "unit.QK=pe_2d" in out and "pe_registers" in out and "compute (pe_" in out


def test_unbound_sizes_unknown_targets_and_bad_sizes_are_one_line_errors(spec, capsys):
    assert main(["explain", spec, "--target", "h100", "--sizes", "e=64,m=4096"]) == 2
    assert "give a value for" in capsys.readouterr().err
    assert main(["explain", spec, "--target", "nope", "--sizes", SIZES]) == 2
    assert "unknown target 'nope'" in capsys.readouterr().err
    assert main(["explain", spec, "--target", "h100", "--sizes", "e=sixty"]) == 2
    assert "expected RANK=POSITIVE_INT" in capsys.readouterr().err
    assert main(["explain", spec, "--target", "h100", "--sizes", SIZES, "--schedule", "tile"]) == 2
    assert "--schedule:1" in capsys.readouterr().err


def test_each_pass_says_what_it_did(spec, capsys):
    assert main(["explain", spec, "--target", "h100", "--sizes", SIZES, "--pipeline", "fuse"]) == 0
    assert "fuse: fused m (tile 512)\n" in capsys.readouterr().out


def test_a_schedule_naming_a_rank_the_cascade_lacks_is_a_one_line_error(spec, capsys):
    args = ["explain", spec, "--target", "h100", "--sizes", SIZES, "--schedule", "tile g=64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "names rank(s) g" in err and "Traceback" not in err
