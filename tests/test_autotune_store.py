"""Tuning results persist, keyed by what they depend on; broken stores fail clearly."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import optuna
import pytest

from einfuse.autotune.key import make_key
from einfuse.autotune.space import SpaceOptions
from einfuse.autotune.store import StoreError, TuningStore
from einfuse.autotune.tuner import autotune, lookup_best, tuned_pipeline
from einfuse.cli.autotune import main as cli
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade import attention
from einfuse.ir.cascade import bind_sizes

CPU = get_target("cpu", calibrate=False)
REPO = Path(__file__).resolve().parents[1]


def small_attention(n: int = 128, dtype: str | None = None):
    c = attention("3pass", heads=False, batch=False, p=n, m=n, e=8, f=8)
    if dtype is not None:
        from dataclasses import replace

        c = replace(c, inputs=tuple(replace(t, dtype=dtype) for t in c.inputs))
    return c


def tune_model(cascade, storage, **options):
    options = {"objective": "model", "storage": storage, "progress": False, **options}
    return autotune(cascade, target=CPU, **options)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# --------------------------------------------------------------------------- persistence
def test_a_second_call_with_the_same_key_does_no_new_trials(tmp_path):
    url = sqlite_url(tmp_path / "tuning.db")
    first = tune_model(small_attention(), url)
    second = tune_model(small_attention(), url)
    assert not first.reused and first.trials_done > 0
    assert second.reused and second.trials_done == 0
    assert len(second.study.trials) == len(first.study.trials)
    assert (second.pipeline, second.schedule) == (first.pipeline, first.schedule)


def test_a_second_measured_call_measures_nothing_already_measured(tmp_path):
    url = sqlite_url(tmp_path / "tuning.db")
    options = dict(objective="measure", trials=2, storage=url, progress=False, repeats=2)
    only_tiles = SpaceOptions(providers=("tiles",))  # tiles XLA ignores: one program to measure
    first = autotune(small_attention(), target=CPU, space_options=only_tiles, **options)
    second = autotune(small_attention(), target=CPU, space_options=only_tiles, **options)
    assert first.measurements == 1 and first.space_size > 1
    assert second.reused and second.measurements == 0 and second.trials_done == 0
    assert len(second.study.trials) == len(first.study.trials)


def test_the_key_changes_with_target_shape_and_dtype():
    base = small_attention(128)
    sizes = bind_sizes(base)
    key = make_key(base, sizes, CPU)
    other_shape = small_attention(256)
    variants = [
        make_key(base, sizes, get_target("h100")),
        make_key(other_shape, bind_sizes(other_shape), CPU),
        make_key(small_attention(128, "bfloat16"), sizes, CPU),
    ]
    digests = {key.digest(), *(v.digest() for v in variants)}
    assert len(digests) == 4
    assert make_key(small_attention(128), sizes, CPU) == key
    assert key.device_kind.startswith("cpu:") and dict(key.versions)["jax"]


def test_a_study_holding_another_key_is_refused(tmp_path):
    url = sqlite_url(tmp_path / "tuning.db")
    tune_model(small_attention(128), url, study="mine")
    with pytest.raises(StoreError, match="another key"):
        tune_model(small_attention(256), url, study="mine")


def test_export_and_import_replay_the_choice_without_tuning(tmp_path):
    cascade, sizes = small_attention(), bind_sizes(small_attention())
    tuned = tune_model(cascade, sqlite_url(tmp_path / "a.db"))
    exported = tmp_path / "best.json"
    assert TuningStore(sqlite_url(tmp_path / "a.db")).export_best(exported) == 1
    journal = f"journal:{tmp_path / 'b.log'}"
    assert tuned_pipeline(cascade, sizes, CPU, storage=journal) is None
    assert TuningStore(journal).import_best(exported) == 1
    expected = (tuned.pipeline, tuned.schedule)
    assert tuned_pipeline(cascade, sizes, CPU, storage=journal) == expected
    assert tuned_pipeline(cascade, sizes, CPU, storage=str(exported)) == expected
    assert lookup_best(make_key(cascade, sizes, CPU), str(exported)) == tuned.schedule
    replayed = tune_model(cascade, journal)
    assert replayed.reused and replayed.trials_done == 0


def test_looking_up_in_a_default_store_that_does_not_exist_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cascade = small_attention()
    assert tuned_pipeline(cascade, bind_sizes(cascade), CPU) is None
    assert not (tmp_path / "einfuse").exists()


# --------------------------------------------------------------------------- broken stores
def test_a_corrupt_sqlite_file_gives_a_clear_error_and_is_kept(tmp_path):
    path = tmp_path / "tuning.db"
    path.write_bytes(b"this is not a database\n" * 10)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=f"{path}.*not an SQLite database.*left untouched"):
        TuningStore(sqlite_url(path))
    assert path.read_bytes() == before


def test_a_damaged_sqlite_database_gives_a_clear_error_and_is_kept(tmp_path):
    path = tmp_path / "tuning.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=f"{path}.*corrupt"):
        TuningStore(sqlite_url(path))
    assert path.read_bytes() == before


def test_a_corrupt_journal_gives_a_clear_error_and_is_kept(tmp_path):
    path = tmp_path / "tuning.log"
    path.write_text("not a journal line\nnor this one\n")  # a bad last line alone is a torn write
    with pytest.raises(StoreError, match=f"{path}.*corrupt.*left untouched"):
        TuningStore(f"journal:{path}").studies()
    assert path.read_text() == "not a journal line\nnor this one\n"


def test_a_locked_sqlite_file_gives_a_clear_error_and_keeps_its_trials(tmp_path):
    path = tmp_path / "tuning.db"
    first = tune_model(small_attention(), sqlite_url(path))
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match=f"{path}.*locked.*journal"):
            store = TuningStore(sqlite_url(path), busy_timeout_s=0.2)
            store.study(first.study.study_name)
    finally:
        holder.rollback()
        holder.close()
    study = optuna.load_study(study_name=first.study.study_name, storage=sqlite_url(path))
    assert len(study.trials) == len(first.study.trials)


# --------------------------------------------------------------------------- the CLI
@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "attention.ein"
    path.write_text(str(small_attention(128)))
    return path


def test_concurrent_cli_processes_on_one_store_all_finish_with_all_their_trials(tmp_path, spec):
    """Two processes on a journal and two on one SQLite file, all four at once."""
    stores = [f"journal:{tmp_path / 'tuning.log'}", sqlite_url(tmp_path / "tuning.db")]
    command = [sys.executable, "-m", "einfuse.cli.autotune", str(spec), "--objective", "model"]
    command += ["--no-calibrate", "--fresh", "--quiet", "--storage"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([*command, storage], cwd=REPO, env=env, stdout=PIPE, stderr=PIPE)
        for storage in stores
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        assert b"tuned" in out
    for storage in stores:
        store = TuningStore(storage)
        (row,) = store.studies()
        trials = store.find_study(row["study"]).trials
        workers = [t.user_attrs["worker"] for t in trials]
        assert len(set(workers)) == 2
        assert workers.count(workers[0]) * 2 == len(trials)  # each stored all of its own
        assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)


def test_cli_tunes_a_spec_prints_the_table_and_plots(tmp_path, spec, capsys):
    storage = sqlite_url(tmp_path / "tuning.db")
    args = [str(spec), "--objective", "model", "--no-calibrate", "--storage", storage, "--quiet"]
    assert cli([*args, "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "tuned" in out and "default" in out and "trials" in out
    assert sorted(p.name.split("-")[-1] for p in (tmp_path / "plots").glob("*.png")) == [
        "history.png",
        "importance.png",
    ]


def test_cli_list_and_show_read_the_store(tmp_path, spec, capsys):
    storage = sqlite_url(tmp_path / "tuning.db")
    tuned = tune_model(small_attention(128), storage)
    assert cli(["--list", "--storage", storage]) == 0
    listing = capsys.readouterr().out
    assert tuned.study.study_name in listing and tuned.pipeline in listing
    assert cli(["--show", tuned.study.study_name, "--storage", storage]) == 0
    shown = capsys.readouterr().out
    assert "COMPLETE" in shown and '"fingerprint"' in shown
    assert cli(["--show", "nope", "--storage", storage]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
