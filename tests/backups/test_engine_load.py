"""Restore engine: schema from the manifest, chunks streamed back, proven by server-side checksums."""

from __future__ import annotations

import os
import socket

import pytest

from backups.engine.checksum import table_checksum
from backups.engine.dump import dump_cluster
from backups.engine.errors import EngineError, IntegrityError
from backups.engine.load import create_database_objects, load_table, recreate_database_objects
from backups.engine.mysql import Endpoint
from backups.engine.types import TableLoadJob
from tests.backups.conftest import WEIRD_TABLE, drop_database, make_spec, read_manifest


def _backup(storage, server, database, **overrides):
    spec = make_spec([("s1", server, database)], **overrides)
    result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
    assert result.ok, result.error
    return read_manifest(storage, spec)["shards"][0]


def _load_all(storage, shard, target, target_database, *, data_key=None, **kwargs):
    create_database_objects(target.endpoint, target_database, shard, tables=None)
    results = {}
    for table in shard["tables"]:
        job = TableLoadJob(
            manifest_table=table,
            target=target.endpoint,
            target_database=target_database,
            target_table=table["name"],
            data_key=data_key,
        )
        results[table["name"]] = load_table(
            job, storage, progress=lambda e: None, should_cancel=lambda: False, **kwargs
        )
    return results


def test_hostile_data_round_trips_onto_another_server(
    storage, hostile_database, mariadb_servers, unique_name
):
    server, database, expected = hostile_database
    shard = _backup(storage, server, database)
    target = mariadb_servers[2]
    target_database = f"restored_{unique_name}"
    try:
        done: list[tuple[str, int]] = []
        results = _load_all(
            storage, shard, target, target_database, on_chunk_done=lambda k, r: done.append((k, r))
        )
        for name, result in results.items():
            assert result.checksum_ok, result.error
            assert result.rows == expected[name]
        assert sum(rows for _, rows in done) == sum(expected.values())
        # spot-check values a user would look at (checksums already prove every byte)
        rows = target.execute(
            "SELECT s IS NULL, s, HEX(b), f, d, u, dc, ts, g FROM hostile WHERE id IN (0, 2, 4) ORDER BY id",
            database=target_database,
        )
        assert rows[0][:2] == (1, None) and rows[0][5] == 18446744073709551615 and rows[0][8] == 0
        assert (
            str(rows[0][6]) == "12345678901234567890123456789012345.123456789012345678901234567891"
        )
        assert rows[2][2] == "FF" * 8 and rows[2][4] == 0.30000000000000004
        assert target.execute(
            "SELECT LENGTH(bl) FROM hostile WHERE s = 'big'", database=target_database
        ) == [(3 * 1024 * 1024,)]
        assert target.execute(
            f"SELECT COUNT(*) FROM `{WEIRD_TABLE.replace('`', '``')}` WHERE id = 0",
            database=target_database,
        ) == [(1,)]
        recreate_database_objects(target.endpoint, target_database, shard)
        assert target.execute("SELECT COUNT(*), twice(3) FROM v_hostile", database=target_database)[
            0
        ] == (server.execute("SELECT COUNT(*) FROM v_hostile", database=database)[0][0], 6)
        target.execute("INSERT INTO no_pk (a) VALUES (9)", database=target_database)
        assert target.execute("SELECT b FROM no_pk WHERE a = 9", database=target_database) == [
            ("trg",)
        ]
    finally:
        drop_database(target, target_database)


def test_restore_into_renamed_table_refuses_non_empty_target(
    storage, hostile_database, unique_name
):
    server, database, expected = hostile_database
    shard = _backup(storage, server, database)
    target_database = f"{database}__r1"
    try:
        create_database_objects(
            server.endpoint,
            target_database,
            shard,
            tables=["composite"],
            table_renames={"composite": "composite_copy"},
        )
        table = next(t for t in shard["tables"] if t["name"] == "composite")
        job = TableLoadJob(
            manifest_table=table,
            target=server.endpoint,
            target_database=target_database,
            target_table="composite_copy",
        )
        result = load_table(
            job, storage, progress=lambda e: None, should_cancel=lambda: False, parallel=3
        )
        assert (
            result.checksum_ok
            and result.rows == expected["composite"]
            and result.chunks_loaded == len(table["chunks"])
        )
        with pytest.raises(EngineError, match="composite_copy.*not empty"):
            create_database_objects(
                server.endpoint,
                target_database,
                shard,
                tables=["composite"],
                table_renames={"composite": "composite_copy"},
            )
    finally:
        drop_database(server, target_database)


