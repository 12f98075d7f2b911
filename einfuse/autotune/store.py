"""Where tuning results live: Optuna storage, best records, JSON export and import.

Studies are named after their `TuningKey` (see `key`), so a lookup never crosses keys.

Storage is any Optuna storage: a local SQLite file by default (with a busy timeout, because
SQLite is not for parallel writers), ``journal:PATH`` for Optuna's file-based JournalStorage
(safe for several processes on one machine), ``memory`` for nothing persistent, or any
database URL Optuna accepts for many machines: ``postgresql://user:pw@host/db`` with
``pip install einfuse[postgres]`` (see `store_server`). A locked or corrupt store raises
`StoreError` naming the file; nothing here ever deletes a trial or a file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from einfuse.autotune.key import SCHEMA, TuningKey
from einfuse.autotune.store_errors import DEFAULT_BUSY_TIMEOUT_S, StoreError, storage_errors
from einfuse.autotune.store_locks import study_lock
from einfuse.autotune.store_server import (
    DEFAULT_HEARTBEAT_S,
    Heartbeat,
    einfuse_rdb_storage,
    engine_kwargs,
    server_url,
)

if TYPE_CHECKING:
    import optuna


KEY_ATTR = "einfuse_key"  # study user attr: the full key, so a study explains itself
BEST_ATTR = "einfuse_best"  # study user attr: the chosen candidate (a `BestRecord` dict)
RACE_ATTR = "einfuse_race"  # study user attr: the final race's rows (`RaceResult.rows`)
IMPORTED_ATTR = "einfuse_imported"  # study user attr: the best came from a JSON import
_SQLITE_MAGIC = b"SQLite format 3\x00"


# --------------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True)
class BestRecord:
    """The chosen candidate of one key: enough to replay it without tuning."""

    key: TuningKey
    pipeline: str
    schedule: str  # the Schedule's text form
    params: dict[str, Any] = field(default_factory=dict)
    objective: str = "model"
    predicted_s: float | None = None
    measured_s: float | None = None  # measured: the chosen candidate's median in the final race
    default_s: float | None = None  # measured: the default's median in that same race
    hlo: str | None = None  # measured: `hlo_fingerprint` of the chosen program

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = self.key.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BestRecord:
        """A stored record; one written by an einfuse with another record layout (the key's
        ``schema``) is named, never misread."""
        fields = dict(data)
        fields["key"] = TuningKey.from_dict(fields["key"])
        if fields["key"].schema != SCHEMA:
            raise StoreError(
                f"the tuning record of cascade {fields['key'].fingerprint} has schema "
                f"{fields['key'].schema}, this einfuse reads {SCHEMA}: it was written by "
                "another einfuse version; tune again, or read it with that version"
            )
        return cls(**fields)


# --------------------------------------------------------------------------- storage
def default_storage_path() -> Path:
    """``$XDG_CACHE_HOME/einfuse/tuning.db``, else ``~/.cache/einfuse/tuning.db``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "einfuse" / "tuning.db"


def _sqlite_file(url: str) -> Path | None:
    """The file behind an ``sqlite:///path`` URL (None for in-memory SQLite)."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def _check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not an SQLite database before SQLAlchemy touches it."""
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        head = handle.read(len(_SQLITE_MAGIC))
    if head != _SQLITE_MAGIC:
        raise StoreError(
            f"tuning store {path} is not an SQLite database (corrupt, or another kind of "
            "file); it was left untouched. Move it aside or pass another --storage."
        )


def describe_storage(storage: str | None) -> str:
    """What a storage argument names, for messages: a file path or the URL (no password)."""
    if storage is None:
        return str(default_storage_path())
    if storage.startswith("journal:"):
        return storage.removeprefix("journal:")
    if storage.startswith("sqlite"):
        path = _sqlite_file(storage)
        return str(path) if path is not None else storage
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", storage)


def storage_url(storage: str | None) -> str:
    """Normalize a storage argument: None -> the default SQLite file, a ``.db`` path -> URL."""
    if storage is None:
        return f"sqlite:///{default_storage_path()}"
    if "://" in storage:
        return server_url(storage)
    if storage.startswith("journal:") or storage == "memory":
        return storage
    if storage.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{Path(storage).resolve()}"
    if storage.endswith((".log", ".jsonl", ".journal")):
        return f"journal:{storage}"
    raise StoreError(
        f"storage {storage!r} is neither a URL (sqlite:///file.db, postgresql://...), "
        "journal:PATH, memory, nor a path ending in .db or .log"
    )


