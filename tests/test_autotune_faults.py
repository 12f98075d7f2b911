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
from einfuse.autotune.store_server import fail_stale
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
    killed = {t.number for t in measuring()}
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
    # one it was creating when killed (no heartbeat yet) is failed a grace period after a
    # sweep first saw it (the workers' sweeps, or this one): nothing stays RUNNING. Swept
    # with the workers' 1 s heartbeat, so a 2 s grace period.
    beating = TuningStore(pg_url, heartbeat_s=1)
    study = beating.find_study(beating.studies()[0]["study"])
    fail_stale(study)
    time.sleep(2.5)
    fail_stale(study)
    assert not [t for t in trials(store) if t.state == TrialState.RUNNING]
    measured = [t.user_attrs["candidate"] for t in by_number.values() if "median_s" in t.user_attrs]
    assert len(measured) == len(set(measured)) == 2  # the total; none measured twice
    cut_short = {by_number[n].user_attrs.get("candidate") for n in killed} - {None}
    assert cut_short & set(measured)  # the default it was measuring: measured again
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


def test_a_trial_created_twice_by_a_retried_commit_is_failed_not_left_running(pg_url, monkeypatch):
    """The first "create trial" commits but its reply is lost; the retry creates a second.
    The first, owned by nobody and never beaten, is failed a grace period later."""
    import sqlalchemy
    from optuna.storages import RDBStorage

    create, lost = RDBStorage._create_new_trial, []

    def reply_lost_once(self, *args, **kwargs):
        trial = create(self, *args, **kwargs)
        if not lost:
            lost.append(trial._trial_id)
            raise sqlalchemy.exc.OperationalError(
                "INSERT", {}, Exception("server closed the connection unexpectedly")
            )
        return trial

    monkeypatch.setattr(RDBStorage, "_create_new_trial", reply_lost_once)
    store = TuningStore(pg_url, heartbeat_s=1)
    store.storage.retry_delays = (0.1,)
    study = store.study("lost-reply")
    trial = study.ask()  # retried: the commit of the first attempt stands
    store.heartbeat.add(trial._trial_id)  # its worker beats every second
    try:
        state = lambda: {t._trial_id: t.state for t in study.get_trials()}  # noqa: E731
        assert state() == {lost[0]: TrialState.RUNNING, trial._trial_id: TrialState.RUNNING}
        fail_stale(study)  # first seen without a heartbeat: given one, not failed yet
        assert state()[lost[0]] == TrialState.RUNNING
        time.sleep(2.5)  # the grace period: twice the heartbeat
        fail_stale(study)
        assert state() == {lost[0]: TrialState.FAIL, trial._trial_id: TrialState.RUNNING}
    finally:
        store.heartbeat.discard(trial._trial_id)


def test_dead_workers_are_found_on_sqlite_and_journal_stores_too(tmp_path):
    """One machine, several processes: one of them dying must not leave a trial RUNNING.
    SQLite keeps heartbeats (a trial beaten once, one never beaten: both failed after the
    grace period); the journal has none, so a trial whose worker process is gone is failed
    at once, and one of a live process or another host is left alone."""
    from einfuse.autotune.store_server import WORKER

    sqlite = TuningStore(f"sqlite:///{tmp_path / 'tuning.db'}", heartbeat_s=1)
    study = sqlite.study("s")
    beaten, _never_beaten = study.ask(), study.ask()
    sqlite.storage.record_heartbeat(beaten._trial_id)
    fail_stale(study)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2
    time.sleep(3.2)  # the grace period, 2 s, in SQLite's whole seconds
    fail_stale(study)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 2

    journal = TuningStore(f"journal:{tmp_path / 'tuning.log'}")
    assert journal.heartbeat is None
    study = journal.study("j")
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = WORKER.rsplit(":", 1)[0]
    for worker in (f"{host}:{gone.pid}", WORKER, f"elsewhere:{gone.pid}"):
        study.ask().set_user_attr("worker", worker)
    fail_stale(study)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]


def test_workers_measuring_through_a_server_restart_lose_and_duplicate_nothing(
    tmp_path, pg_server, pg_url
):
    """`--workers 2` measuring while the server is restarted (pg_ctl stop -m immediate,
    start): they wait it out and finish; exactly --trials candidates measured, none twice,
    no trial left RUNNING, the best stored."""
    spec = tmp_path / "attention.ein"
    spec.write_text(str(small_attention(256)))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    store = TuningStore(pg_url)
    # a 5 s heartbeat (the last --heartbeat counts): the outage stays inside the grace period
    extra = ("--trials", "6", "--repeats", "1", "--workers", "2", "--heartbeat", "5")
    run = subprocess.Popen(
        measure_command(spec, pg_url, *extra),
        cwd=REPO,
        env=env,
        stdout=PIPE,
        stderr=PIPE,
    )
    try:
        measured = lambda: [t for t in trials(store) if "median_s" in t.user_attrs]  # noqa: E731
        wait_for(lambda: measured() or run.poll() is not None, 120, "a first measurement")
        assert run.poll() is None, run.communicate()[1].decode()
        pg_server.pg_ctl("stop")
        time.sleep(1.0)
        pg_server.pg_ctl("start")
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err.decode()
    done = trials(store)
    candidates = [t.user_attrs["candidate"] for t in done if "median_s" in t.user_attrs]
    assert len(candidates) == len(set(candidates)) == 6
    assert not [t for t in done if t.state == TrialState.RUNNING]
    (row,) = store.studies()
    assert row["best"]["objective"] == "measure"
