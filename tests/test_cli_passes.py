"""`einfuse passes`: a spec through a pipeline, with pass counts, and clean errors."""

from einfuse.cli import main
from tests.cascades import ATTENTION_3PASS as THREE_PASS


def test_prints_the_cascade_and_its_pass_counts(tmp_path, capsys):
    spec = tmp_path / "attn.ein"
    spec.write_text(THREE_PASS)
    assert main(["passes", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "GM[p] = max(m) QK[m, p]" in out
    assert "m     3" in out


def test_print_after_all_shows_each_pass(tmp_path, capsys):
    spec = tmp_path / "attn.ein"
    spec.write_text(THREE_PASS)
    assert (
        main(["passes", str(spec), "--pipeline", "partition{rank=m,tile=2}", "--print-after-all"])
        == 0
    )
    out = capsys.readouterr().out
    assert "// ----- after input" in out
    assert "// ----- after partition{rank=m,tile=2}" in out
    assert "partition m -> m1, m0 by 2" in out


def test_why_names_the_reduction_that_forces_a_pass(tmp_path, capsys):
    spec = tmp_path / "attn.ein"
    spec.write_text(THREE_PASS)
    assert main(["passes", str(spec), "--why"]) == 0
    assert "pass 3: A (waits for SD)" in capsys.readouterr().out


def test_spec_error_points_at_line_and_column(tmp_path, capsys):
    spec = tmp_path / "bad.ein"
    spec.write_text("inputs A[i]\nB[i] = fooo(A[i])\noutputs B\n")
    assert main(["passes", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:2:8: syntax: unknown operator 'fooo'" in err
    assert "           ^" in err


def test_missing_file_and_bad_pipeline_are_one_line_errors(tmp_path, capsys):
    assert main(["passes", str(tmp_path / "nope.ein")]) == 2
    assert "no such spec file" in capsys.readouterr().err
    spec = tmp_path / "attn.ein"
    spec.write_text(THREE_PASS)
    assert main(["passes", str(spec), "--pipeline", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err
