"""Turning a database's low-level failure into a `StoreError` that names the store and says
what to do: a locked SQLite file, a corrupt one, a path that cannot hold a store (a folder
that is a file, a ``.db`` that is a folder, ``/proc``), a database URL whose driver is not
installed (the pip package to install), a database server that cannot be reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from einfuse.autotune.store_server import is_disconnect
from einfuse.errors import EinfuseError

DEFAULT_BUSY_TIMEOUT_S = 30.0
# Database drivers SQLAlchemy imports for a URL, and the pip package that provides each.
_DRIVERS = {
    "psycopg": "'einfuse[postgres]' (psycopg 3; or psycopg2-binary with postgresql+psycopg2://)",
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "asyncpg": "asyncpg",
    "MySQLdb": "mysqlclient (or pymysql with a mysql+pymysql:// URL)",
    "pymysql": "pymysql",
    "mysql": "mysql-connector-python",
    "oracledb": "oracledb",
    "pyodbc": "pyodbc",
}


class StoreError(EinfuseError):
    """The tuning store cannot be used (locked, corrupt, unreadable); says which and why."""


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (Optuna wraps database errors in its own)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def chain_message(exc: BaseException) -> str:
    """Every message of the chain, lower-cased: what the failure tests look for."""
    return " | ".join(str(e) for e in _chain(exc)).lower()


def _first_line(exc: BaseException) -> str:
    """A driver's message without SQLAlchemy's wrapping and hints: its first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(") ", 1)[1] if text.startswith("(") and ") " in text else text


@contextmanager
def storage_errors(where: str, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Iterator[None]:
    """Turn a database's low-level failure into a `StoreError` that names the store."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:  # a folder that is a file, a .db that is a folder, /proc, ...
        name = exc.filename or where
        if isinstance(exc, FileExistsError | NotADirectoryError):
            why = f"{name} is a file, not a folder"
        elif isinstance(exc, IsADirectoryError):
            why = f"{name} is a folder, not a file"
        else:
            why = f"{exc.strerror or exc}: {name}"
        raise StoreError(f"cannot use tuning store {where}: {why}; nothing was written") from exc
    except Exception as exc:
        chain = _chain(exc)
        missing = [e for e in chain if isinstance(e, ImportError) and e.name]
        if missing:
            driver = missing[-1].name
            raise StoreError(
                f"tuning store {where} needs the database driver {driver!r}, which is not "
                f"installed: pip install {_DRIVERS.get(driver, driver)}"
            ) from exc
        message = chain_message(exc)
        root = chain[-1]
        if is_disconnect(message):
            raise StoreError(
                f"cannot reach the tuning database {where} ({_first_line(root)}); is the "
                "server up? Finished trials stay stored there: run the same command again "
                "to continue."
            ) from exc
        if "database is locked" in message or "database table is locked" in message:
            raise StoreError(
                f"tuning store {where} stayed locked by another process for "
                f"{busy_timeout_s:g} s. SQLite is not for parallel writers: for several "
                "processes use --storage journal:PATH (file-based, safe), or a server database "
                "URL for many machines. No trial was lost."
            ) from exc
        corrupt = ("file is not a database", "malformed", "invalid log format", "corrupt")
        bad_json = [e for e in chain if isinstance(e, json.JSONDecodeError)]
        if bad_json or any(text in message for text in corrupt):
            shown = bad_json[0] if bad_json else root
            raise StoreError(
                f"tuning store {where} is corrupt ({type(shown).__name__}: {shown}); it was "
                "left untouched. Move it aside or pass another --storage."
            ) from exc
        if "no longer compatible with the table schema" in message:
            raise StoreError(
                f"tuning store {where} has tables of an older Optuna ({_first_line(root)}); "
                f"back it up, then upgrade it: optuna storage upgrade --storage URL"
            ) from exc
        if any(type(e).__module__.startswith("sqlalchemy") for e in chain):
            raise StoreError(f"tuning store {where}: {type(root).__name__}: {root}") from exc
        raise
