"""A throwaway PostgreSQL cluster for the tests that need a real server database.

`PgServer.start` runs ``initdb`` in a temporary folder and ``pg_ctl start`` on a free
loopback port; `stop` (``pg_ctl stop -m immediate``) ends it and removes the folder. The
``pg_url`` fixture (session-scoped, one cluster per pytest-xdist worker) stops it at the end
of the session, also when tests fail. The server dies with the process that started it
even when that one cannot stop it (SIGKILLed): a watchdog process (``python pg_server.py
watch OWNER_PID ROOT PORT``, in a session of its own) polls the owner and stops the server
and removes its folder once the owner is gone. As root (CI), where ``initdb`` refuses to
run, the server runs as the ``postgres`` system user (``runuser``), its folder chowned to
that user.

No mock stands in: a server that cannot start makes the tests that need it FAIL, naming why.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER_USER = "postgres"
WATCH_INTERVAL_S = 0.2


def pg_bin(name: str) -> str | None:
    """A PostgreSQL program: on PATH, else the newest Debian install (/usr/lib/postgresql)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return versions[-1] if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One cluster: its folder, port, and a ``postgresql+psycopg://`` URL to its database."""

    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        """A new cluster (nothing given), or the one at ``root`` on ``port`` (the watchdog)."""
        self.as_root = os.geteuid() == 0
        # as root the server user must reach the folder: not under a private $TMPDIR
        where = "/tmp" if self.as_root and Path("/tmp").is_dir() else None
        self.root = root or Path(tempfile.mkdtemp(prefix="einfuse-pg-", dir=where))
        self.data = self.root / "data"
        self.port = port or free_port()
        self.user = SERVER_USER if self.as_root else "einfuse"
        self.watchdog: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = list(argv)
        if self.as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def _program(self, name: str) -> str:
        found = pg_bin(name)
        if found is None:
            raise RuntimeError(
                f"PostgreSQL's {name} is not installed (not on PATH nor in "
                "/usr/lib/postgresql/*/bin): install it (Debian: apt-get install -y postgresql)"
            )
        return found

    def start(self) -> PgServer:
        if self.as_root:
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
            self.root.chmod(0o700)
        init = self._run(
            self._program("initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        self.pg_ctl("start")
        self.watchdog = subprocess.Popen(
            [sys.executable, __file__, "watch", str(os.getpid()), str(self.root), str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not killed with its owner's process group
        )
        return self

    def pg_ctl(self, action: str) -> None:
        """``start`` or ``stop`` the server (stop is immediate: a crash, for fault tests)."""
        ctl = self._program("pg_ctl")
        if action == "start":
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c max_connections=100"
            )
            log = str(self.root / "server.log")
            done = self._run(ctl, "-D", str(self.data), "-l", log, "-w", "-o", options, "start")
        else:
            done = self._run(ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        if done.returncode != 0:
            tail = self.log_tail()
            raise RuntimeError(f"pg_ctl {action} failed: {done.stderr.strip()} {tail}")
        if action == "start":
            self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not listen on port {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        log = self.root / "server.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.pg_ctl("stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self.watchdog is not None:  # it sees the folder gone and exits
                self.watchdog.wait(timeout=10)


def watch(owner: int, root: Path, port: int) -> None:
    """Stop the cluster at ``root`` once process ``owner`` is gone (unless stopped before)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from einfuse.autotune.store_server import process_alive

    server = PgServer(root, port)
    while server.root.exists() and process_alive(owner):
        time.sleep(WATCH_INTERVAL_S)
    if server.root.exists():
        server.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    watch(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
