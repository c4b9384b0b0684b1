"""Helpers for topology tests: write topology files for the real test servers, run manage.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def topology_yaml(servers, *, cluster: str, databases: list[str], password_env: str = "") -> str:
    """A topology file: one instance per server (`m0`, `m1`, ...), shards spread round-robin."""
    lines = ["clusters:", f"  - name: {cluster}", "    shard_key: user_id", "    instances:"]
    for index, server in enumerate(servers):
        extra = f", password_env: {password_env}" if password_env else ""
        lines.append(
            f"      - {{name: m{index}, host: 127.0.0.1, port: {server.port}, user: root{extra}}}"
        )
    lines.append("    shards:")
    for index, database in enumerate(databases):
        lines.append(
            f"      - {{name: s{index:02d}, instance: m{index % len(servers)}, database: {database}}}"
        )
    lines += ["    logical_tables:", '      - {name: t_order, pattern: "t_order_[0-9]+"}']
    return "\n".join(lines) + "\n"


@pytest.fixture
def manage(settings, redis_url):
    """Run `manage.py ARGS` in a subprocess against the test database; returns CompletedProcess.

    Needs `django_db(transaction=True)` so the subprocess sees committed rows.
    """

    def run(*args: str, stdin: str | None = None, extra_env: dict | None = None):
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
                "REDIS_URL": redis_url,
                "SHARDVAULT_DATA_KEY": settings.SHARDVAULT_DATA_KEY,
                "SHARDVAULT_SECRET_KEY": settings.SECRET_KEY,
                **(extra_env or {}),
            }
        )
        return subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )

    return run
