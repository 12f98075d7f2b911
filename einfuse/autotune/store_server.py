"""Server databases (PostgreSQL) for the tuning store: URL forms, connection settings,
heartbeats, and retrying a call through a transient disconnect.

``postgresql://user:password@host:5432/db`` (and ``postgres://``) use psycopg 3, which
``pip install einfuse[postgres]`` installs; ``postgresql+psycopg://`` names it explicitly and
``postgresql+psycopg2://`` keeps psycopg2. Connections are checked before use
(``pool_pre_ping``), so a server restarted between two calls costs nothing.

Dead workers (`fail_stale`, run by every worker before it asks for a trial), so a worker
killed mid-trial leaves a FAILED trial, never one RUNNING forever:

- database stores (PostgreSQL, SQLite): while a worker measures a trial, a thread records
  the trial's heartbeat every ``heartbeat_s`` seconds; trials whose heartbeat is older than
  twice that are failed. A RUNNING trial with no heartbeat at all (its worker died between
  creating it and its first beat, or a "create trial" was retried after a commit whose reply
  was lost, so nobody owns it) is given one at the database's clock when first seen, and so
  is failed a grace period later unless someone beats it. SQLite keeps heartbeats too: it
  serves one machine, but several processes there (``--workers``) die as easily as on many,
  and a beat costs one small write per ``heartbeat_s`` next to seconds of compiling.
- journal files (one machine, no heartbeat in Optuna): a trial whose recorded worker is a
  process of this host that no longer exists is failed at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import optuna

DEFAULT_HEARTBEAT_S = 30
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # who measures a trial (its "worker" attr)
CONNECT_TIMEOUT_S = 10
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # backoff through a transient disconnect: ~15 s
_T = TypeVar("_T")

_DISCONNECTED = (
    "connection refused",
    "connection failed",
    "could not connect",
    "server closed the connection",
    "terminating connection",
    "connection is closed",
    "connection timeout expired",
    "timeout expired",
    "the database system is starting up",
    "the database system is shutting down",
    "consuming input failed",
    "no route to host",
    "name or service not known",
)


def is_server_url(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def server_url(url: str) -> str:
    """A plain ``postgresql://`` / ``postgres://`` URL with psycopg 3 as its driver.

    SQLAlchemy would pick psycopg2 for a plain URL; einfuse's extra installs psycopg 3. When
    only psycopg2 is installed, the plain URL is left to it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    has_v3 = importlib.util.find_spec("psycopg") is not None
    if not has_v3 and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql://{rest}"
    return f"postgresql+psycopg://{rest}"


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a server URL: checked connections, a connect timeout."""
    if not is_server_url(url):
        return {}
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}


def is_disconnect(message: str) -> bool:
    """Does a (lower-cased) database error say the server cannot be reached?"""
    return any(text in message for text in _DISCONNECTED)


def retrying(
    call: Callable[[], _T], delays: tuple[float, ...] = RETRY_DELAYS_S, *, telling: bool = False
) -> _T:
    """``call()``, retried with backoff while the database server cannot be reached.

    A call that changes nothing twice (reads, setting an attribute), or, ``telling``, the
    call that finishes a trial: a retry finding the trial finished means the first attempt
    was committed before the connection broke, so it is done, not done twice.
    """
    import optuna

    from einfuse.autotune.store_errors import chain_message

    retried = False
    for delay in (*delays, None):
        try:
            return call()
        except optuna.exceptions.UpdateFinishedTrialError:
            if telling and retried:
                return True  # type: ignore[return-value]
            raise
        except Exception as exc:
            if delay is None or not is_disconnect(chain_message(exc)):
                raise
            retried = True
            time.sleep(delay)
    raise AssertionError("unreachable")


# RDBStorage's calls during a search, retried through a disconnect by `einfuse_rdb_storage`:
# the private ones a study calls through Optuna's cache, the public ones that do not just
# call those (a retry inside a retry would wait out a server that stays down many times).
# Creating a trial is among them: a retry after a commit whose answer was lost adds one
# RUNNING trial that no worker owns; the sweep gives it a heartbeat, then fails it.
_RETRIED = (
    "create_new_study",
    "_create_new_trial",
    "get_all_studies",
    "_get_trials",
    "_get_best_trial_id",
    "get_n_trials",
    "get_study_directions",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_system_attrs",
    "get_study_user_attrs",
    "get_trial",
    "get_trial_id_from_study_id_trial_number",
    "record_heartbeat",
    "set_study_system_attr",
    "set_study_user_attr",
    "_set_trial_param",
    "set_trial_state_values",
    "set_trial_system_attr",
    "set_trial_user_attr",
    "_get_stale_trial_ids",
)


@functools.cache
def einfuse_rdb_storage() -> type:
    """An RDBStorage whose calls wait out a database restart (`RETRY_DELAYS_S`, ~15 s) and
    whose stale-trial sweep also catches RUNNING trials that never had a heartbeat."""
    from optuna.storages import RDBStorage

    def retried(name: str) -> Callable[..., Any]:
        @functools.wraps(getattr(RDBStorage, name))
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            stale = name == "_get_stale_trial_ids"
            method = _stale_trial_ids if stale else getattr(RDBStorage, name)  # looked up now
            return retrying(
                lambda: method(self, *args, **kwargs),
                self.retry_delays,
                telling=name == "set_trial_state_values",
            )

        return call

    namespace: dict[str, Any] = {name: retried(name) for name in _RETRIED}
    namespace["retry_delays"] = RETRY_DELAYS_S
    return type("EinfuseRDBStorage", (RDBStorage,), namespace)


def _stale_trial_ids(storage: Any, study_id: int) -> list[int]:
    """Optuna's stale trials, after giving each RUNNING trial without a heartbeat one now."""
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    with _create_scoped_session(storage.scoped_session) as session:
        orphans = [
            trial_id
            for (trial_id,) in session.query(models.TrialModel.trial_id).filter(
                models.TrialModel.study_id == study_id,
                models.TrialModel.state == TrialState.RUNNING,
                ~models.TrialModel.heartbeats.any(),
            )
        ]
    for trial_id in orphans:  # a worker beating it first is fine: Optuna ignores the clash
        RDBStorage.record_heartbeat(storage, trial_id)  # not retried here: the sweep is
    return RDBStorage._get_stale_trial_ids(storage, study_id)


