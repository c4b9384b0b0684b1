"""Raw binlog capture and apply, on real MariaDB servers with ROW binlogs (engine level)."""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime

import pytest

from backups.engine import codec
from backups.engine.binlog import master_status
from backups.engine.binlog_apply import SegmentSource, apply_segments
from backups.engine.capture import StoredObject, capture_instance
from backups.engine.checksum import table_checksum
from backups.engine.errors import EngineError
from backups.engine.mysql import quote_ident


@pytest.fixture
def segment_store(storage):
    """Store segments the way incrementals do: zstd (and AES-GCM when a key is given)."""

    def make(data_key=None):
        def store(key, chunks):
            raw = [0]

            def counted():
                for chunk in chunks:
                    raw[0] += len(chunk)
                    yield chunk

            stored = storage.put_stream(
                key, codec.encode(counted(), level=1, data_key=data_key, aad=key.encode())
            )
            return StoredObject(key, raw[0], stored.size, stored.sha256)

        return store

    return make


def read_segment(storage, segment, data_key=None) -> bytes:
    stored = storage.get_stream(segment.key, expect_sha256=segment.sha256)
    return b"".join(codec.decode(stored, data_key=data_key, aad=segment.key.encode()))


def sources(storage, segments, data_key=None):
    return [
        SegmentSource(
            entry=s.manifest_entry(),
            open=lambda s=s: codec.decode(
                storage.get_stream(s.key, expect_sha256=s.sha256),
                data_key=data_key,
                aad=s.key.encode(),
            ),
        )
        for s in segments
    ]


def checksums(server, database, tables):
    conn = server.connect(database)
    try:
        return {t: table_checksum(conn, database, t) for t in tables}
    finally:
        conn.close()


def test_capture_is_byte_identical_to_the_servers_binlog_and_indexes_tables(
    mariadb_servers, unique_name, storage, segment_store, tmp_path
):
    server = mariadb_servers[0]
    db = f"cap_{unique_name}"
    server.execute(f"CREATE DATABASE {quote_ident(db)}")
    server.execute(
        "CREATE TABLE t (id INT PRIMARY KEY, v VARBINARY(300), d DECIMAL(65,30), j JSON)",
        "CREATE TABLE other (id INT PRIMARY KEY)",
        database=db,
    )
    start_file, start_pos, _ = master_status(server.endpoint)
    server.execute(
        "INSERT INTO t VALUES (1, 0x00FF5C0A09, 12345678901234567890.123456789012345678901234567890,"
        ' \'{"k": "\\\\N"}\'), (2, NULL, -0.000000000000000000000000000001, NULL)',
        "INSERT INTO other VALUES (7)",
        database=db,
    )
    server.execute("FLUSH BINARY LOGS")
    server.execute(
        "UPDATE t SET v = 'x' WHERE id = 2", "ALTER TABLE t ADD COLUMN c INT", database=db
    )
    end_file, end_pos, end_gtid = master_status(server.endpoint)
    key = bytes(range(32))

    capture = capture_instance(
        endpoint=server.endpoint,
        instance=server.name,
        start_file=start_file,
        start_pos=start_pos,
        end_file=end_file,
        end_pos=end_pos,
        end_gtid=end_gtid,
        set_prefix="c/9",
        store=segment_store(key),
        server_id=3_999_000_001,
        encrypted=True,
    )

    assert [s.first_file for s in capture.segments] == [start_file, end_file]
    assert capture.segments[0].key == f"c/9/binlog/{server.name}/{start_file}.1.zst.enc"
    assert capture.segments[-1].last_pos == end_pos
    assert capture.segments[0].first_pos == start_pos
    for segment in capture.segments:
        data = read_segment(storage, segment, key)
        assert data[:4] == b"\xfebin"
        fde_len = int.from_bytes(data[13:17], "little")
        on_disk = (server.datadir / segment.first_file).read_bytes()
        # Every event in range, byte for byte as the server wrote it.
        assert data[4 + fde_len :] == on_disk[segment.first_pos : segment.last_pos]
        assert segment.events > 0 and segment.first_event_at and segment.last_event_at
        assert segment.first_gtid and segment.last_gtid
    assert f"{db}.t" in capture.segments[0].tables and f"{db}.other" in capture.segments[0].tables
    assert f"{db}.t" in capture.segments[1].tables and f"{db}.*" in capture.segments[1].tables

    # ... and identical to what the server's own tool copies over the same protocol.
    first = capture.segments[0]
    out = tmp_path / "raw"
    out.mkdir()
    subprocess.run(
        [
            "mariadb-binlog",
            "--no-defaults",
            "--read-from-remote-server",
            "--raw",
            f"--host={server.endpoint.host}",
            f"--port={server.endpoint.port}",
            "--user=root",
            f"--start-position={first.first_pos}",
            f"--result-file={out}/",
            first.first_file,
        ],
        check=True,
        capture_output=True,
    )
    tool = (out / first.first_file).read_bytes()
    assert read_segment(storage, first, key) == tool[: len(read_segment(storage, first, key))]
    # The segment is a binlog file mariadb-binlog reads directly.
    plain = tmp_path / "segment.bin"
    plain.write_bytes(read_segment(storage, first, key))
    decoded = subprocess.run(
        ["mariadb-binlog", "--no-defaults", str(plain)], capture_output=True, check=True
    )
    assert b"Write_rows" in decoded.stdout


