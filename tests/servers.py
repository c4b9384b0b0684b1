"""Real servers for tests and benchmarks: extra MariaDB instances, moto's S3 server.

Each MariaDB instance gets its own datadir, a free loopback port, a binlog in ROW
format with FULL row image and full row metadata, and a distinct server_id, so a
test cluster really spans several servers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pymysql

from backups.engine.mysql import Endpoint, connect

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"


def _die_with_parent() -> None:
    """preexec_fn: the kernel kills the child when the process that started it dies.

    A test session that crashes or is killed must never leave mariadbd behind.
    """
    import ctypes
    import signal

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MariaDBServer:
    """One mariadbd process on 127.0.0.1 with its own datadir."""

    name: str
    server_id: int
    base_dir: Path
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def datadir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_path(self) -> Path:
        return self.base_dir / "mysqld.sock"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(name=self.name, host="127.0.0.1", port=self.port, user="root", password="")

    def install(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if (self.datadir / "mysql").exists():
            return
        subprocess.run(
            [
                INSTALL_DB,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
                # Own tmpdir: parallel installs sharing /tmp collide on temp table names.
                f"--tmpdir={self.base_dir}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self, timeout: float = 60) -> None:
        self.install()
        if not self.port:
            self.port = free_port()
        log = open(self.base_dir / "error.log", "ab")
        args = [
            MARIADBD,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.base_dir / 'mysqld.pid'}",
            "--bind-address=127.0.0.1",
            f"--port={self.port}",
            "--user=root",
            f"--server-id={self.server_id}",
            f"--log-bin={self.base_dir / 'data' / 'binlog'}",
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL",
            "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=64M",
            "--innodb-flush-log-at-trx-commit=2",
            "--sync-binlog=0",
            "--max-connections=200",
            "--local-infile=1",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            f"--tmpdir={self.base_dir}",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args, stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mariadbd {self.name} exited: {(self.base_dir / 'error.log').read_text()[-2000:]}"
                )
            try:
                connect(self.endpoint, connect_timeout=2).close()
                return
            except Exception:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"mariadbd {self.name} did not start within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server (to simulate a shard dropping)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def connect(self, database: str | None = None, **kwargs) -> pymysql.connections.Connection:
        return connect(self.endpoint, database, **kwargs)

    def execute(self, *statements: str, database: str | None = None) -> list[tuple]:
        """Run statements; return the rows of the last one."""
        conn = self.connect(database)
        try:
            rows: list[tuple] = []
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                    rows = list(cursor.fetchall())
            return rows
        finally:
            conn.close()


def start_servers(count: int, root: Path | None = None, prefix: str = "m") -> list[MariaDBServer]:
    """Start `count` instances in parallel-ish (install first, then start)."""
    root = root or Path(tempfile.mkdtemp(prefix="shardvault-mariadb-"))
    servers = [
        MariaDBServer(
            name=f"{prefix}{i + 1}", server_id=100 + i + 1, base_dir=root / f"{prefix}{i + 1}"
        )
        for i in range(count)
    ]
    for server in servers:
        server.base_dir.mkdir(parents=True, exist_ok=True)
    installs = [
        subprocess.Popen(
            [
                INSTALL_DB,
                "--no-defaults",
                f"--datadir={s.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
                f"--tmpdir={s.base_dir}",
            ],  # parallel installs sharing /tmp collide
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for s in servers
    ]
    for server, proc in zip(servers, installs, strict=True):
        if proc.wait() != 0:
            # A failed install leaves a half-made mysql schema; start() installs again.
            shutil.rmtree(server.datadir, ignore_errors=True)
    try:
        for server in servers:
            server.start(timeout=120)
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers


def stop_servers(servers: list[MariaDBServer], remove: bool = True) -> None:
    for server in servers:
        server.stop()
    if remove and servers:
        shutil.rmtree(servers[0].base_dir.parent, ignore_errors=True)


@dataclass
class MotoServer:
    """moto's S3 server mode in a subprocess, over HTTP on loopback."""

    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        import urllib.request

        self.port = self.port or free_port()
        env = dict(os.environ)
        self.process = subprocess.Popen(
            [
                env.get("SHARDVAULT_PYTHON", "python"),
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).read()
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