def ask_quietly(study: optuna.Study) -> Any:
    """``study.ask()`` without Optuna's warning that a store's heartbeat is meant for
    ``optimize``: einfuse beats its asked trials itself (`Heartbeat`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        return study.ask()


def fail_stale(study: optuna.Study) -> None:
    """Fail the study's trials whose worker died (see the module docstring)."""
    import warnings

    import optuna

    beats = getattr(study._storage, "get_heartbeat_interval", lambda: None)  # Optuna's cache
    if beats():
        with warnings.catch_warnings():  # Optuna marks fail_stale_trials experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_alive_here(trial.user_attrs.get("worker", "")):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def is_alive_here(worker: str) -> bool:
    """False only for a worker (``host:pid``) of this host whose process is gone; a worker
    of another host, or none recorded, may be alive."""
    host, _, pid = worker.rpartition(":")
    return host != socket.gethostname() or not pid.isdigit() or process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Is process ``pid`` of this host alive (a zombie, killed but not reaped, is not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): os.kill's answer
        return True


class Heartbeat:
    """A daemon thread recording the heartbeat of the trials this process is measuring."""

    def __init__(self, storage: Any, interval_s: float) -> None:
        self.storage, self.interval_s = storage, interval_s
        self._trials: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, storage: Any) -> Heartbeat | None:
        """A heartbeat for ``storage``, or None where it keeps none (memory, journal)."""
        interval = getattr(storage, "heartbeat_interval", None)
        return cls(storage, interval) if interval else None

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        with self._lock:
            self._trials.add(trial_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
                self._thread.start()

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._trials.discard(trial_id)

    def _run(self) -> None:
        while not self._wake.wait(self.interval_s):
            with self._lock:
                trials = list(self._trials)
            for trial_id in trials:
                # a beat lost to a disconnect: the next one may land
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(trial_id)
