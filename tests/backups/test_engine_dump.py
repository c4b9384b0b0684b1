"""Full-backup engine: chunk format, manifest contents, server-side checksums."""

from __future__ import annotations

import os

import pytest

from backups.engine import codec, wire
from backups.engine.checksum import table_checksum
from backups.engine.dump import dump_cluster
from backups.engine.mysql import quote_ident, quote_qualified
from tests.backups.conftest import WEIRD_TABLE, make_spec, read_manifest


def _dump(storage, shards, **overrides):
    events = []
    spec = make_spec(shards, **overrides)
    result = dump_cluster(spec, storage, progress=events.append, should_cancel=lambda: False)
    return spec, result, events


@pytest.fixture(params=["client", "server"])
def line_builder(request, monkeypatch):
    """Chunk lines built by the C helper from the raw columns, or by the server's SQL."""
    monkeypatch.setenv("SHARDVAULT_LINE_BUILDER", request.param)
    assert wire.line_builder() == request.param
    return request.param


def _chunk_bytes(storage, chunk, data_key=None) -> bytes:
    stored = storage.get_stream(
        chunk["key"], expect_sha256=chunk["sha256"], expect_size=chunk["stored_bytes"]
    )
    return b"".join(codec.decode(stored, data_key=data_key, aad=chunk["key"].encode()))


def test_full_backup_writes_a_manifest_that_describes_every_table(
    storage, hostile_database, line_builder
):
    server, database, expected_rows = hostile_database
    spec, result, events = _dump(storage, [("s1", server, database)])

    assert result.ok, result.error
    manifest = read_manifest(storage, spec)
    assert (
        manifest["format"] == 1
        and manifest["kind"] == "full"
        and manifest["consistency"] == "locked"
    )
    assert manifest["checksum_algorithm"]
    assert result.lock_window_ms is not None and manifest["lock_window_ms"] == result.lock_window_ms
    shard = manifest["shards"][0]
    assert shard["binlog_file"].startswith("binlog.") and shard["binlog_pos"] > 0
    assert shard["gtid"]  # MariaDB GTID of the cut
    tables = {t["name"]: t for t in shard["tables"]}
    assert {name: t["rows"] for name, t in tables.items()} == expected_rows
    assert [v["name"] for v in shard["views"]] == ["v_hostile"]
    assert [t["name"] for t in shard["triggers"]] == ["trg_no_pk"]
    assert [r["name"] for r in shard["routines"]] == ["twice"]

    hostile = tables["hostile"]
    assert (
        "g" not in hostile["columns"] and "gs" not in hostile["columns"]
    )  # generated columns left out
    assert hostile["primary_key"] == ["id"] and hostile["has_primary_key"]
    assert len(hostile["chunks"]) > 1  # 701 rows at 300 per chunk
    assert (
        tables["composite"]["primary_key"] == ["region", "id"]
        and len(tables["composite"]["chunks"]) > 1
    )
    assert tables["no_pk"]["has_primary_key"] is False and len(tables["no_pk"]["chunks"]) == 1
    assert tables["empty_table"]["rows"] == 0

    # every chunk object is stored, its sha256 matches, rows add up, and the checksum
    # recorded inside the snapshot equals a pure-SQL checksum of the (unchanged) source table
    for name, table in tables.items():
        rows = 0
        for chunk in table["chunks"]:
            data = _chunk_bytes(storage, chunk)
            assert len(data) == chunk["raw_bytes"]
            assert data.count(b"\n") >= chunk["rows"]
            rows += chunk["rows"]
        assert rows == table["rows"]
        conn = server.connect()
        try:
            assert table_checksum(conn, database, name, table["columns"]) == (
                table["rows"],
                table["checksum"],
            )
        finally:
            conn.close()
        schema = b"".join(
            storage.get_stream(table["schema_key"], expect_sha256=table["schema_sha256"])
        )
        assert schema.decode() == table["ddl"]
    assert manifest["totals"]["rows"] == sum(expected_rows.values()) == result.rows
    assert any(e.chunk for e in events) and any(e.rows_done for e in events)