def storage_exists(storage: str | None) -> bool:
    """False for a store file (SQLite, journal) that does not exist yet: nothing to look up."""
    if storage is not None and storage.endswith(".json"):
        return True  # an export to replay: reading it says whether it is there
    url = storage_url(storage)
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:")).exists()
    path = _sqlite_file(url) if url.startswith("sqlite") else None
    return path is None or path.exists()


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs every study and trial at INFO; our progress bar and tables say enough."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def open_storage(
    storage: str | optuna.storages.BaseStorage | None = None,
    *,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
) -> optuna.storages.BaseStorage:
    """An Optuna storage for a storage argument (see the module docstring for the forms).

    Database storages keep heartbeats every ``heartbeat_s`` seconds (see `store_server`).
    """
    import optuna

    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = storage_url(storage)
    where = describe_storage(storage)
    if url == "memory":
        return optuna.storages.InMemoryStorage()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        with storage_errors(where, busy_timeout_s):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise IsADirectoryError(21, "Is a directory", str(path))
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = engine_kwargs(url)
    with storage_errors(where, busy_timeout_s):
        if url.startswith("sqlite"):
            path = _sqlite_file(url)
            kwargs = {"connect_args": {"timeout": busy_timeout_s}}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                _check_sqlite_file(path)
                kwargs = {"creator": functools.partial(sqlite_connect, path, busy_timeout_s)}
        return _rdb_storage(url, kwargs, heartbeat_s)


