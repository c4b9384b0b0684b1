"""The benchmark dataset: generated server-side, fast, with realistic mixed columns.

Layout: every instance holds databases `bench_0` and `bench_1`, each with a
large `orders` table (about 2/3 of the database's rows) and a smaller `events`
table. Rows come from MariaDB's Sequence engine (`seq_<lo>_to_<hi>`) through
`INSERT ... SELECT`, so nothing travels through Python. Text columns mix ASCII,
accented and CJK text, tabs, newlines, backslashes, quotes and NULLs, so every
tool's escaping is exercised; `events.body` is random binary.

Generation runs with `sql_log_bin=0` (the benchmark measures full backups, not
the binlog) and one thread per instance.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backups.engine.mysql import connect, quote_ident, quote_qualified
from tests.servers import MariaDBServer

DATABASES = ("bench_0", "bench_1")
BATCH_ROWS = 100_000
BUFFER_POOL_BYTES = 512 * 1024 * 1024

ORDERS_DDL = """
CREATE TABLE {table} (
  id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  customer_id INT NOT NULL,
  status VARCHAR(16) NOT NULL,
  note VARCHAR(255) NULL,
  amount DECIMAL(12,2) NOT NULL,
  discount DECIMAL(5,4) NULL,
  created_at DATETIME(6) NOT NULL,
  shipped_on DATE NULL,
  payload TEXT NOT NULL,
  flags TINYINT UNSIGNED NULL,
  KEY customer (customer_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""

EVENTS_DDL = """
CREATE TABLE {table} (
  id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  order_id BIGINT UNSIGNED NOT NULL,
  kind VARCHAR(32) NOT NULL,
  ratio DOUBLE NULL,
  happened_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  label VARCHAR(64) CHARACTER SET utf8mb4 NULL,
  body BLOB NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""

# `{offset}` shifts ids so the same SELECT can grow a table; `seq` is the Sequence engine column.
ORDERS_SELECT = """
SELECT
  seq + {offset},
  (seq * 7919) % 250000,
  ELT(1 + seq % 5, 'new', 'paid', 'shipped', 'delivered', 'returned'),
  IF(seq % 17 = 0, NULL,
     CONCAT(ELT(1 + seq % 9, 'Zürich', '東京 注文', 'naïve café', 'tab\\there', 'new\\nline',
                'back\\\\slash', 'quote''s', 'plain ascii', 'Ελληνικά'),
            ' #', seq, ' ', LEFT(MD5(seq), 4 + seq % 24))),
  ROUND((seq * 37 % 1000000) / 100, 2),
  IF(seq % 5 = 0, NULL, (seq % 10000) / 10000),
  TIMESTAMP('2020-01-01') + INTERVAL (seq * 13) SECOND + INTERVAL (seq % 1000000) MICROSECOND,
  IF(seq % 3 = 0, NULL, DATE('2020-01-01') + INTERVAL (seq % 2000) DAY),
  CONCAT('{{"sku":"', HEX(seq * 31), '","qty":', seq % 9 + 1, ',"memo":"',
         REPEAT(MD5(seq + {offset}), 2 + seq % 7), '"}}'),
  IF(seq % 11 = 0, NULL, seq % 256)
FROM seq_{lo}_to_{hi}
"""

EVENTS_SELECT = """
SELECT
  seq + {offset},
  seq * 2 + {offset},
  ELT(1 + seq % 6, 'created', 'paid', 'packed', 'shipped', 'delivered', 'audit'),
  IF(seq % 13 = 0, NULL, (seq % 99991) / 7.0),
  TIMESTAMP('2021-06-01') + INTERVAL (seq * 7) SECOND + INTERVAL (seq % 1000) * 1000 MICROSECOND,
  IF(seq % 4 = 0, NULL, CONCAT(ELT(1 + seq % 4, 'ops', 'Ünïcode', '日本', 'x\\ty'), '-', seq % 977)),
  CONCAT(UNHEX(SHA2(seq + {offset}, 512)), UNHEX(SHA2(seq, 256)),
         REPEAT(UNHEX(MD5(seq)), seq % 8))
FROM seq_{lo}_to_{hi}
"""

TABLES = {"orders": (ORDERS_DDL, ORDERS_SELECT), "events": (EVENTS_DDL, EVENTS_SELECT)}


@dataclass
class BenchShard:
    """One shard of the benchmark cluster: a database on one instance."""

    name: str
    server: MariaDBServer
    database: str
    tables: dict[str, int] = field(default_factory=dict)  # table -> rows


@dataclass
class Dataset:
    shards: list[BenchShard]
    rows: int
    data_bytes: int  # InnoDB data_length + index_length of every table (information_schema)
    generation_s: float

    @property
    def servers(self) -> list[MariaDBServer]:
        seen: dict[str, MariaDBServer] = {}
        for shard in self.shards:
            seen.setdefault(shard.server.name, shard.server)
        return list(seen.values())

    def largest_table(self) -> tuple[BenchShard, str, int]:
        return max(
            ((shard, table, rows) for shard in self.shards for table, rows in shard.tables.items()),
            key=lambda item: item[2],
        )


def split_rows(total_rows: int, databases: int) -> dict[str, int]:
    """Rows per table of one database: orders gets two thirds, events the rest."""
    per_database = max(total_rows // databases, 3)
    orders = per_database * 2 // 3
    return {"orders": orders, "events": per_database - orders}


def server_prepare(server: MariaDBServer) -> None:
    """Give the dedicated benchmark instance a buffer pool that fits its share of the data."""
    server.execute(f"SET GLOBAL innodb_buffer_pool_size = {BUFFER_POOL_BYTES}")


def table_fill(conn, database: str, table: str, *, start: int, rows: int, offset: int = 0) -> None:
    """Insert `rows` generated rows with sequence numbers start..start+rows-1 (ids shifted by offset)."""
    _, select = TABLES[table]
    target = quote_qualified(database, table)
    with conn.cursor() as cursor:
        lo = start
        end = start + rows - 1
        while lo <= end:
            hi = min(lo + BATCH_ROWS - 1, end)
            cursor.execute(f"INSERT INTO {target} " + select.format(lo=lo, hi=hi, offset=offset))
            conn.commit()
            lo = hi + 1


def generation_session(server: MariaDBServer):
    """A connection for bulk generation: no binlog, no unique/foreign key checks."""
    conn = connect(server.endpoint, autocommit=False)
    with conn.cursor() as cursor:
        cursor.execute("SET SESSION sql_log_bin = 0")
        cursor.execute("SET SESSION unique_checks = 0")
        cursor.execute("SET SESSION foreign_key_checks = 0")
        cursor.execute("USE mysql")  # the Sequence engine needs a current database
    return conn


def _instance_build(server: MariaDBServer, shards: list[BenchShard]) -> None:
    conn = generation_session(server)
    try:
        with conn.cursor() as cursor:
            for shard in shards:
                db = quote_ident(shard.database)
                cursor.execute(f"DROP DATABASE IF EXISTS {db}")
                cursor.execute(f"CREATE DATABASE {db}")
                for table, rows in shard.tables.items():
                    ddl, _ = TABLES[table]
                    cursor.execute(ddl.format(table=quote_qualified(shard.database, table)))
                    table_fill(conn, shard.database, table, start=1, rows=rows)
    finally:
        conn.close()


def dataset_build(servers: list[MariaDBServer], total_rows: int) -> Dataset:
    """Create the benchmark databases on every server (one thread per instance)."""
    started = time.monotonic()
    per_table = split_rows(total_rows, len(servers) * len(DATABASES))
    shards = [
        BenchShard(
            name=f"s{index:02d}",
            server=server,
            database=database,
            tables=dict(per_table),
        )
        for index, (server, database) in enumerate(
            (server, database) for server in servers for database in DATABASES
        )
    ]
    for server in servers:
        server_prepare(server)
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = [
            pool.submit(_instance_build, server, [s for s in shards if s.server is server])
            for server in servers
        ]
        for future in futures:
            future.result()
    rows = sum(sum(shard.tables.values()) for shard in shards)
    return Dataset(
        shards=shards,
        rows=rows,
        data_bytes=data_bytes(servers, DATABASES),
        generation_s=time.monotonic() - started,
    )


def data_bytes(servers: list[MariaDBServer], databases: tuple[str, ...] | list[str]) -> int:
    """Sum of data_length + index_length for the databases (after fresh statistics)."""
    total = 0
    placeholders = ", ".join(["%s"] * len(databases))
    for server in servers:
        conn = server.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT table_schema, table_name FROM information_schema.TABLES "
                    f"WHERE table_schema IN ({placeholders}) AND table_type = 'BASE TABLE'",
                    list(databases),
                )
                for schema, table in cursor.fetchall():
                    cursor.execute(f"ANALYZE TABLE {quote_qualified(schema, table)}")
                    cursor.fetchall()
                cursor.execute(
                    "SELECT COALESCE(SUM(data_length + index_length), 0) "
                    f"FROM information_schema.TABLES WHERE table_schema IN ({placeholders})",
                    list(databases),
                )
                total += int(cursor.fetchone()[0])
        finally:
            conn.close()
    return total


def table_grow(server: MariaDBServer, database: str, table: str, factor: int) -> int:
    """Grow a generated table to `factor` times its row count; return the new count."""
    conn = generation_session(server)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                f"SELECT COUNT(*), COALESCE(MAX(id), 0) FROM {quote_qualified(database, table)}"
            )
            rows, max_id = cursor.fetchone()
        extra = rows * (factor - 1)
        # New ids start after the current maximum; the generated columns vary with `seq` as before.
        table_fill(conn, database, table, start=rows + 1, rows=extra, offset=max_id - rows)
        return rows + extra
    finally:
        conn.close()


def table_fingerprint(server: MariaDBServer, database: str, table: str) -> tuple[int, int]:
    """(row count, CHECKSUM TABLE) of one table, to compare a tool's load with its source."""
    conn = server.connect()
    try:
        with conn.cursor() as cursor:
            qualified = quote_qualified(database, table)
            cursor.execute(f"SELECT COUNT(*) FROM {qualified}")
            count = int(cursor.fetchone()[0])
            cursor.execute(f"CHECKSUM TABLE {qualified}")
            checksum = int(cursor.fetchone()[1] or 0)
        return count, checksum
    finally:
        conn.close()


def databases_drop(server: MariaDBServer, databases: list[str]) -> None:
    for database in databases:
        server.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")


class Writer:
    """Small autocommit inserts round-robin over every instance until stopped.

    Used to put the cluster under write load while ShardVault takes locked
    backups: the lock window is what those writers stall behind.
    """

    def __init__(self, servers: list[MariaDBServer], database: str, table: str = "ticks"):
        self.servers = servers
        self.database = database
        self.table = table
        self.commits = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)

    def prepare(self) -> None:
        for server in self.servers:
            server.execute(
                f"CREATE DATABASE IF NOT EXISTS {quote_ident(self.database)}",
                f"CREATE TABLE IF NOT EXISTS {quote_qualified(self.database, self.table)} "
                "(id BIGINT AUTO_INCREMENT PRIMARY KEY, seq BIGINT NOT NULL, "
                "at DATETIME(6) NOT NULL, note VARCHAR(64)) ENGINE=InnoDB",
            )

    def start(self) -> None:
        self.prepare()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        conns = [connect(server.endpoint) for server in self.servers]
        insert = (
            f"INSERT INTO {quote_qualified(self.database, self.table)} (seq, at, note) "
            "VALUES (%s, NOW(6), %s)"
        )
        try:
            seq = 0
            while not self._stop.is_set():
                seq += 1
                conn = conns[seq % len(conns)]
                try:
                    with conn.cursor() as cursor:
                        cursor.execute(insert, (seq, f"tick {seq}"))
                    self.commits += 1
                except Exception as exc:  # noqa: BLE001 - reported, not raised, by the benchmark
                    self.errors.append(str(exc))
                    time.sleep(0.05)
                time.sleep(0.001)
        finally:
            for conn in conns:
                conn.close()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    value = fn()
    return value, time.monotonic() - started