def test_resumed_load_skips_finished_chunks(storage, hostile_database, unique_name):
    server, database, expected = hostile_database
    shard = _backup(storage, server, database)
    table = next(t for t in shard["tables"] if t["name"] == "hostile")
    first = table["chunks"][0]["key"]
    target_database = f"resume_{unique_name}"
    try:
        create_database_objects(server.endpoint, target_database, shard, tables=["hostile"])
        job = TableLoadJob(
            manifest_table=dict(table, chunks=table["chunks"][:1]),
            target=server.endpoint,
            target_database=target_database,
            target_table="hostile",
        )
        partial = load_table(job, storage, progress=lambda e: None, should_cancel=lambda: False)
        assert not partial.checksum_ok  # only one chunk of several is in
        create_database_objects(
            server.endpoint, target_database, shard, tables=["hostile"], resume=True
        )
        full = TableLoadJob(
            manifest_table=table,
            target=server.endpoint,
            target_database=target_database,
            target_table="hostile",
        )
        result = load_table(
            full,
            storage,
            progress=lambda e: None,
            should_cancel=lambda: False,
            is_chunk_done=lambda key: key == first,
        )
        assert (
            result.checksum_ok and result.chunks_skipped == 1 and result.rows == expected["hostile"]
        )
    finally:
        drop_database(server, target_database)


def test_corrupt_object_fails_the_load_naming_it(storage, hostile_database, unique_name):
    server, database, _ = hostile_database
    shard = _backup(storage, server, database)
    table = next(t for t in shard["tables"] if t["name"] == "composite")
    victim = table["chunks"][1]["key"]
    path = storage.root / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    target_database = f"corrupt_{unique_name}"
    try:
        create_database_objects(server.endpoint, target_database, shard, tables=["composite"])
        job = TableLoadJob(
            manifest_table=table,
            target=server.endpoint,
            target_database=target_database,
            target_table="composite",
        )
        with pytest.raises(IntegrityError) as caught:
            load_table(
                job, storage, progress=lambda e: None, should_cancel=lambda: False, parallel=1
            )
        assert victim in str(caught.value)
        # the damaged chunk's rows were rolled back, never half-loaded
        loaded = server.execute("SELECT COUNT(*) FROM composite", database=target_database)[0][0]
        assert loaded % 300 == 0 or loaded < table["rows"]
    finally:
        drop_database(server, target_database)


def test_wrong_key_fails_clearly(storage, hostile_database, unique_name):
    server, database, _ = hostile_database
    key = os.urandom(32)
    shard = _backup(storage, server, database, data_key=key)
    table = next(t for t in shard["tables"] if t["name"] == "composite")
    target_database = f"wrongkey_{unique_name}"
    try:
        create_database_objects(server.endpoint, target_database, shard, tables=["composite"])
        job = TableLoadJob(
            manifest_table=table,
            target=server.endpoint,
            target_database=target_database,
            target_table="composite",
            data_key=os.urandom(32),
        )
        with pytest.raises(IntegrityError, match="wrong key"):
            load_table(job, storage, progress=lambda e: None, should_cancel=lambda: False)
        assert server.execute("SELECT COUNT(*) FROM composite", database=target_database) == [(0,)]
        good = TableLoadJob(
            manifest_table=table,
            target=server.endpoint,
            target_database=target_database,
            target_table="composite",
            data_key=key,
        )
        assert load_table(
            good, storage, progress=lambda e: None, should_cancel=lambda: False
        ).checksum_ok
    finally:
        drop_database(server, target_database)


def test_unreachable_target_is_an_engine_error_not_a_crash():
    """Restores catch EngineError; a server that went away must not escape as ConnectError."""

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again once the block ends: nothing listens
    gone = Endpoint(name="gone", host="127.0.0.1", port=port, user="root")
    shard = {"name": "s1", "database": "db", "tables": [], "views": [{"name": "v", "ddl": "x"}]}
    with pytest.raises(EngineError, match="cannot reach gone"):
        recreate_database_objects(gone, "db", shard, kinds=("views",))
    with pytest.raises(EngineError, match="cannot reach gone"):
        create_database_objects(gone, "db", shard, tables=None)


def test_checksum_of_a_table_missing_a_manifest_column_is_an_engine_error(hostile_database):
    """load_table's callers catch EngineError; a target without a backed-up column is one."""

    server, database, _rows = hostile_database
    conn = server.connect(database)
    try:
        with pytest.raises(EngineError, match="has no column"):
            table_checksum(conn, database, "no_pk", ["a", "b", "gone"])
    finally:
        conn.close()
