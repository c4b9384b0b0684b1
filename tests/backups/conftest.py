"""Engine-level fixtures: storage, shard specs, and a database full of hostile data."""

from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest

HMAC_KEY = b"k" * 32
WEIRD_TABLE = "we`ird tåble ü"

ALL_BYTES = bytes(range(256))
HOSTILE_STRINGS = [
    None,
    "",
    "\\N",
    "\\",
    "a\tb",
    "line1\nline2",
    "cr\r\n",
    "quote ' \" `",
    "nul\x00byte",
    "emoji 😀🐍 𝄞",
    "trailing backslash \\",
    "\\t not a tab",
    "NULL",
    "   ",
]


@pytest.fixture
def storage(tmp_path):
    from backups.storage.local import LocalStorage

    return LocalStorage(tmp_path / "store", fsync=False)


def drop_database(server, name: str) -> None:
    from backups.engine.mysql import quote_ident

    server.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}")


def make_spec(shards, *, set_id=1, cluster="c1", **overrides):
    from backups.engine.types import BackupSpec, ShardSpec

    specs = [
        ShardSpec(name=name, instance=server.name, database=database, endpoint=server.endpoint)
        for name, server, database in shards
    ]
    options = dict(
        cluster=cluster,
        set_id=set_id,
        set_prefix=f"{cluster}/{set_id}",
        shards=specs,
        manifest_hmac_key=HMAC_KEY,
        chunk_rows=300,
        connections_per_instance=3,
    )
    options.update(overrides)
    return BackupSpec(**options)


def read_manifest(storage, spec):
    from backups.engine.manifest import manifest_read

    return manifest_read(storage, spec.set_prefix, HMAC_KEY)


