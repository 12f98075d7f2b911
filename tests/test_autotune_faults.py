"""Faults while tuning on a real PostgreSQL server: a worker killed mid-trial, the server
restarted mid-search, a server that stays down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from subprocess import PIPE

import pytest
from optuna.trial import TrialState

from einfuse.autotune.store import StoreError, TuningStore
from tests.test_autotune_store import REPO, small_attention


def measure_command(spec: Path, url: str, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "einfuse.cli.autotune", str(spec), "--objective", "measure"]
    return [*command, "--target", "cpu", "--quiet", "--storage", url, "--heartbeat", "1", *extra]


def trials(store: TuningStore) -> list:
    rows = store.studies()
    return [] if not rows else store.find_study(rows[0]["study"]).get_trials(deepcopy=False)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_worker_killed_mid_trial_leaves_a_failed_trial_and_others_finish(tmp_path, pg_url):
    spec = tmp_path / "attention.ein"
    spec.write_text(str(small_attention(64)))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    store = TuningStore(pg_url)
    worker = subprocess.Popen(
        measure_command(spec, pg_url, "--trials", "2", "--repeats", "2000"),
        cwd=REPO,
        env=env,
        stdout=PIPE,
        stderr=PIPE,
    )
    try:
        running = lambda: [t for t in trials(store) if t.state == TrialState.RUNNING]  # noqa: E731
        measuring = lambda: [t for t in running() if "candidate" in t.user_attrs]  # noqa: E731
        wait_for(lambda: measuring() or worker.poll() is not None, 120, "a trial measuring")
        assert worker.poll() is None, worker.communicate()[1].decode()
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    killed = {t.number for t in running()}
    assert killed  # its batch (2000 timed runs) was cut short
    time.sleep(2.5)  # the grace period: twice the 1 s heartbeat
    done = subprocess.run(  # two workers finish the study, then race
        measure_command(spec, pg_url, "--trials", "2", "--repeats", "2", "--workers", "2"),
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    by_number = {t.number: t for t in trials(store)}
    assert all(by_number[n].state == TrialState.FAIL for n in killed)
    assert not [t for t in by_number.values() if t.state == TrialState.RUNNING]
    measured = [t.user_attrs["candidate"] for t in by_number.values() if "median_s" in t.user_attrs]
    assert len(measured) == len(set(measured)) >= 2  # no candidate measured twice
    cut_short = {by_number[n].user_attrs.get("candidate") for n in killed} - {None}
    assert cut_short and cut_short <= set(measured)  # measured again by the others
    (row,) = store.studies()
    assert row["best"] is not None and row["best"]["objective"] == "measure"


def test_a_database_restart_mid_search_is_waited_out_and_loses_nothing(pg_server, pg_url):
    store = TuningStore(pg_url)
    study = store.study("restart")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    pg_server.pg_ctl("stop")
    restart = threading.Timer(1.0, pg_server.pg_ctl, ("start",))
    restart.start()
    try:
        study.tell(trial, 0.5)  # retried with backoff until the server is back
        states = [t.state for t in store.find_study("restart").trials]
    finally:
        restart.join()
    assert states == [TrialState.COMPLETE] * 3


def test_a_database_that_stays_down_mid_search_is_one_clear_error(pg_server, pg_url):
    store = TuningStore(pg_url)
    store.study("down")
    store.storage.retry_delays = (0.1, 0.2)
    pg_server.pg_ctl("stop")
    try:
        with pytest.raises(StoreError, match="cannot reach the tuning database") as error:
            store.studies()
    finally:
        pg_server.pg_ctl("start")
    assert "\n" not in str(error.value) and "run the same command again" in str(error.value)
    assert [row["study"] for row in TuningStore(pg_url).studies()] == ["down"]