def sqlite_connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection that waits ``busy_timeout_s`` for locks, in write-ahead-log mode.

    WAL lets readers work while one process writes and needs fewer syncs per commit; like
    SQLite itself, it needs a local file system (not NFS).
    """
    connection = sqlite3.connect(path, timeout=busy_timeout_s)
    connection.execute("PRAGMA journal_mode=WAL")
    return connection


def _rdb_storage(url: str, kwargs: dict[str, Any], heartbeat_s: int) -> optuna.storages.RDBStorage:
    """RDBStorage, retried when another process was creating the same new database.

    Two processes opening one new SQLite file both create its tables; the loser fails on
    Optuna's schema-version row. By the retry the winner has finished, and nothing is lost.
    """
    import warnings

    import optuna

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # Optuna marks heartbeats experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return einfuse_rdb_storage()(
                    url, engine_kwargs=kwargs, heartbeat_interval=max(1, int(heartbeat_s))
                )
        except Exception as exc:
            racing = "alembic_version" in str(exc) or "already exists" in str(exc)
            if not racing or attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


class TuningStore:
    """Studies and best records in one storage, every access guarded by `storage_errors`."""

    def __init__(
        self,
        storage: str | optuna.storages.BaseStorage | None = None,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        heartbeat_s: int = DEFAULT_HEARTBEAT_S,
    ) -> None:
        self.where = (
            describe_storage(storage)
            if storage is None or isinstance(storage, str)
            else (type(storage).__name__)
        )
        self.busy_timeout_s = busy_timeout_s
        self._json_records: dict[str, BestRecord] | None = None
        if isinstance(storage, str) and storage.endswith(".json"):
            self._json_records = {r.key.digest(): r for r in read_best_file(storage)}
            storage = "memory"  # replay only: nothing tuned here is kept
        with self.guard():
            self.storage = open_storage(
                storage, busy_timeout_s=busy_timeout_s, heartbeat_s=heartbeat_s
            )
        self.heartbeat = Heartbeat.of(self.storage)
        # claiming a measured candidate, one worker at a time (`store_locks`)
        url = storage_url(storage) if storage is None or isinstance(storage, str) else ""
        self.lock = study_lock(self.storage, url)

    def guard(self) -> Any:
        """Context manager: low-level database failures become `StoreError` naming the store."""
        return storage_errors(self.where, self.busy_timeout_s)

    def study(
        self,
        name: str,
        key: TuningKey | None = None,
        sampler: Any = None,
        directions: Sequence[str] | None = None,
    ) -> optuna.Study:
        """Create or load a study (several processes may race to create it: both succeed);
        ``directions`` for a multi-objective one (a loaded study keeps its own)."""
        import optuna

        with self.guard(), quiet_optuna():
            try:
                study = optuna.create_study(
                    storage=self.storage,
                    study_name=name,
                    sampler=sampler,
                    directions=directions,
                    load_if_exists=True,
                )
            except optuna.exceptions.DuplicatedStudyError:  # lost a creation race
                study = optuna.load_study(study_name=name, storage=self.storage, sampler=sampler)
            if key is not None and KEY_ATTR not in study.user_attrs:
                study.set_user_attr(KEY_ATTR, key.to_dict())
        return study

    def find_study(self, name: str, sampler: Any = None) -> optuna.Study | None:
        import optuna

        with self.guard():
            if name not in optuna.get_all_study_names(self.storage):
                return None
            return optuna.load_study(study_name=name, storage=self.storage, sampler=sampler)

    def best(
        self, key: TuningKey, kinds: Sequence[str] = ("measured", "model")
    ) -> BestRecord | None:
        """The stored choice for ``key``: from the first study of ``kinds`` that has one (by
        default a measured one if any, else the model's)."""
        if self._json_records is not None and key.digest() in self._json_records:
            return self._json_records[key.digest()]
        for kind in kinds:
            study = self.find_study(key.study_name(kind))
            if study is None:
                continue
            with self.guard():
                data = study.user_attrs.get(BEST_ATTR)
            if data is not None:
                return BestRecord.from_dict(data)
        return None

    def save_best(self, study: optuna.Study, record: BestRecord) -> None:
        with self.guard():
            study.set_user_attr(BEST_ATTR, record.to_dict())

    def studies(self) -> list[dict[str, Any]]:
        """One row per study: name, trials, and the best record when there is one."""
        import optuna

        with self.guard():
            summaries = optuna.get_all_study_summaries(self.storage, include_best_trial=False)
        rows = []
        for s in sorted(summaries, key=lambda s: s.study_name):
            best = s.user_attrs.get(BEST_ATTR)
            rows.append({"study": s.study_name, "trials": s.n_trials, "best": best})
        return rows

    def records(self) -> list[BestRecord]:
        return [BestRecord.from_dict(row["best"]) for row in self.studies() if row["best"]]

    def export_best(self, path: str | Path) -> int:
        """Write every best record as JSON; returns how many."""
        records = self.records()
        write_best_file(path, records)
        return len(records)

    def import_best(self, path: str | Path) -> int:
        """Store the records of a JSON file as the best of their keys (trials stay untouched)."""
        records = read_best_file(path)
        for record in records:
            kind = "model" if record.objective == "model" else "measured"
            study = self.study(record.key.study_name(kind), record.key)
            self.save_best(study, record)
            with self.guard():
                study.set_user_attr(IMPORTED_ATTR, True)
        return len(records)


_FILE_FORMAT = "einfuse-tuning"


def write_best_file(path: str | Path, records: list[BestRecord]) -> None:
    data = {"format": _FILE_FORMAT, "version": 1, "records": [r.to_dict() for r in records]}
    try:
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise StoreError(f"cannot write tuning records to {path}: {exc.strerror or exc}") from exc


def read_best_file(path: str | Path) -> list[BestRecord]:
    """Records of a file written by `export_best`; a wrong file raises naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise StoreError(f"cannot read tuning records {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise StoreError(f"tuning records {path} are not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _FILE_FORMAT:
        raise StoreError(f"{path} is not an einfuse tuning export (no format={_FILE_FORMAT!r})")
    try:
        return [BestRecord.from_dict(r) for r in data["records"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"tuning records {path} are malformed: {exc!r}") from exc


def export_best(path: str | Path, storage: str | None = None) -> int:
    """Export every best record of ``storage`` (default: the per-user SQLite file) to JSON."""
    return TuningStore(storage).export_best(path)


def import_best(path: str | Path, storage: str | None = None) -> int:
    """Import a JSON export into ``storage``, so lookups replay it without tuning."""
    return TuningStore(storage).import_best(path)
