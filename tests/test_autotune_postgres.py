"""The tuning store on a real PostgreSQL server (the session's throwaway cluster, see
`tests.pg_server`): URL forms, the CLI's commands, moving results between SQLite and the
server, and a server that cannot be reached."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from einfuse.autotune.store import TuningStore, describe_storage, storage_url
from einfuse.cli.autotune import main as cli
from tests.pg_server import free_port
from tests.test_autotune_store import small_attention, sqlite_url, tune_model


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "attention.ein"
    path.write_text(str(small_attention(128)))
    return path


def plain(url: str) -> str:
    """The URL as a user writes it: ``postgresql://`` with no driver named."""
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_plain_postgres_urls_use_psycopg_3_and_hide_the_password():
    assert storage_url("postgresql://u:pw@h:5432/db") == "postgresql+psycopg://u:pw@h:5432/db"
    assert storage_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert storage_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert describe_storage("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"


def test_cli_tunes_lists_and_shows_on_the_server(pg_url, spec, capsys):
    args = [str(spec), "--objective", "model", "--no-calibrate", "--quiet", "--trials", "300"]
    assert cli([*args, "--storage", plain(pg_url)]) == 0
    assert "tuned" in capsys.readouterr().out
    assert cli([*args, "--storage", pg_url]) == 0  # stored: reused, no new trials
    (row,) = TuningStore(pg_url).studies()
    assert cli(["--list", "--storage", plain(pg_url)]) == 0
    assert row["study"] in capsys.readouterr().out
    assert cli(["--show", row["study"], "--storage", pg_url]) == 0
    shown = capsys.readouterr().out
    assert "COMPLETE" in shown and row["best"]["pipeline"] in shown
    assert len(TuningStore(pg_url).find_study(row["study"]).trials) == row["trials"]


def test_export_import_sqlite_to_server_and_back_loses_and_duplicates_nothing(
    tmp_path, pg_url, capsys
):
    local = sqlite_url(tmp_path / "tuning.db")
    for n in (64, 128):
        tune_model(small_attention(n), local)
    tune_model(small_attention(64, dtype="bfloat16"), local)
    first, second = tmp_path / "local.json", tmp_path / "server.json"
    assert cli(["--export", str(first), "--storage", local]) == 0
    for _ in range(2):  # importing twice replaces, never duplicates
        assert cli(["--import", str(first), "--storage", pg_url]) == 0
    assert cli(["--export", str(second), "--storage", pg_url]) == 0
    records = json.loads(first.read_text())["records"]
    assert len(records) == 3
    assert json.loads(second.read_text())["records"] == records
    assert len(TuningStore(pg_url).studies()) == 3
    back = sqlite_url(tmp_path / "back.db")
    assert cli(["--import", str(second), "--storage", back]) == 0
    assert sorted(TuningStore(back).records(), key=repr) == sorted(
        TuningStore(local).records(), key=repr
    )
    # what the server holds is served: a lookup finds the imported choice, nothing tuned
    again = tune_model(small_attention(128), pg_url)
    assert again.reused and again.trials_done == 0


def test_a_server_that_cannot_be_reached_is_one_line_and_exit_2(spec, capsys):
    url = f"postgresql://einfuse@127.0.0.1:{free_port()}/nowhere"
    args = [str(spec), "--objective", "model", "--no-calibrate", "--quiet", "--storage", url]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "cannot reach the tuning database postgresql://einfuse@127.0.0.1" in err
    assert "Connection refused" in err and "run the same command again" in err
    assert cli(["--list", "--storage", url]) == 2
    assert "cannot reach the tuning database" in capsys.readouterr().err


def test_records_and_tables_of_another_version_are_named_not_misread(pg_server, pg_url):
    import psycopg

    from einfuse.autotune.store import BEST_ATTR, StoreError

    store = TuningStore(pg_url)
    tuned = tune_model(small_attention(64), store)
    record = dict(store.find_study(tuned.study.study_name).user_attrs[BEST_ATTR])
    record["key"] = {**record["key"], "schema": 0}
    tuned.study.set_user_attr(BEST_ATTR, record)
    with pytest.raises(StoreError, match="has schema 0, this einfuse reads 1"):
        store.records()
    database = pg_url.rsplit("/", 1)[1]
    dsn = f"host=127.0.0.1 port={pg_server.port} user={pg_server.user} dbname={database}"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'v1.3.0.a'")
    with pytest.raises(StoreError, match=r"tables of an older Optuna.*optuna storage upgrade"):
        TuningStore(pg_url)


def test_the_test_server_dies_with_the_process_that_started_it(tmp_path):
    """A pytest SIGKILLed cannot stop its throwaway server: the watchdog does."""
    import signal
    import subprocess
    import sys
    import time

    from tests.test_autotune_store import REPO

    script = (
        "import time; from tests.pg_server import PgServer; s = PgServer().start(); "
        "print(s.root, s.port, flush=True); time.sleep(120)"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        root, port = owner.stdout.readline().split()
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
        assert Path(root, "data", "postmaster.pid").exists()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while Path(root).exists() or listening(int(port)):
        assert time.monotonic() < deadline, "the server outlived its owner by 10 s"
        time.sleep(0.1)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
