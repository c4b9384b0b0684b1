"""Issue 12, item 9: concurrent audit writers on a real PostgreSQL leave one unbroken chain.

The console runs in subprocesses against a throwaway PostgreSQL database (migrated the
ordinary way), so the writers are separate processes and threads with their own
connections, under PostgreSQL's default READ COMMITTED isolation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
THREADS = 3
EVENTS_PER_THREAD = 20

WRITER = """
import sys, threading, time
import django
django.setup()
from django.db import connection
from console.audit import audit_record

start_at, tag = float(sys.argv[1]), sys.argv[2]
threads, per = int(sys.argv[3]), int(sys.argv[4])

def work(n):
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(per):
        audit_record(actor="writer", action="test.concurrent", object_id=f"{tag}-{n}-{i}")
    connection.close()

workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
"""


@pytest.fixture
def postgres_console(postgres_server, tmp_path, redis_url):
    """Environment for console subprocesses on a freshly migrated PostgreSQL database."""
    database = postgres_server.create_database("sv_audit")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "console.settings",
        "DATABASE_URL": postgres_server.url(database),
        "SHARDVAULT_VAR_DIR": str(tmp_path / "var"),
        "REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
    }
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--no-input"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    try:
        yield env, postgres_server, database
    finally:
        postgres_server.drop_database(database)


def test_concurrent_audit_writers_on_postgresql_leave_one_unbroken_chain(
    postgres_console, tmp_path
):
    env, server, database = postgres_console
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    start_at = time.time() + 3  # every writer starts appending at the same instant
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(start_at),
                f"p{n}",
                str(THREADS),
                str(EVENTS_PER_THREAD),
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for n in range(PROCESSES)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=600)
        assert writer.returncode == 0, err[-2000:]

    with psycopg.connect(server.url(database)) as conn:
        total, distinct_prev, written = conn.execute(
            "SELECT count(*), count(DISTINCT prev_hash), "
            "count(*) FILTER (WHERE action = 'test.concurrent') FROM console_auditevent"
        ).fetchone()
    assert written == PROCESSES * THREADS * EVENTS_PER_THREAD
    assert distinct_prev == total, (
        f"{total - distinct_prev} events share a predecessor: the chain forked"
    )

    verify = subprocess.run(
        [sys.executable, "manage.py", "audit", "verify"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert "intact" in verify.stdout
