"""Shared pytest set-up: a hypothesis profile suited to CI on two cores."""

from hypothesis import HealthCheck, settings

# Cascade strategies build whole programs per example: slower than hypothesis expects,
# and timing-based deadlines flake under pytest-xdist.
settings.register_profile(
    "einfuse", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("einfuse")


# --------------------------------------------------------------------------- PostgreSQL
import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL cluster for this session (see `tests.pg_server`): FAILS, not skips,
    the tests that need it when it cannot start, and is stopped also when tests fail."""
    from tests.pg_server import PgServer

    server = PgServer()
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"cannot start a PostgreSQL server for the tests: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database on the session's server, as a ``postgresql+psycopg://`` URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = f"host=127.0.0.1 port={pg_server.port} user={pg_server.user} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return pg_server.url.rsplit("/", 1)[0] + f"/{name}"
