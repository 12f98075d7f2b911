"""Bad input to the CLI: one line on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from einfuse.cli import main

REPO = Path(__file__).resolve().parents[1]
SPEC = str(REPO / "examples/specs/attention_3pass.ein")
TUNE = ["autotune", SPEC, "--sizes", "p=256,m=256", "--target", "h100", "--objective", "model"]


def files_under(path: Path) -> set[tuple[str, int]]:
    return {(str(p), p.stat().st_size if p.is_file() else -1) for p in path.rglob("*")}


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with one ``einfuse: error:`` line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("einfuse: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("afile/tune.db", "afile is a file, not a folder"),
        ("adir.db", "adir.db is a folder, not a file"),
        ("journal:{tmp}/afile/tune.log", "afile is a file, not a folder"),
    ],
)
def test_a_storage_path_that_cannot_be_a_store(tmp_path, capsys, storage, says):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir.db").mkdir()
    before = files_under(tmp_path)
    storage = storage.format(tmp=tmp_path) if "{" in storage else str(tmp_path / storage)
    assert says in one_line_error(capsys, [*TUNE, "--storage", storage])
    assert files_under(tmp_path) == before


def test_a_storage_under_proc(capsys):
    line = one_line_error(capsys, [*TUNE, "--storage", "/proc/einfuse-test/tune.db"])
    assert "No such file or directory" in line and "nothing was written" in line
    assert not Path("/proc/einfuse-test").exists()


@pytest.mark.parametrize(
    ("url", "package"),
    [
        ("postgresql+psycopg2://user:secret@localhost/db", "pip install psycopg2-binary"),
        ("mysql+pymysql://user:secret@localhost/db", "pip install pymysql"),
    ],
)
def test_a_database_url_whose_driver_is_missing_names_the_package(
    capsys, monkeypatch, url, package
):
    driver = url.split("+")[1].split(":")[0]
    monkeypatch.setitem(sys.modules, driver, None)  # missing here, even where it is installed
    line = one_line_error(capsys, [*TUNE, "--storage", url])
    assert package in line and "secret" not in line


@pytest.mark.parametrize("command", ["autotune", "explain"])
@pytest.mark.parametrize(
    ("sizes", "says"),
    [
        ("z=10", "--sizes names z, which"),
        ("", "--sizes is empty"),
        (" , ", "--sizes is empty"),
        ("m=0", "expected RANK=POSITIVE_INT"),
        ("m=8,m=16", "m given twice"),
    ],
)
def test_sizes_the_spec_cannot_take(capsys, command, sizes, says):
    argv = [command, SPEC, "--sizes", sizes, "--target", "h100"]
    argv += ["--objective", "model", "--storage", "memory"] if command == "autotune" else []
    assert says in one_line_error(capsys, argv)


def test_sizes_for_a_function_are_refused(capsys):
    argv = ["autotune", "mod:fn", "--args", "f32[4]", "--sizes", "m=4", "--storage", "memory"]
    assert "come from --args" in one_line_error(capsys, argv)


def test_gpu_on_a_machine_without_one(capsys):
    assert "JAX sees none here" in one_line_error(capsys, [*TUNE[:4], "--target", "gpu"])


def test_passes_and_pipeline_are_one_option(capsys):
    for spelling in ("--passes", "--pipeline"):
        assert main(["passes", SPEC, spelling, "fuse"]) == 0
        assert "RNV" in capsys.readouterr().out
        one_line_error(capsys, ["passes", SPEC, spelling, "nope"])


def test_a_subprocess_run_prints_no_traceback(tmp_path):
    (tmp_path / "afile").write_text("x")
    argv = [*TUNE, "--storage", str(tmp_path / "afile" / "t.db")]
    child = subprocess.run(
        [sys.executable, "-m", "einfuse", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert child.returncode == 2 and "Traceback" not in child.stderr
    assert child.stderr.strip().splitlines() == [child.stderr.strip()]


def test_a_spec_the_target_prices_nothing_of_is_an_error_naming_why(tmp_path, capsys):
    spec = tmp_path / "attn.ein"
    spec.write_text(Path(SPEC).read_text().replace("bfloat16", "float32"))
    argv = ["autotune", str(spec), "--sizes", "p=256,m=256", "--target", "fusemax"]
    argv += ["--objective", "model", "--trials", "50", "--storage", "memory", "--quiet"]
    line = one_line_error(capsys, argv)
    assert "refused every candidate" in line and "no rate for float32" in line