def test_chunk_bytes_equal_select_into_outfile(storage, hostile_database, line_builder):
    """The chunk format is INTO OUTFILE's, byte for byte (FLOAT at full precision, BIT escaped:
    checksum.py), whoever builds the lines, and the table checksums agree with the server's."""
    server, database, _ = hostile_database
    server.execute(
        f"CREATE TABLE {quote_qualified(database, 'odd_types')} (id INT PRIMARY KEY,"
        " z INT(8) UNSIGNED ZEROFILL NULL, g GEOMETRY NULL, u UUID NULL, ip INET6 NULL,"
        " lt TEXT CHARACTER SET latin1 NULL, mb MEDIUMBLOB NULL, mt MEDIUMTEXT NULL,"
        " bt BIT(3) NULL, ch CHAR(3) NULL, dt DATE NULL, yr YEAR NULL)"
    )
    server.execute(
        f"INSERT INTO {quote_qualified(database, 'odd_types')} VALUES"
        " (1, 42, ST_GeomFromText('LINESTRING(0 0, 9 9)'), UUID(), '::1',"
        " CONCAT('caf', CHAR(233), CHAR(9), CHAR(10), CHAR(92), CHAR(0)),"
        " REPEAT(CONCAT(UNHEX('00095C0AFBFEFF'), 'x'), 20000), REPEAT('a\tb\n', 30000),"
        " b'101', 'ab', '2024-02-29', 2024),"
        " (2, NULL, NULL, NULL, NULL, '', '', '', b'000', '', NULL, NULL),"
        " (3, 0, ST_GeomFromText('POINT(1 2)'), NULL, '2001:db8::9', NULL, UNHEX('09'), NULL,"
        " NULL, NULL, '1000-01-01', 1901)"
    )
    spec, result, _ = _dump(storage, [("s1", server, database)], chunk_rows=10**6)
    assert result.ok, result.error
    tables = {t["name"]: t for t in read_manifest(storage, spec)["shards"][0]["tables"]}
    conn = server.connect(database)
    for name in ("hostile", "composite", WEIRD_TABLE, "no_pk", "odd_types"):
        rows, server_checksum = table_checksum(conn, database, name, tables[name]["columns"])
        assert (rows, server_checksum) == (tables[name]["rows"], tables[name]["checksum"]), name
    conn.close()
    for name in ("hostile", "composite", WEIRD_TABLE, "no_pk", "odd_types"):
        table = tables[name]
        assert len(table["chunks"]) == 1
        data = _chunk_bytes(storage, table["chunks"][0])
        conn = server.connect(database)
        with conn.cursor() as cur:
            cur.execute(
                "SELECT LOWER(DATA_TYPE), COLUMN_NAME FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
                (database, name),
            )
            types = dict((c, t) for t, c in cur.fetchall())
            select = ", ".join(
                {
                    "float": f"CAST({quote_ident(c)} AS DOUBLE)",
                    "bit": f"CAST({quote_ident(c)} AS BINARY)",
                    # MariaDB's UUID and INET6 are stored as their 16 bytes, which LOAD DATA
                    # reads back (OUTFILE would print the text form).
                    "uuid": f"CAST({quote_ident(c)} AS BINARY)",
                    "inet6": f"CAST({quote_ident(c)} AS BINARY)",
                }.get(types[c], quote_ident(c))
                for c in table["columns"]
            )
            path = os.path.join(server.datadir, f"outfile_{database}_{len(name)}.tsv")
            order = ", ".join(quote_ident(c) for c in table["primary_key"]) or "1"
            cur.execute(
                f"SELECT {select} INTO OUTFILE '{path}' CHARACTER SET binary"
                f" FROM {quote_qualified(database, name)} ORDER BY {order}"
            )
        conn.close()
        with open(path, "rb") as handle:
            outfile = handle.read()
        os.unlink(path)
        if table["primary_key"]:
            assert data == outfile, name
        else:
            assert sorted(data.split(b"\n")) == sorted(outfile.split(b"\n"))
    hostile = _chunk_bytes(storage, tables["hostile"]["chunks"][0])
    assert (
        b"\\N" in hostile
        and b"\\\\N" in hostile
        and b"\\\t" in hostile
        and b"\\\n" in hostile
        and b"\\0" in hostile
    )


def test_encrypted_backup_names_objects_enc_and_needs_the_key(storage, hostile_database):
    server, database, _ = hostile_database
    key = os.urandom(32)
    spec, result, _ = _dump(
        storage, [("s1", server, database)], data_key=key, key_id="k1", wrapped_key="w"
    )
    assert result.ok, result.error
    manifest = read_manifest(storage, spec)
    assert manifest["encryption"] == {
        "algorithm": "aes-256-gcm",
        "key_id": "k1",
        "wrapped_key": "w",
    }
    chunk = manifest["shards"][0]["tables"][0]["chunks"][0]
    assert chunk["key"].endswith(".tsv.zst.enc")
    assert _chunk_bytes(storage, chunk, data_key=key).count(b"\n") == chunk["rows"]


def test_non_innodb_table_is_refused_by_name_before_any_lock(storage, mariadb_servers, unique_name):
    server = mariadb_servers[1]
    database = f"myisam_{unique_name}"
    server.execute(f"CREATE DATABASE {quote_ident(database)}")
    try:
        server.execute("CREATE TABLE good (id INT PRIMARY KEY) ENGINE=InnoDB", database=database)
        server.execute("CREATE TABLE legacy (id INT PRIMARY KEY) ENGINE=MyISAM", database=database)
        spec, result, _ = _dump(storage, [("s1", server, database)])
        assert not result.ok
        assert "legacy (MyISAM)" in result.error and "InnoDB" in result.error
        assert result.shards[0].error and result.lock_window_ms is None
        assert list(storage.list(spec.set_prefix)) == []
    finally:
        server.execute(f"DROP DATABASE {quote_ident(database)}")


def test_lockfree_backup_records_snapshot_coordinates(storage, hostile_database):
    server, database, expected_rows = hostile_database
    spec, result, _ = _dump(storage, [("s1", server, database)], consistency="lockfree")
    assert result.ok, result.error
    assert result.lock_window_ms is None
    shard = read_manifest(storage, spec)["shards"][0]
    assert shard["binlog_file"] and shard["binlog_pos"] > 0 and shard["gtid"]
    assert {t["name"]: t["rows"] for t in shard["tables"]} == expected_rows
