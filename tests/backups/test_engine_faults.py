"""What a backup does when things go wrong: every failure is named, nothing is left locked."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pymysql
import pytest

from backups.engine.dump import dump_cluster
from backups.engine.errors import Cancelled
from backups.engine.mysql import quote_ident
from backups.engine.types import ShardSpec
from tests.backups.conftest import drop_database, make_spec, no_backup_sessions
from tests.servers import free_port


@pytest.fixture
def three_shards(mariadb_servers, unique_name):
    database = f"fault_{unique_name}"
    for server in mariadb_servers:
        drop_database(server, database)
        server.execute(f"CREATE DATABASE {quote_ident(database)}")
        server.execute(
            "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(60)) ENGINE=InnoDB", database=database
        )
        server.execute("CREATE TABLE other (id INT PRIMARY KEY) ENGINE=InnoDB", database=database)
        server.execute(
            "INSERT INTO t SELECT seq, REPEAT('v', 50) FROM seq_1_to_2000", database=database
        )
    yield database
    for server in mariadb_servers:
        drop_database(server, database)


def _shards(mariadb_servers, database):
    return [(f"s{i}", server, database) for i, server in enumerate(mariadb_servers)]


def _assert_released(mariadb_servers, database):
    """No global lock, no open snapshot, no running backup statement on any server."""
    for server in mariadb_servers:
        deadline = time.monotonic() + 5
        while no_backup_sessions(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert no_backup_sessions(server) == []
        conn = server.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION lock_wait_timeout = 1")
                cur.execute(
                    "INSERT INTO other VALUES (1) ON DUPLICATE KEY UPDATE id = id"
                )  # fails under FTWRL
        finally:
            conn.close()


def test_unreachable_shard_fails_by_name_before_locking_anything(
    storage, mariadb_servers, three_shards
):
    spec = make_spec(_shards(mariadb_servers, three_shards))
    dead = ShardSpec(
        name="s_dead",
        instance="dead",
        database=three_shards,
        endpoint=replace(mariadb_servers[0].endpoint, name="dead", port=free_port()),
    )
    spec = replace(spec, shards=[*spec.shards, dead])
    result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
    assert not result.ok
    assert "s_dead" in result.error and "unreachable" in result.error
    assert [s.error != "" for s in result.shards] == [False, False, False, True]
    assert result.lock_window_ms is None
    _assert_released(mariadb_servers, three_shards)


def test_server_refusing_statements_is_a_failed_backup_naming_it(
    storage, mariadb_servers, three_shards, unique_name
):
    """A server error right after connecting is a failed result, not an escaping exception."""
    server = mariadb_servers[0]
    user = f"lim_{unique_name}"[:32]
    # The connection's own init command is its one query; the next statement is refused.
    server.execute(
        f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw' WITH MAX_QUERIES_PER_HOUR 2",
        f"GRANT ALL ON *.* TO '{user}'@'%'",
    )
    spec = make_spec([("s0", server, three_shards)])
    endpoint = replace(server.endpoint, user=user, password="pw")
    spec = replace(spec, shards=[replace(spec.shards[0], endpoint=endpoint)])
    try:
        result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
    finally:
        server.execute(f"DROP USER '{user}'@'%'")
    assert not result.ok
    assert "max_queries_per_hour" in result.error and server.endpoint.address in result.error
    assert result.shards[0].error
    assert list(storage.list(spec.set_prefix + "/")) == []
    _assert_released(mariadb_servers, three_shards)


def test_cancel_mid_dump_releases_everything(storage, mariadb_servers, three_shards):
    server = mariadb_servers[1]
    server.execute(
        "CREATE TABLE big (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB",
        "INSERT INTO big SELECT seq, REPEAT('b', 90) FROM seq_1_to_300000",
        database=three_shards,
    )
    seen_chunk = threading.Event()

    def progress(event):
        if event.chunk:
            seen_chunk.set()

    spec = make_spec(
        _shards(mariadb_servers, three_shards), chunk_rows=2000, connections_per_instance=2
    )
    with pytest.raises(Cancelled):
        dump_cluster(spec, storage, progress=progress, should_cancel=seen_chunk.is_set)
    _assert_released(mariadb_servers, three_shards)
    assert (
        list(storage.list(spec.set_prefix + "/")) == []
    )  # a cancelled set leaves no objects behind


def test_lock_timeout_names_the_blocking_query_and_leaves_no_lock(
    storage, mariadb_servers, three_shards
):
    """A long write (a batch job) holds off FLUSH TABLES WITH READ LOCK; the backup gives up."""
    blocker_server = mariadb_servers[2]
    conn = blocker_server.connect(three_shards)
    blocker = threading.Thread(
        target=lambda: _run_quietly(conn, "UPDATE t SET v = IF(SLEEP(8), v, v) WHERE id = 1"),
        daemon=True,
    )
    blocker.start()
    time.sleep(0.3)
    try:
        spec = make_spec(
            _shards(mariadb_servers, three_shards), lock_wait_timeout=1, lock_retries=1
        )
        started = time.monotonic()
        result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
        assert not result.ok
        assert blocker_server.name in result.error and "SLEEP(8)" in result.error
        assert time.monotonic() - started < 7
    finally:
        with blocker_server.connect() as killer, killer.cursor() as cur:
            cur.execute(f"KILL {conn.thread_id()}")
        blocker.join(10)
    _assert_released(mariadb_servers, three_shards)


def _run_quietly(conn, sql):
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            cur.fetchall()
    except pymysql.err.MySQLError:
        pass


@pytest.mark.parametrize("change", ["drop", "alter"])
def test_table_changed_after_preflight_fails_that_table_by_name(
    storage, mariadb_servers, three_shards, change
):
    server = mariadb_servers[0]
    statement = "DROP TABLE t" if change == "drop" else "ALTER TABLE t ADD COLUMN extra INT"

    def progress(event):
        if event.stage == "locking":  # preflight is done, nothing is locked yet
            server.execute(statement, database=three_shards)

    spec = make_spec(_shards(mariadb_servers, three_shards))
    result = dump_cluster(spec, storage, progress=progress, should_cancel=lambda: False)
    assert not result.ok
    word = "dropped" if change == "drop" else "altered"
    assert f"table {three_shards}.t was {word} during the backup" in result.error
    assert result.shards[0].error and "s0" in result.error
    _assert_released(mariadb_servers, three_shards)


def test_instance_lost_mid_backup_fails_that_shard(storage, mariadb_servers, three_shards):
    victim = mariadb_servers[1]
    victim.execute(
        "CREATE TABLE big (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB",
        "INSERT INTO big SELECT seq, REPEAT('b', 90) FROM seq_1_to_300000",
        database=three_shards,
    )
    killed = threading.Event()

    def progress(event):
        if event.chunk and event.shard == "s1" and not killed.is_set():
            killed.set()
            # Every session on the instance dies at once, as when the server drops off the network.
            for (thread_id,) in victim.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
                " AND COMMAND NOT IN ('Daemon', 'Binlog Dump')"
            ):
                try:
                    victim.execute(f"KILL {thread_id}")
                except pymysql.err.MySQLError:
                    pass

    spec = make_spec(
        _shards(mariadb_servers, three_shards), chunk_rows=2000, connections_per_instance=2
    )
    result = dump_cluster(spec, storage, progress=progress, should_cancel=lambda: False)
    assert killed.is_set()
    assert not result.ok
    assert "s1" in result.error and victim.name in result.shards[1].error
    assert list(storage.list(spec.set_prefix + "/")) == []
    _assert_released(mariadb_servers, three_shards)


def test_missing_reload_privilege_suggests_lockfree(
    storage, mariadb_servers, three_shards, unique_name
):
    server = mariadb_servers[0]
    user = f"nr_{unique_name}"
    server.execute(
        f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'pw'",
        f"GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, PROCESS ON *.* TO '{user}'@'127.0.0.1'",
    )
    try:
        endpoint = replace(server.endpoint, user=user, password="pw")
        spec = make_spec([("s0", server, three_shards)])
        spec = replace(spec, shards=[replace(spec.shards[0], endpoint=endpoint)])
        result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
        assert (
            not result.ok and "RELOAD" in result.error and "--consistency lockfree" in result.error
        )
        lockfree = dump_cluster(
            replace(spec, consistency="lockfree", set_id=2, set_prefix="c1/2"),
            storage,
            progress=lambda e: None,
            should_cancel=lambda: False,
        )
        assert lockfree.ok, lockfree.error
        assert lockfree.rows == 2000
    finally:
        server.execute(f"DROP USER '{user}'@'127.0.0.1'")
    _assert_released(mariadb_servers, three_shards)


def test_storage_write_failure_is_reported(tmp_path, mariadb_servers, three_shards):
    from backups.storage.local import LocalStorage

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("x")
    spec = make_spec(_shards(mariadb_servers, three_shards))
    result = dump_cluster(
        spec,
        LocalStorage(blocked, fsync=False),
        progress=lambda e: None,
        should_cancel=lambda: False,
    )
    assert not result.ok and "c1/1/" in result.error
    _assert_released(mariadb_servers, three_shards)
