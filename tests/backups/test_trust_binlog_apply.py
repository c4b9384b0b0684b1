"""Binlog apply refuses what would be misread by the client tools (issue 12, items 11 and 16):
connection fields that could add lines to the option file, and database names that make
mariadb-binlog's `--rewrite-db=FROM->TO` ambiguous. Nothing is connected to or run."""

from __future__ import annotations

import subprocess

import pytest

from backups.engine.binlog_apply import apply_segments, client_command
from backups.engine.errors import EngineError
from backups.engine.mysql import Endpoint


def _apply(target: Endpoint, source_database: str = "orders", target_database: str = "orders__r1"):
    return apply_segments(
        target=target,
        source_database=source_database,
        target_database=target_database,
        stream="m0",
        segments=[],
        start_file="binlog.000001",
        start_pos=4,
        until=None,
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("host", "127.0.0.1\nplugin-dir=/tmp/evil"),
        ("host", "127.0.0.1 --init-command=x"),
        ("user", "root\n[client]\nlocal-infile=1"),
        ("password", "pw\nssl=0"),
        ("tls_ca", "/ca.pem\ninit-command=DROP DATABASE x"),
    ],
)
def test_connection_fields_that_would_add_option_file_lines_are_refused(fake_mysql, field, value):
    fake = fake_mysql()
    values = dict(name="side", host=fake.host, port=fake.port, user="root", password="pw")
    values[field] = value
    with pytest.raises(EngineError) as refused:
        _apply(Endpoint(**values))
    assert str(refused.value).startswith("refusing to apply binlogs to side:")
    assert fake.connections == 0


@pytest.mark.parametrize(
    "source, target", [("a->b", "a->b__r7"), ("orders", "x->y"), ("shop->eu", "shop")]
)
def test_database_names_with_an_arrow_are_refused_for_rewrite_db(fake_mysql, source, target):
    fake = fake_mysql()
    endpoint = Endpoint(name="side", host=fake.host, port=fake.port, user="root", password="pw")
    with pytest.raises(EngineError) as refused:
        _apply(endpoint, source, target)
    assert "--rewrite-db" in str(refused.value) and f"'{source}'" in str(refused.value)
    assert fake.connections == 0


@pytest.mark.parametrize("plugin", ["mysql_clear_password", "dialog"])
def test_the_mariadb_client_that_applies_binlogs_never_sends_a_cleartext_password(
    fake_mysql, tmp_path, plugin
):
    """The apply pipes SQL into the mariadb client, which (unlike PyMySQL) has no switch to
    refuse these plugins: it only gets a plugin directory without them."""
    fake = fake_mysql(auth_switch=plugin)
    target = Endpoint(name="side", host=fake.host, port=fake.port, user="root", password="pw-9")
    done = subprocess.run(
        client_command(target, str(tmp_path), "db"),
        input=b"SELECT 1;\n",
        capture_output=True,
        timeout=30,
    )
    assert done.returncode != 0 and b"could not be loaded" in done.stderr
    assert fake.handshakes, "the client never reached the fake server"
    assert all(received == b"" for received in fake.received_passwords)


def test_the_mariadb_client_still_connects_to_a_real_server(mariadb_servers, tmp_path):
    server = mariadb_servers[0]
    done = subprocess.run(
        client_command(server.endpoint, str(tmp_path), "mysql"),
        input=b"SELECT 40 + 2;\n",
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == b"42"