def purge_binlogs(server) -> None:
    """Rotate and purge every older binlog (the server keeps one until InnoDB checkpoints it)."""
    server.execute("FLUSH BINARY LOGS")
    current = server.execute("SHOW MASTER STATUS")[0][0]
    deadline = time.monotonic() + 30
    while len(server.execute("SHOW BINARY LOGS")) > 1:
        assert time.monotonic() < deadline, "the server kept its old binlogs"
        server.execute(f"PURGE BINARY LOGS TO '{current}'")
        time.sleep(0.2)


def test_purged_start_fails_saying_a_new_full_backup_is_needed(mariadb_servers, segment_store):
    server = mariadb_servers[2]
    server.execute(
        "CREATE DATABASE IF NOT EXISTS purge_probe",
        "CREATE TABLE IF NOT EXISTS purge_probe.t (id INT PRIMARY KEY)",
    )
    start_file, start_pos, _ = master_status(server.endpoint)
    server.execute("REPLACE INTO purge_probe.t VALUES (1)")
    purge_binlogs(server)
    end_file, end_pos, _ = master_status(server.endpoint)

    with pytest.raises(EngineError) as failure:
        capture_instance(
            endpoint=server.endpoint,
            instance=server.name,
            start_file=start_file,
            start_pos=start_pos,
            end_file=end_file,
            end_pos=end_pos,
            set_prefix="c/10",
            store=segment_store(),
            server_id=3_999_000_002,
        )
    assert "purged" in str(failure.value)
    assert "new full backup is needed" in str(failure.value)


def test_unreachable_server_is_an_engine_error_naming_it(mariadb_servers, segment_store):
    """capture_instance promises EngineError when the server cannot be read."""
    from dataclasses import replace

    from tests.servers import free_port

    gone = replace(mariadb_servers[0].endpoint, name="gone", port=free_port())
    with pytest.raises(EngineError, match="cannot reach gone"):
        master_status(gone)
    with pytest.raises(EngineError, match="cannot reach gone"):
        capture_instance(
            endpoint=gone,
            instance="gone",
            start_file="mysql-bin.000001",
            start_pos=4,
            end_file="mysql-bin.000002",
            end_pos=4,
            set_prefix="c/11",
            store=segment_store(),
            server_id=3_999_000_003,
        )


def _wait_for_next_second() -> None:
    now = time.time()
    time.sleep(int(now) + 1 - now + 0.05)


def test_apply_stops_at_the_second_and_a_crash_midway_converges_on_rerun(
    mariadb_servers, unique_name, storage, segment_store, monkeypatch
):
    from backups.engine import binlog_select

    # Transactions above 4 KiB go through a temporary file, as multi-GB ones would.
    monkeypatch.setattr(binlog_select, "SPOOL_BYTES", 4096)
    server = mariadb_servers[1]
    src, dst, ref = f"ap_{unique_name}", f"ap_{unique_name}__r1", f"ap_{unique_name}_ref"
    for name in (src, dst, ref):
        server.execute(
            f"DROP DATABASE IF EXISTS {quote_ident(name)}", f"CREATE DATABASE {quote_ident(name)}"
        )
    ddl = "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(50) CHARACTER SET utf8mb4, n BIGINT UNSIGNED)"
    server.execute(ddl, database=src)
    server.execute(ddl, database=dst)  # the "full backup" of an empty table
    start_file, start_pos, _ = master_status(server.endpoint)
    conn = server.connect(src)
    with conn.cursor() as cur:
        for i in range(1, 301):
            cur.execute("INSERT INTO t VALUES (%s, %s, %s)", (i, f"ü{i}\t\\", 2**64 - i))
        cur.execute("UPDATE t SET v = 'changed' WHERE id % 3 = 0")
        cur.execute("INSERT INTO t SELECT seq, REPEAT('big', 10), seq FROM seq_1000_to_6000")
        cur.execute("ALTER TABLE t ADD COLUMN extra VARCHAR(10) DEFAULT 'dflt'")
        cur.execute("UPDATE t SET extra = 'set' WHERE id < 10")
        cur.execute("DELETE FROM t WHERE id > 290 AND id < 1000 OR id % 2 = 0 AND id > 1000")
    conn.close()
    _wait_for_next_second()
    until = datetime.now(UTC)
    server.execute(f"CREATE TABLE {quote_ident(ref)}.t AS SELECT * FROM {quote_ident(src)}.t")
    _wait_for_next_second()
    server.execute("DELETE FROM t", database=src)  # the accident
    end_file, end_pos, _ = master_status(server.endpoint)
    capture = capture_instance(
        endpoint=server.endpoint,
        instance=server.name,
        start_file=start_file,
        start_pos=start_pos,
        end_file=end_file,
        end_pos=end_pos,
        set_prefix="c/11",
        store=segment_store(),
        server_id=3_999_000_003,
    )
    segments = sources(storage, capture.segments)
    common = dict(
        target=server.endpoint,
        source_database=src,
        target_database=dst,
        stream=server.name,
        segments=segments,
        start_file=start_file,
        start_pos=start_pos,
        until=until,
    )

    with pytest.raises(EngineError):
        apply_segments(**common, crash_after_transactions=120)
    partial = server.execute("SELECT COUNT(*) FROM t", database=dst)[0][0]
    assert 0 < partial <= 120  # whole transactions only: the half-sent one rolled back

    result = apply_segments(**common)
    assert result.reached_until
    assert checksums(server, dst, ["t"]) == checksums(server, ref, ["t"])
    assert server.execute("SELECT COUNT(*) FROM t", database=dst)[0][0] == 290 + 2501

    # Applying again changes nothing.
    again = apply_segments(**common)
    assert again.transactions == 0
    assert checksums(server, dst, ["t"]) == checksums(server, ref, ["t"])
    for name in (src, dst, ref):
        server.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}")


