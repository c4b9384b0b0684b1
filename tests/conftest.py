"""Shared fixtures: real MariaDB instances, Redis, RQ workers, storage directories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.servers import MotoServer, free_port, start_servers, stop_servers

ROOT = Path(__file__).resolve().parent.parent
# Playwright's sync API runs an event loop in the test thread; Django's ORM must still work.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def _worker_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0


@pytest.fixture(scope="session")
def django_db_modify_db_settings(tmp_path_factory):
    """A file-based SQLite test database, so worker subprocesses can see committed data.

    It lives in pytest's temporary directory: SQLite's -wal/-shm files, which Django does not
    remove with the database, never pile up in var/.
    """
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        path = tmp_path_factory.mktemp("console-db") / f"test-{_worker_index()}.sqlite3"
        db.setdefault("TEST", {})["NAME"] = str(path)


@pytest.fixture(scope="session")
def mariadb_servers(tmp_path_factory):
    """Three MariaDB instances (binlog ROW/FULL, distinct server_id), shared by the session."""
    servers = start_servers(3, root=tmp_path_factory.mktemp("mariadb"))
    yield servers
    stop_servers(servers)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL (the one on 127.0.0.1:5432, or one this session starts); tests
    make their own throwaway databases on it (`create_database()`)."""
    from tests.pg_server import postgres_start

    server = postgres_start(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture
def unique_name():
    """A short unique suffix for database names, so tests never collide on shared servers."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server of this test session's own, on a free loopback port.

    Its own process (not a database number on the shared server) so concurrent test
    sessions and the developer's running console never take or flush each other's jobs.
    """
    import redis

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the test redis-server did not start") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(autouse=True)
def _isolated_settings(settings, tmp_path, redis_url):
    """Every test gets its own storage directory, an empty Redis and its own cache prefix.

    The Redis server is this test session's own; emptying it per test means no job, gate or
    connection slot an earlier test left behind is run or counted by a later one.
    """
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    settings.STORAGE_URL = f"file://{tmp_path / 'backups'}"
    for queue in settings.RQ_QUEUES.values():
        queue["URL"] = redis_url
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
            "KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
        }
    }
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    yield


@pytest.fixture
def run_jobs(redis_url):
    """Run every queued job now, in this process, with a real RQ SimpleWorker on real Redis."""
    import django_rq
    from rq import SimpleWorker

    def run(*queues: str) -> None:
        names = queues or ("default", "backups", "restores", "verify")
        qs = [django_rq.get_queue(name) for name in names]
        SimpleWorker(qs, connection=qs[0].connection).work(burst=True)

    return run


@pytest.fixture
def rq_worker_process(redis_url, settings, tmp_path):
    """Start a real `manage.py rqworker` subprocess against the test database and Redis.

    Tests using it must be `django_db(transaction=True)` so the worker sees committed rows.
    Returns a function that starts the worker and returns its Popen; `scheduler=True` starts
    it with `--with-scheduler` (RQ's scheduler, which runs scheduled and periodic jobs).
    """
    from django.db import connection

    started: list[subprocess.Popen] = []

    def start(*queues: str, scheduler: bool = False) -> subprocess.Popen:
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
                "REDIS_URL": redis_url,
                "STORAGE_URL": settings.STORAGE_URL,
                "SHARDVAULT_DATA_KEY": settings.SHARDVAULT_DATA_KEY,
                "SHARDVAULT_SECRET_KEY": settings.SECRET_KEY,
                "SHARDVAULT_EMAIL_BACKEND": "django.core.mail.backends.dummy.EmailBackend",
            }
        )
        names = queues or ("backups", "restores", "verify", "default")
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "manage.py"),
                "rqworker",
                *names,
                *(["--with-scheduler"] if scheduler else []),
            ],
            env=env,
            cwd=ROOT,
            stdout=open(tmp_path / f"worker-{len(started)}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        # The worker's children first (RQ puts its work horse in a process group of its own,
        # so killpg alone would miss a running job), then the worker's session (its
        # scheduler): none may outlive the test and take the next test's jobs or slots.
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server over HTTP on a free loopback port."""
    os.environ.setdefault("SHARDVAULT_PYTHON", sys.executable)
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_mysql():
    """Start fake MySQL servers (tests/fake_mysql.py): `fake_mysql(**options)` returns a
    started FakeMySQLServer; every one is stopped after the test."""
    from tests.fake_mysql import FakeMySQLServer

    started: list[FakeMySQLServer] = []

    def start(**options) -> FakeMySQLServer:
        server = FakeMySQLServer(**options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
