"""Trust boundary of the one connection helper (issue 12, items 1, 11, 12): what `connect`
refuses to send, and how fast it gives up on a server that never answers."""

from __future__ import annotations

import time

import pytest

from backups.engine.errors import ConnectError
from backups.engine.mysql import Endpoint, connect


def _endpoint(server, **overrides) -> Endpoint:
    values = dict(
        name="fake", host=server.host, port=server.port, user="backup", password="stored-secret-pw"
    )
    values.update(overrides)
    return Endpoint(**values)


@pytest.mark.parametrize("plugin", ["mysql_clear_password", "dialog"])
def test_a_server_asking_for_a_cleartext_password_without_tls_gets_nothing(fake_mysql, plugin):
    server = fake_mysql(auth_switch=plugin)
    with pytest.raises(ConnectError) as refused:
        connect(_endpoint(server))
    assert server.received_passwords == []
    message = str(refused.value)
    assert "clear text" in message and "fake" in message and "\n" not in message


def test_a_silent_server_is_given_up_within_the_connect_timeout(fake_mysql):
    server = fake_mysql(mode="silent")
    started = time.monotonic()
    with pytest.raises(ConnectError) as refused:
        connect(_endpoint(server), connect_timeout=2)
    assert time.monotonic() - started < 10
    assert server.connections == 1
    assert "did not answer in time" in str(refused.value)
    assert "fake" in str(refused.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("host", "127.0.0.1\nssl-ca=/tmp/evil"),
        ("host", "db host"),
        ("user", "backup\n[client]"),
        ("password", "pw\nplugin-dir=/tmp"),
        ("tls_ca", "/etc/ca.pem\npassword=x"),
    ],
)
def test_control_characters_and_malformed_hosts_are_refused_before_connecting(
    fake_mysql, field, value
):
    server = fake_mysql()
    endpoint = _endpoint(server, **{field: value})
    with pytest.raises(ConnectError) as refused:
        connect(endpoint)
    assert server.connections == 0
    assert "refusing to connect to fake" in str(refused.value)


def test_a_query_connection_never_sends_a_local_file(fake_mysql):
    server = fake_mysql(queries="infile", infile_name="/proc/self/environ")
    conn = connect(_endpoint(server))
    with pytest.raises(Exception):  # noqa: B017 - PyMySQL refuses; any error will do here
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    conn.close()
    deadline = time.monotonic() + 5
    while not server.received_infile and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(received == b"" for received in server.received_infile)


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("SHARD_A_PW", True),
        ("ORDERS_PASSWORD", True),
        ("SHARDVAULT_DATA_KEY", False),
        ("SHARDVAULT_SECRET_PW", False),  # the denylist wins over the pattern
        ("DATABASE_URL", False),
        ("REDIS_URL", False),
        ("AWS_SECRET_ACCESS_KEY", False),
        ("AWS_DB_PW", False),
        ("S3_PASSWORD", False),
        ("HOME", False),
        ("A-B_PW", False),
    ],
)
def test_password_env_names_follow_the_pattern_and_the_denylist(name, allowed):
    from backups.engine.mysql import password_env_refusal

    assert (password_env_refusal(name, ["*_PW", "*_PASSWORD"]) is None) is allowed


def test_a_server_greeting_with_the_cleartext_plugin_gets_no_password_either(fake_mysql):
    server = fake_mysql(greeting_plugin="mysql_clear_password")
    with pytest.raises(ConnectError) as refused:
        connect(_endpoint(server))
    assert server.handshakes and server.handshakes[0]["auth_response"] == b""
    assert b"stored-secret-pw" not in repr(server.handshakes).encode()
    assert "clear text" in str(refused.value)
