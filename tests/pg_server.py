"""A real PostgreSQL for tests: the one running on 127.0.0.1:5432 (trust auth, user postgres),
or else one of our own started from Debian's `postgresql` binaries on a free loopback port,
the way tests/servers.py starts MariaDB. Each session works in throwaway databases."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _binary(name: str) -> str:
    found = shutil.which(name) or str(PG_BIN / name)
    if not os.path.exists(found):
        raise RuntimeError(f"{name} is missing: install Debian's postgresql package")
    return found


def _accepts(port: int) -> bool:
    import psycopg

    try:
        psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=3
        ).close()
    except psycopg.OperationalError:
        return False
    return True


@dataclass
class PostgresServer:
    port: int
    datadir: Path | None = None  # set when this session started the server itself

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def create_database(self, prefix: str = "sv_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.datadir is not None:
            subprocess.run(
                _as_server_user(
                    [_binary("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]
                ),
                capture_output=True,
                check=False,
            )
            if os.geteuid() == 0:
                shutil.rmtree(self.datadir.parent, ignore_errors=True)


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` account then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def postgres_start(root: Path, *, use_running: bool = True) -> PostgresServer:
    """The running server on 5432 when it accepts user postgres, else a new one under `root`."""
    if use_running and _accepts(5432):
        return PostgresServer(port=5432)
    if os.geteuid() == 0:
        # pytest's temporary directories are private to root; the postgres account needs its own.
        root = Path(tempfile.mkdtemp(prefix="sv-postgres-"))
        root.chmod(0o755)
        shutil.chown(root, user="postgres")
    root.mkdir(parents=True, exist_ok=True)
    datadir = root / "pgdata"
    subprocess.run(
        _as_server_user(
            [_binary("initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        ),
        capture_output=True,
        check=True,
    )
    port = free_port()
    subprocess.run(
        _as_server_user([
            _binary("pg_ctl"), "-D", str(datadir), "-l", str(root / "postgres.log"), "-w",
            "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start",
        ]),
        capture_output=True,
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not _accepts(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start on port {port}; see {root}/postgres.log")
        time.sleep(0.2)
    return PostgresServer(port=port, datadir=datadir)