def test_apply_restores_only_the_scoped_tables_under_their_new_names(
    mariadb_servers, unique_name, storage, segment_store
):
    server = mariadb_servers[1]
    src = f"sc_{unique_name}"
    server.execute(
        f"DROP DATABASE IF EXISTS {quote_ident(src)}", f"CREATE DATABASE {quote_ident(src)}"
    )
    server.execute(
        "CREATE TABLE orders (id INT PRIMARY KEY, v VARCHAR(20))",
        "CREATE TABLE audit (id INT PRIMARY KEY)",
        "CREATE TABLE orders__shadow LIKE orders",  # an in-place restore's shadow table
        database=src,
    )
    start_file, start_pos, _ = master_status(server.endpoint)
    server.execute(
        "INSERT INTO orders VALUES (1, 'a'), (2, 'b')",
        "INSERT INTO audit VALUES (1)",
        "UPDATE orders SET v = 'changed' WHERE id = 2",
        database=src,
    )
    end_file, end_pos, _ = master_status(server.endpoint)
    capture = capture_instance(
        endpoint=server.endpoint,
        instance=server.name,
        start_file=start_file,
        start_pos=start_pos,
        end_file=end_file,
        end_pos=end_pos,
        set_prefix="c/12",
        store=segment_store(),
        server_id=3_999_000_004,
    )
    server.execute("DELETE FROM orders", "DELETE FROM audit", database=src)  # "lost" live data

    apply_segments(
        target=server.endpoint,
        source_database=src,
        target_database=src,
        stream=server.name,
        segments=sources(storage, capture.segments),
        start_file=start_file,
        start_pos=start_pos,
        until=None,
        tables={"orders": "orders__shadow"},
    )
    assert server.execute("SELECT id, v FROM orders__shadow ORDER BY id", database=src) == [
        (1, "a"),
        (2, "changed"),
    ]
    assert server.execute("SELECT COUNT(*) FROM orders", database=src)[0][0] == 0
    assert server.execute("SELECT COUNT(*) FROM audit", database=src)[0][0] == 0
    server.execute(f"DROP DATABASE IF EXISTS {quote_ident(src)}")


def test_ddl_naming_the_source_database_is_applied_to_the_target_never_the_source(
    mariadb_servers, unique_name, storage, segment_store
):
    server = mariadb_servers[1]
    src, dst = f"dd_{unique_name}", f"dd_{unique_name}__r7"
    for name in (src, dst):
        server.execute(
            f"DROP DATABASE IF EXISTS {quote_ident(name)}", f"CREATE DATABASE {quote_ident(name)}"
        )
        server.execute("CREATE TABLE t (id INT PRIMARY KEY)", database=name)
    start_file, start_pos, _ = master_status(server.endpoint)
    server.execute("INSERT INTO t VALUES (1)", database=src)
    server.execute(f"ALTER TABLE {quote_ident(src)}.t ADD COLUMN c INT")  # no default database
    end_file, end_pos, _ = master_status(server.endpoint)
    capture = capture_instance(
        endpoint=server.endpoint,
        instance=server.name,
        start_file=start_file,
        start_pos=start_pos,
        end_file=end_file,
        end_pos=end_pos,
        set_prefix="c/13",
        store=segment_store(),
        server_id=3_999_000_005,
    )
    server.execute(f"ALTER TABLE {quote_ident(src)}.t DROP COLUMN c")

    apply_segments(
        target=server.endpoint,
        source_database=src,
        target_database=dst,
        stream=server.name,
        segments=sources(storage, capture.segments),
        start_file=start_file,
        start_pos=start_pos,
        until=None,
    )
    source_columns = [r[0] for r in server.execute("SHOW COLUMNS FROM t", database=src)]
    assert source_columns == ["id"]  # the source was never touched
    # The qualified DDL (issued without a default database) was redirected to the target.
    assert [r[0] for r in server.execute("SHOW COLUMNS FROM t", database=dst)] == ["id", "c"]
    assert server.execute("SELECT id FROM t", database=dst) == [(1,)]
    for name in (src, dst):
        server.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}")
