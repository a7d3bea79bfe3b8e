"""A real PostgreSQL (Debian's postgresql 15) for the sink tests: a private cluster.

:class:`PgCluster` runs ``initdb`` in a temporary directory and ``pg_ctl start``
on a free 127.0.0.1 port (and a unix socket in that directory), as ``nobody``
when the tests run as root (PostgreSQL refuses to run as root; ``runuser``
switches user).  ``fsync=off``: an immediate stop (``pg_ctl stop -m
immediate``, the tests' crash) still replays its WAL from the page cache.

The session fixture ``pg_cluster`` (tests/conftest.py) starts it once (initdb
takes a few seconds); ``pg_dsn`` gives each test a fresh database.  Tests skip only
when the binaries are absent.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import free_port

PG_BIN = Path(os.environ.get("DECNET_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_databases = itertools.count(1)


def pg_binaries() -> Path | None:
    if all(os.access(PG_BIN / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
        return PG_BIN
    return None


class PgCluster:
    """One private PostgreSQL cluster (see the module docstring)."""

    def __init__(self, binaries: Path):
        self.bin = binaries
        # Not under pytest's tmp_path: its directories are 0700 root's, closed to nobody.
        self.base = Path(tempfile.mkdtemp(prefix="decnet-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = free_port()
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user is not None:
            shutil.chown(self.base, self.user)
            os.chmod(self.base, 0o700)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, check=check, timeout=120
        )

    def initdb(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
            "-c fsync=off -c full_page_writes=off"
        )
        done = self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log),
            "-w",
            "start",
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{self.tail()}")

    def stop(self, mode: str = "immediate") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_bytes()[-size:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def destroy(self) -> None:
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False
        )
        shutil.rmtree(self.base, ignore_errors=True)
