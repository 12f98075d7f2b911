"""One lock per study, across processes and machines, around claiming a measured candidate.

Workers claiming candidates one at a time under this lock make the study's total exact: a
worker counts what the study holds (finished and being measured), and only below
``--trials`` asks for a new trial and claims its candidate, before anyone else counts again
(`MeasuredSearch.top_up`). Without it, workers counting at once each top the study up and
overshoot it by up to a batch each.

- PostgreSQL: a session advisory lock (``pg_advisory_lock``) on a connection of its own, so
  a worker that dies (its connection gone) or a server that restarts releases it.
- SQLite and journal files (one machine): ``flock`` on a file beside the store, released by
  the kernel when its process dies.
- memory: one process, nothing to share. Other database servers (MySQL, ...): no lock; the
  claims still never measure a candidate twice (`shares.claimed_elsewhere`), but workers
  counting at once can each add one candidate more than ``--trials``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

StudyLock = Callable[[str], AbstractContextManager[None]]


def lock_key(study_name: str) -> int:
    """A stable signed 64-bit key for ``study_name`` (PostgreSQL's advisory lock space)."""
    digest = hashlib.sha256(f"einfuse:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def study_lock(storage: Any, url: str) -> StudyLock:
    """The lock of each study of ``storage`` (opened from ``url``; see the module docstring)."""
    if url.startswith("journal:"):
        return _file_lock(Path(url.removeprefix("journal:")))
    engine = getattr(storage, "engine", None)
    dialect = engine.dialect.name if engine is not None else ""
    if dialect == "postgresql":
        return lambda name: _advisory_lock(engine, lock_key(name))
    if dialect == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        return _file_lock(Path(engine.url.database))
    return lambda name: contextlib.nullcontext()


def _file_lock(store: Path) -> StudyLock:
    lock_file = store.with_name(f"{store.name}-einfuse.lock")

    @contextlib.contextmanager
    def hold(name: str) -> Iterator[None]:
        # one file for every study of the store: claims are milliseconds, contention is rare
        with open(lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return hold


@contextlib.contextmanager
def _advisory_lock(engine: Any, key: int) -> Iterator[None]:
    """Hold PostgreSQL's advisory lock ``key``; taking it waits out a server restart."""
    import sqlalchemy

    from einfuse.autotune.store_server import retrying

    def take() -> Any:
        connection = engine.connect()
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except BaseException:
            connection.close()
            raise
        return connection

    connection = retrying(take)
    try:
        yield
    finally:
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            connection.close()
        except Exception:
            # a server that restarted released it already; else closing the connection for
            # good (not back to the pool, still holding it) releases it
            with contextlib.suppress(Exception):
                connection.invalidate()