def build_hostile_database(
    server, database: str, *, big_row_bytes: int = 3 * 1024 * 1024
) -> dict[str, int]:
    """Create `database` with tables of hostile data; returns rows per table."""
    from backups.engine.mysql import quote_ident

    drop_database(server, database)
    server.execute(f"CREATE DATABASE {quote_ident(database)} CHARACTER SET utf8mb4")
    server.execute(
        """CREATE TABLE hostile (
            id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
            s VARCHAR(200) NULL,
            t MEDIUMTEXT NULL,
            latin VARCHAR(50) CHARACTER SET latin1 NULL,
            bl LONGBLOB NULL,
            dc DECIMAL(65,30) NULL,
            dt DATETIME(6) NULL,
            ts TIMESTAMP(6) NULL DEFAULT NULL,
            j JSON NULL,
            b BIT(64) NULL,
            b3 BIT(3) NULL,
            e ENUM('a','b b','c\\tc') NULL,
            st SET('x','y','z') NULL,
            u BIGINT UNSIGNED NULL,
            i8 TINYINT NULL,
            f FLOAT NULL,
            d DOUBLE NULL,
            y YEAR NULL,
            tm TIME(6) NULL,
            vb VARBINARY(300) NULL,
            g BIGINT AS (id * 2) VIRTUAL,
            gs VARCHAR(220) AS (CONCAT('<', s, '>')) STORED
        ) ENGINE=InnoDB""",
        database=database,
    )
    rng = random.Random(7)
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+00:00'")
            sql = (
                "INSERT INTO hostile (id, s, t, latin, bl, dc, dt, ts, j, b, b3, e, st, u, i8, f, d, y, tm, vb)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            )
            rows = []
            specials = [
                (0, 18446744073709551615, -128, 3.4028234e38, 1.7976931348623157e308),
                (1, 0, 127, 1.17549435e-38, 2.2250738585072014e-308),
                (2, 1, 0, 0.1, 0.1),
                (3, 12345678901234567, -1, -0.0, -0.0),
                (4, None, None, 123456.789, 0.30000000000000004),
                (5, 42, 5, -1.5e-10, 5e-324),
            ]
            for n, u, i8, f, d in specials:
                s = HOSTILE_STRINGS[n % len(HOSTILE_STRINGS)]
                rows.append(
                    (
                        n,
                        s,
                        (s or "") * 3 if s is not None else None,
                        "café ÿ\t\\",
                        ALL_BYTES,
                        Decimal(
                            "12345678901234567890123456789012345.123456789012345678901234567891"
                        )
                        if n == 0
                        else Decimal("-0.000000000000000000000000000001"),
                        "9999-12-31 23:59:59.999999" if n == 0 else "1000-01-01 00:00:00.000001",
                        "2038-01-19 03:14:07.999999" if n == 0 else "1970-01-01 00:00:01.000000",
                        json.dumps({"k": "v\t\n\\", "n": [1, 2.5, None], "u": "😀"}),
                        b"\x00\t\n\\\xff\x00\x5c\x0a" if n != 4 else b"\xff" * 8,
                        b"\x05",
                        "c\tc" if n % 2 else "b b",
                        "x,z",
                        u,
                        i8,
                        f,
                        d,
                        2155 if n else 1901,
                        "-838:59:59.000000" if n == 0 else "838:59:59.999999",
                        ALL_BYTES[:255] + b"\\",
                    )
                )
            for n in range(6, 700):
                s = rng.choice(HOSTILE_STRINGS)
                rows.append(
                    (
                        n * 3 + rng.randint(0, 2),
                        s,
                        s,
                        None if n % 5 else "plain",
                        bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))),
                        Decimal(rng.randint(-(10**20), 10**20)) / Decimal(10**15),
                        f"2020-01-02 03:04:{n % 60:02d}.{n:06d}",
                        None if n % 3 else "2001-02-03 04:05:06.7",
                        None if n % 4 else '{"a": "\\\\N"}',
                        rng.getrandbits(64).to_bytes(8, "big"),
                        None,
                        rng.choice([None, "a", "b b", "c\tc"]),
                        rng.choice([None, "", "x", "x,y,z"]),
                        rng.getrandbits(64),
                        rng.randint(-128, 127),
                        rng.uniform(-1e30, 1e30),
                        rng.uniform(-1e300, 1e300),
                        None,
                        None,
                        None,
                    )
                )
            cur.executemany(sql, rows)
            # One row of several MB (its line is far larger than a fetch batch or a packet).
            cur.execute(
                "INSERT INTO hostile (id, s, bl) VALUES (%s, %s, %s)",
                (10**12, "big", (ALL_BYTES * (big_row_bytes // 256 + 1))[:big_row_bytes]),
            )
            hostile_rows = len(rows) + 1

            cur.execute(
                "CREATE TABLE composite (region VARCHAR(20) NOT NULL, id INT NOT NULL, note VARCHAR(50),"
                " PRIMARY KEY (region, id)) ENGINE=InnoDB"
            )
            composite = [
                (rng.choice(["eu", "us", "ap", "Ä\tx", "z\\"]), n, f"note {n}") for n in range(1500)
            ]
            cur.executemany("INSERT IGNORE INTO composite VALUES (%s, %s, %s)", composite)
            cur.execute("SELECT COUNT(*) FROM composite")
            composite_rows = cur.fetchone()[0]

            cur.execute("CREATE TABLE empty_table (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB")
            cur.execute("CREATE TABLE no_pk (a INT, b VARCHAR(10)) ENGINE=InnoDB")
            cur.executemany(
                "INSERT INTO no_pk VALUES (%s, %s)",
                [(1, "dup"), (1, "dup"), (None, None), (2, "\\N")],
            )

            cur.execute(
                f"CREATE TABLE {quote_ident(WEIRD_TABLE)} (id INT PRIMARY KEY AUTO_INCREMENT, v VARCHAR(20)) ENGINE=InnoDB"
            )
            cur.executemany(
                f"INSERT INTO {quote_ident(WEIRD_TABLE)} VALUES (%s, %s)",
                [(n, f"v{n}") for n in range(1, 1001)],
            )
            # id 0 only survives a load with NO_AUTO_VALUE_ON_ZERO
            cur.execute("SET SESSION sql_mode = 'NO_AUTO_VALUE_ON_ZERO'")
            cur.execute(f"UPDATE {quote_ident(WEIRD_TABLE)} SET id = 0 WHERE id = 1000")
            cur.execute("CREATE VIEW v_hostile AS SELECT id, s FROM hostile WHERE id < 100")
            cur.execute(
                "CREATE TRIGGER trg_no_pk BEFORE INSERT ON no_pk FOR EACH ROW SET NEW.b = IFNULL(NEW.b, 'trg')"
            )
            cur.execute("CREATE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC RETURN x * 2")
        conn.commit()
    finally:
        conn.close()
    return {
        "hostile": hostile_rows,
        "composite": composite_rows,
        "empty_table": 0,
        "no_pk": 4,
        WEIRD_TABLE: 1000,
    }


@pytest.fixture
def hostile_database(mariadb_servers, unique_name):
    server = mariadb_servers[0]
    name = f"hostile_{unique_name}"
    rows = build_hostile_database(server, name)
    yield server, name, rows
    drop_database(server, name)


def no_backup_sessions(server) -> list[tuple]:
    """Sessions still holding a transaction or running a statement other than ours."""
    return server.execute(
        "SELECT p.ID, p.COMMAND, p.STATE, p.INFO FROM information_schema.PROCESSLIST p"
        " WHERE p.ID <> CONNECTION_ID() AND p.COMMAND NOT IN ('Daemon', 'Binlog Dump', 'Slave_IO', 'Slave_SQL')"
        " AND (p.INFO IS NOT NULL OR p.ID IN (SELECT trx_mysql_thread_id FROM information_schema.INNODB_TRX))"
    )
