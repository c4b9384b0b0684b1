"""Flashback: the inverse of chosen row changes, built by `mariadb-binlog --flashback`.

Plain Python (no Django). For one shard database:

* `flashback_build` reads the stored segments (in binlog order, one event in memory at
  a time; a transaction past SPOOL_BYTES spills to disk), keeps the chosen transactions
  (by GTID, or committed inside a time window) and in them only the table maps and row
  events of the tables in scope, writes them as a binlog file, and hands that file to
  `mariadb-binlog --flashback --verbose`. The tool writes the inverse (a delete
  re-inserts the before image, an insert is deleted, an update is set back), newest
  first; ShardVault adds only the choice of transactions and tables. The same pass
  decodes each changed row's after image: what the live row must still be for the
  undo to be safe. The images go to a sqlite file in the work directory
  (`AfterImages`), so memory does not grow with the number of changed rows.
* `flashback_conflicts` compares those after images with the live rows, KEY_BATCH
  primary keys per query: a row changed again after the window, deleted since, or
  re-inserted, is a conflict.
* `flashback_apply` runs the inverse in ONE transaction on the shard's server, after
  locking and re-checking every row it touches; with a marker, a row of
  MARKER_TABLE commits with it, so a resumed run knows the shard is done.
* `binlog_replay_allowed` tells whether the instance's user may run the BINLOG
  statements the inverse is made of (BINLOG REPLAY or SUPER).

A DDL on an in-scope table among the chosen transactions is refused (the tool does not
invert DDL); so is a statement that changes tables inside and outside the scope.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from backups.engine.binlog_browse import FormatDescription, binlog_events, statement_tables
from backups.engine.binlog_events import (
    BINLOG_MAGIC,
    FL_STANDALONE,
    FORMAT_DESCRIPTION_EVENT,
    GTID_EVENT,
    QUERY_EVENT,
    TABLE_MAP_EVENT,
    XID_EVENT,
    gtid_of,
    query_of,
)
from backups.engine.binlog_rows import (
    ROWS_EVENTS,
    STMT_END_F,
    TableMap,
    comparison_sql,
    row_images,
    rows_flags,
    rows_table_id,
    signed_value,
    table_map_parse,
)
from backups.engine.binlog_select import Transaction
from backups.engine.errors import EngineError
from backups.engine.mysql import Endpoint, connect, quote_ident, quote_qualified

SAMPLE_STATEMENTS = 5
CONFLICT_SAMPLE = 20


@dataclass
class FlashbackSegment:
    """One stored segment: its binlog file name and how to read its decoded bytes."""

    file: str
    open: Callable[[], Iterable[bytes]]


@dataclass(frozen=True)
class FlashbackChoice:
    """Which transactions and tables of one shard database to undo."""

    database: str
    gtids: frozenset[str] | None = None  # or a window:
    since_ts: int | None = None
    until_ts: int | None = None
    wants: Callable[[str], bool] | None = None  # table name -> in scope; None: every table

    def table_wanted(self, database: str, table: str) -> bool:
        return database == self.database and (self.wants is None or self.wants(table))


@dataclass
class TableInfo:
    name: str
    columns: list[str]
    unsigned: list[bool]
    key: list[int]  # positions (0-based) of the primary key's columns


AFTER_FLUSH = 1000  # after images buffered in memory before they go to the sqlite file


class AfterImages:
    """(table, key) -> the row's after image (None: it must be absent), spilled to sqlite.

    Later images of the same key replace earlier ones (the last change wins), whatever
    order they are written in; reads come back per table, KEY_BATCH keys at a time, so
    memory stays bounded by the batch, not by the number of changed rows.
    """

    def __init__(self, path: str):
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS after_image (tbl TEXT NOT NULL, ident TEXT NOT NULL,"
            " absent INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (tbl, ident))"
        )
        self._pending: dict[tuple[str, str], tuple[tuple, tuple | None]] = {}

    def __setitem__(self, table_key: tuple[str, tuple], image: tuple | None) -> None:
        table, key = table_key
        # repr() is the identity: equal decoded keys print alike (pickles may not).
        self._pending[(table, repr(key))] = (key, image)
        if len(self._pending) >= AFTER_FLUSH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self._db.executemany(
            "INSERT INTO after_image (tbl, ident, absent, value) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (tbl, ident) DO UPDATE SET absent = excluded.absent,"
            " value = excluded.value",
            [
                (table, ident, int(image is None), pickle.dumps((key, image)))
                for (table, ident), (key, image) in self._pending.items()
            ],
        )
        self._db.commit()
        self._pending.clear()

    def clear(self) -> None:
        self._pending.clear()
        self._db.execute("DELETE FROM after_image")
        self._db.commit()

    def __len__(self) -> int:
        self.flush()
        return self._db.execute("SELECT COUNT(*) FROM after_image").fetchone()[0]

    def batches(self, *, absent: bool, size: int) -> Iterator[tuple[str, list[tuple]]]:
        """(table, [(key, image), ...]) with at most `size` keys each, table by table."""
        self.flush()
        cursor = self._db.execute(
            "SELECT tbl, value FROM after_image WHERE absent = ? ORDER BY tbl, rowid",
            (int(absent),),
        )
        table, batch = None, []
        for row in cursor:
            if batch and (row[0] != table or len(batch) >= size):
                yield table, batch
                batch = []
            table = row[0]
            batch.append(pickle.loads(row[1]))  # noqa: S301 - our own file, written above
        if batch:
            yield table, batch


@dataclass
class ShardInverse:
    """The inverse for one shard database, and what it needs to be safe."""

    database: str
    sql_path: str = ""
    sha256: str = ""
    size: int = 0
    transactions: list[dict] = field(default_factory=list)  # {"gtid", "file", "end_pos"}
    statements: int = 0
    # table -> {"insert", "update", "delete"}: the rows the inverse writes.
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)
    # (table, key values) -> the after image (tuple) or None (the row must be absent),
    # kept in a sqlite file next to the binlog, not in memory.
    after: AfterImages = field(default_factory=lambda: AfterImages(":memory:"))
    columns: dict[str, tuple] = field(default_factory=dict)  # table -> binlog Column tuple
    schema_changed: str = ""  # a table whose live columns differ from the binlog's
    later_ddl: str = ""  # the first DDL on a table in scope after the chosen transactions

    @property
    def row_count(self) -> int:
        return sum(sum(counts.values()) for counts in self.rows.values())


def tool_available() -> bool:
    return bool(shutil.which("mariadb-binlog"))


def table_info(endpoint: Endpoint, database: str, table: str) -> TableInfo:
    """Column names, signedness and primary key of a live table."""
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                (database, table),
            )
            columns = cur.fetchall()
            cur.execute(
                "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s"
                " AND TABLE_NAME = %s AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
                (database, table),
            )
            key_names = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    if not columns:
        raise EngineError(f"table {database}.{table} no longer exists; it cannot be flashed back")
    names = [row[0] for row in columns]
    if not key_names:
        raise EngineError(
            f"table {database}.{table} has no primary key; flashback needs one to check "
            "that no row changed again"
        )
    return TableInfo(
        name=table,
        columns=names,
        unsigned=["unsigned" in str(row[1]).lower() for row in columns],
        key=[names.index(k) for k in key_names],
    )


REPLAY_PRIVILEGES = {"ALL PRIVILEGES", "ALL", "SUPER", "BINLOG REPLAY"}
_GLOBAL_GRANT = re.compile(r"^GRANT (.+?) ON \*\.\* TO ", re.IGNORECASE)


def binlog_replay_allowed(endpoint: Endpoint) -> bool:
    """Whether the instance's user may run BINLOG statements (the flashback SQL is made of
    them): BINLOG REPLAY on MariaDB 10.5+, or SUPER, granted on *.* (to it or its role)."""
    conn = connect(endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW GRANTS")
            grants = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    for grant in grants:
        found = _GLOBAL_GRANT.match(grant)
        if found and REPLAY_PRIVILEGES & {p.strip().upper() for p in found.group(1).split(",")}:
            return True
    return False


def _chosen(choice: FlashbackChoice, gtid: str, commit_ts: int | None) -> bool | None:
    """Whether a transaction is chosen (None: not known until its commit time is)."""
    if choice.gtids is not None:
        return gtid in choice.gtids
    if commit_ts is None:
        return None
    return (choice.since_ts is None or commit_ts >= choice.since_ts) and (
        choice.until_ts is None or commit_ts <= choice.until_ts
    )


def _names_wanted(choice: FlashbackChoice, database: str, statement: bytes) -> bool:
    """Whether a statement may change a table in scope (qualified, or under its default db)."""
    named = statement_tables(database, statement.decode("utf-8", "replace"))
    return any(
        db == choice.database and (choice.wants is None or not table or choice.wants(table))
        for db, table in named
    )


def flashback_build(
    *,
    endpoint: Endpoint,
    segments: list[FlashbackSegment],
    choice: FlashbackChoice,
    workdir: str,
) -> ShardInverse:
    """The inverse of the chosen changes of one shard database (see the module docstring).

    Writes `<workdir>/<database>.binlog` (the chosen events) and `<workdir>/<database>.sql`
    (the tool's output). Raises EngineError for DDL in scope, mixed statements, tables
    without a primary key, or a tool failure.
    """
    if not tool_available():
        raise EngineError("mariadb-binlog must be installed on the worker to build a flashback")
    after_path = os.path.join(workdir, f"{choice.database}.after.sqlite3")
    if os.path.exists(after_path):
        os.remove(after_path)  # a former build's images must not mix with this one's
    inverse = ShardInverse(database=choice.database, after=AfterImages(after_path))
    binlog_path = os.path.join(workdir, f"{choice.database}.binlog")
    infos: dict[str, TableInfo] = {}
    with open(binlog_path, "wb") as out:
        out.write(BINLOG_MAGIC)
        fde_written = False
        seen: set[tuple[str, int]] = set()
        for segment in segments:
            for kept in _chosen_transactions(segment, choice, inverse):
                fde, group, gtid, end_pos = kept
                if (segment.file, end_pos) in seen:
                    group.close()  # two overlapping incrementals hold it: undo it once
                    continue
                seen.add((segment.file, end_pos))
                if not fde_written:
                    out.write(fde.event)
                    fde_written = True
                for event in group:
                    out.write(event)
                    if event[4] == TABLE_MAP_EVENT:
                        table_map = table_map_parse(event, fde.post_header_len(TABLE_MAP_EVENT))
                        _note_table(inverse, infos, endpoint, table_map)
                if not inverse.schema_changed:
                    _after_images(group, fde, inverse, infos)
                group.close()
                inverse.transactions.append(
                    {"gtid": gtid, "file": segment.file, "end_pos": end_pos}
                )
    inverse.after.flush()
    if inverse.schema_changed:
        cause = (
            f": {inverse.later_ddl} changed it after the chosen transactions"
            if inverse.later_ddl
            else " (its schema changed since)"
        )
        raise EngineError(
            f"{inverse.schema_changed}{cause}; the flashback is refused (restore to a point in "
            "time before the change instead)"
        )
    if not inverse.transactions:
        return inverse
    sql_path = os.path.join(workdir, f"{choice.database}.sql")
    err_path = os.path.join(workdir, f"{choice.database}.err")
    with open(sql_path, "wb") as sql_out, open(err_path, "wb") as err_out:
        done = subprocess.run(
            ["mariadb-binlog", "--no-defaults", "--flashback", "--verbose", binlog_path],
            stdout=sql_out,
            stderr=err_out,
            check=False,
        )
    if done.returncode != 0:
        with open(err_path, "rb") as handle:
            message = handle.read().decode("utf-8", "replace").strip()[:300]
        raise EngineError(f"mariadb-binlog --flashback failed on {choice.database}: {message}")
    inverse.sql_path = sql_path
    _read_output(inverse)
    return inverse


def _note_table(inverse, infos, endpoint, table_map: TableMap) -> None:
    if table_map.table in infos:
        return
    info = table_info(endpoint, table_map.database, table_map.table)
    if len(info.columns) != len(table_map.columns) and not inverse.schema_changed:
        # Said once the whole binlog is read: a DDL in scope found later is named instead.
        inverse.schema_changed = (
            f"table {table_map.database}.{table_map.table} has {len(info.columns)} columns now "
            f"but {len(table_map.columns)} in the binlog"
        )
    infos[table_map.table] = info
    inverse.columns[table_map.table] = table_map.columns


def _chosen_transactions(
    segment: FlashbackSegment, choice: FlashbackChoice, inverse: ShardInverse
) -> Iterator[tuple]:
    """(format description, kept events, gtid, end position) of each chosen transaction."""
    fde: FormatDescription | None = None
    group: Transaction | None = None
    gtid = ""
    maps: dict[int, TableMap] = {}
    statement_tables: list[bool] = []
    ddl = watch = False
    for _position, event in binlog_events(segment.open()):
        kind = event[4]
        if kind == FORMAT_DESCRIPTION_EVENT:
            fde = FormatDescription(event)
            continue
        if kind == GTID_EVENT:
            server_id = int.from_bytes(event[5:9], "little")
            gtid, flags = gtid_of(event, server_id)
            ddl = bool(flags & FL_STANDALONE)
            if group is not None:
                group.close()
            chosen = _chosen(choice, gtid, None)
            group = None if chosen is False else Transaction(event)
            # A DDL after the chosen transactions may have changed their tables: remember it.
            watch = ddl and chosen is False and bool(inverse.transactions)
            maps, statement_tables = {}, []
            continue
        if group is None:
            if watch and kind == QUERY_EVENT:
                watch = False
                database, statement = query_of(event)
                statement = statement[:-4] if fde.checksum else statement
                if not inverse.later_ddl and _names_wanted(choice, database, statement):
                    text = statement.decode("utf-8", "replace")[:200]
                    inverse.later_ddl = f"{text} (GTID {gtid})"
            continue
        end = False
        if kind == TABLE_MAP_EVENT:
            table_map = table_map_parse(event, fde.post_header_len(TABLE_MAP_EVENT))
            maps[table_map.table_id] = table_map
            if table_map.database == choice.database and choice.table_wanted(
                table_map.database, table_map.table
            ):
                group.add(event)
        elif kind in ROWS_EVENTS:
            table_map = maps.get(rows_table_id(event))
            wanted = table_map is not None and choice.table_wanted(
                table_map.database, table_map.table
            )
            statement_tables.append(wanted)
            if wanted:
                group.add(event)
            if rows_flags(event) & STMT_END_F:
                if any(statement_tables) and not all(statement_tables):
                    raise EngineError(
                        f"transaction {gtid} has a statement that changes tables inside and "
                        "outside the flashback's scope together; include all of them"
                    )
                statement_tables = []
        elif kind == QUERY_EVENT:
            database, statement = query_of(event)
            statement = statement[:-4] if fde.checksum else statement
            head = statement[:8].upper()
            if head.startswith((b"COMMIT", b"ROLLBACK")):
                end = True
            elif not head.startswith(b"BEGIN"):
                if _names_wanted(choice, database, statement):
                    if ddl or _chosen(choice, gtid, int.from_bytes(event[0:4], "little")):
                        text = statement.decode("utf-8", "replace")[:200]
                        raise EngineError(
                            f"transaction {gtid} runs a statement on a table in scope "
                            f"({text}); flashback undoes row changes only, so it is refused "
                            "(choose transactions before it, or restore to a point in time)"
                        )
                if ddl:
                    group.close()
                    group = None
                    continue
        elif kind == XID_EVENT:
            end = True
        if end:
            commit_ts = int.from_bytes(event[0:4], "little")
            end_pos = int.from_bytes(event[13:17], "little")
            group.add(event)
            if _chosen(choice, gtid, commit_ts) and group.count > 2:
                yield fde, group, gtid, end_pos
            else:
                group.close()
            group = None


def _after_images(group: Transaction, fde: FormatDescription, inverse, infos) -> None:
    """Record what each changed row looks like after the transaction (None: deleted)."""
    maps: dict[int, TableMap] = {}
    for event in group:
        kind = event[4]
        if kind == TABLE_MAP_EVENT:
            table_map = table_map_parse(event, fde.post_header_len(TABLE_MAP_EVENT))
            maps[table_map.table_id] = table_map
        elif kind in ROWS_EVENTS:
            table_map = maps[rows_table_id(event)]
            info = infos[table_map.table]
            for before, after in row_images(
                event, table_map, fde.post_header_len(kind), fde.checksum
            ):
                if before is not None:
                    inverse.after[(table_map.table, _key(before, info, table_map))] = None
                if after is not None:
                    inverse.after[(table_map.table, _key(after, info, table_map))] = after


def _key(image: tuple, info: TableInfo, table_map: TableMap) -> tuple:
    return tuple(signed_value(image[i], table_map.columns[i], info.unsigned[i]) for i in info.key)


_PSEUDO = re.compile(rb"^### (INSERT INTO|UPDATE|DELETE FROM) `((?:[^`]|``)*)`\.`((?:[^`]|``)*)`")


def _read_output(inverse: ShardInverse) -> None:
    """Hash the tool's output; count its statements and rows; keep a sample (streamed)."""
    digest = hashlib.sha256()
    current: list[str] | None = None  # the pseudo statement being sampled
    with open(inverse.sql_path, "rb") as handle:
        for line in handle:
            digest.update(line)
            inverse.size += len(line)
            if line.startswith(b"BINLOG '"):
                inverse.statements += 1
            found = _PSEUDO.match(line)
            if found or not line.startswith(b"###"):
                if current is not None:
                    inverse.sample.append(" ".join(current))
                    current = None
            if found:
                verb = {b"INSERT INTO": "insert", b"UPDATE": "update", b"DELETE FROM": "delete"}
                table = found.group(3).decode("utf-8", "replace")
                counts = inverse.rows.setdefault(table, {"insert": 0, "update": 0, "delete": 0})
                counts[verb[found.group(1)]] += 1
                if len(inverse.sample) < SAMPLE_STATEMENTS:
                    current = []
            if current is not None:
                current.append(line[3:].decode("utf-8", "replace").strip())
    if current is not None:
        inverse.sample.append(" ".join(current))
    inverse.statements = max(0, inverse.statements - 1)  # the first is the format description
    inverse.sha256 = digest.hexdigest()


def _where(info: TableInfo) -> str:
    return " AND ".join(f"{quote_ident(info.columns[i])} = %s" for i in info.key)


KEY_BATCH = 500  # primary keys per query when checking rows against their after images


CHECK_BYTES = 4 << 20  # after-image bytes per query, well under max_allowed_packet


def _size(value) -> int:
    return len(value) if isinstance(value, bytes | str) else 16


def _by_bytes(batches):
    """Split batches further so one query's images stay under CHECK_BYTES (big BLOBs)."""
    for table, batch in batches:
        part, size = [], 0
        for key, image in batch:
            weight = sum(_size(v) for v in key) + sum(_size(v) for v in image or ())
            if part and size + weight > CHECK_BYTES:
                yield table, part
                part, size = [], 0
            part.append((key, image))
            size += weight
        if part:
            yield table, part


def flashback_conflicts(
    conn, inverse: ShardInverse, infos: dict[str, TableInfo], *, lock: bool = False
) -> tuple[int, list[dict]]:
    """(conflict count, a sample of them): rows whose live state is not the after image.

    `conn` is a connection to the shard's server; with `lock` every row read is locked
    (FOR UPDATE) in the caller's transaction. Rows are looked up KEY_BATCH primary keys
    per query: those that must be absent (the change deleted them) by key only, the
    others with every column compared by the server (`<=>`, exact for each type) in a
    CASE per key, so a batch costs one round trip whatever its size.
    """
    count = 0
    sample: list[dict] = []
    suffix = " FOR UPDATE" if lock else ""

    def conflict(table: str, key, reason: str) -> None:
        nonlocal count
        count += 1
        if len(sample) < CONFLICT_SAMPLE:
            info = infos[table]
            sample.append(
                {
                    "table": table,
                    "key": {info.columns[i]: _plain(k) for i, k in zip(info.key, key, strict=True)},
                    "reason": reason,
                }
            )

    with conn.cursor() as cur:
        for table, batch in _by_bytes(inverse.after.batches(absent=False, size=KEY_BATCH)):
            info = infos[table]
            columns = inverse.columns[table]
            names = "(" + ", ".join(quote_ident(info.columns[i]) for i in info.key) + ")"
            one = "(" + ", ".join(["%s"] * len(info.key)) + ")"
            compares = " AND ".join(
                f"{comparison_sql(columns[i], quote_ident(name))} <=> %s"
                for i, name in enumerate(info.columns)
            )
            whens, params = [], []
            for index, (key, image) in enumerate(batch):
                whens.append(f"WHEN {names} = {one} THEN IF({compares}, {index}, {-1 - index})")
                params.extend(key)
                params.extend(
                    signed_value(image[i], columns[i], info.unsigned[i])
                    for i in range(len(info.columns))
                )
            params.extend(value for key, _image in batch for value in key)
            cur.execute(
                f"SELECT CASE {' '.join(whens)} END"  # noqa: S608 - quoted identifiers
                f" FROM {quote_qualified(inverse.database, table)}"
                f" WHERE {names} IN ({', '.join([one] * len(batch))}){suffix}",
                params,
            )
            seen = set()
            for (found,) in cur.fetchall():
                if found is None:
                    continue
                found = int(found)
                seen.add(found if found >= 0 else -1 - found)
                if found < 0:
                    conflict(
                        table, batch[-1 - found][0], "the row was changed again after the change"
                    )
            for index, (key, _image) in enumerate(batch):
                if index not in seen:
                    conflict(table, key, "the row was deleted after the change")
        for table, batch in inverse.after.batches(absent=True, size=KEY_BATCH):
            info = infos[table]
            names = ", ".join(quote_ident(info.columns[i]) for i in info.key)
            one = "(" + ", ".join(["%s"] * len(info.key)) + ")"
            cur.execute(
                f"SELECT {names} FROM {quote_qualified(inverse.database, table)}"  # noqa: S608 - quoted identifiers
                f" WHERE ({names}) IN ({', '.join([one] * len(batch))}){suffix}",
                [value for key, _image in batch for value in key],
            )
            for found in cur.fetchall():
                conflict(table, found, "the row the undo would re-insert exists again")
    return count, sample


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, int | str | float) or value is None:
        return value
    return str(value)


def inverse_statements(sql_lines: Iterable[bytes]) -> Iterator[str]:
    """The BINLOG statements of the tool's output, in order (the rest is client chatter,
    session settings the statements do not need, and its per-transaction BEGIN/COMMIT)."""
    current: list[bytes] | None = None
    for line in sql_lines:
        if current is None:
            if line.startswith(b"BINLOG '"):
                current = [line]
            else:
                continue
        else:
            current.append(line)
        if line.rstrip().endswith(b"'/*!*/;"):
            text = b"".join(current).rstrip()
            yield text[: -len(b"/*!*/;")].decode("ascii")
            current = None
    if current is not None:
        raise EngineError("the flashback SQL ends in the middle of a BINLOG statement")


MARKER_TABLE = "__shardvault_flashback"


def _marker_table_ensure(conn) -> None:
    """The table whose rows say which flashback was committed on this database (DDL: it
    commits by itself, so it runs before the flashback's transaction opens)."""
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {quote_ident(MARKER_TABLE)} ("
            " marker VARCHAR(191) NOT NULL PRIMARY KEY, section_sha256 CHAR(64) NOT NULL,"
            " row_count BIGINT NOT NULL, applied_at DATETIME(6) NOT NULL DEFAULT NOW(6))"
            " ENGINE=InnoDB"
        )


def flashback_applied(endpoint: Endpoint, database: str, marker: str) -> int | None:
    """The rows a flashback committed on `database` under `marker`, None when it was not
    (its marker row is written in the same transaction as the inverse)."""
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
                " AND TABLE_NAME = %s",
                (database, MARKER_TABLE),
            )
            if cur.fetchone() is None:
                return None
            cur.execute(
                f"SELECT row_count FROM {quote_ident(MARKER_TABLE)} WHERE marker = %s",  # noqa: S608 - quoted identifier
                (marker,),
            )
            row = cur.fetchone()
            return int(row[0]) if row else None
    finally:
        conn.close()


def flashback_markers_clear(endpoint: Endpoint, database: str, marker: str) -> None:
    """Forget `marker` once its run is over; the table goes when no other marker is left."""
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
                " AND TABLE_NAME = %s",
                (database, MARKER_TABLE),
            )
            if cur.fetchone() is None:
                return
            cur.execute(f"DELETE FROM {quote_ident(MARKER_TABLE)} WHERE marker = %s", (marker,))  # noqa: S608 - quoted identifier
            cur.execute(f"SELECT COUNT(*) FROM {quote_ident(MARKER_TABLE)}")  # noqa: S608 - quoted identifier
            if cur.fetchone()[0] == 0:
                cur.execute(f"DROP TABLE IF EXISTS {quote_ident(MARKER_TABLE)}")
    finally:
        conn.close()


def flashback_apply(
    *,
    endpoint: Endpoint,
    inverse: ShardInverse,
    infos: dict[str, TableInfo],
    sql_lines,
    marker: str = "",
) -> tuple[int, int, list[dict]]:
    """Lock and re-check every row, then run the inverse, all in ONE transaction.

    Returns (rows restored, conflict count, conflict sample); with a conflict nothing is
    written and the transaction is rolled back. With a `marker`, a row of MARKER_TABLE
    is written in the same transaction, so a run resumed after a crash knows for sure
    whether this database was undone; if the marker is already there, nothing is applied
    again and the rows it recorded are returned.
    """
    conn = connect(endpoint, inverse.database, autocommit=False)
    try:
        if marker:
            _marker_table_ensure(conn)
        with conn.cursor() as cur:
            cur.execute("START TRANSACTION")
            if marker:
                cur.execute(
                    f"SELECT row_count FROM {quote_ident(MARKER_TABLE)} WHERE marker = %s"  # noqa: S608 - quoted identifier
                    " FOR UPDATE",
                    (marker,),
                )
                done = cur.fetchone()
                if done is not None:
                    conn.rollback()
                    return int(done[0]), 0, []
        count, sample = flashback_conflicts(conn, inverse, infos, lock=True)
        if count:
            conn.rollback()
            return 0, count, sample
        with conn.cursor() as cur:
            for statement in inverse_statements(sql_lines):
                cur.execute(statement)
            if marker:
                cur.execute(
                    f"INSERT INTO {quote_ident(MARKER_TABLE)} (marker, section_sha256, row_count)"  # noqa: S608 - quoted identifier
                    " VALUES (%s, %s, %s)",
                    (marker, inverse.sha256, inverse.row_count),
                )
        conn.commit()
        return inverse.row_count, 0, []
    except Exception:
        try:
            conn.rollback()
        except Exception:  # noqa: BLE001, S110 - the connection may be gone; the server rolls back
            pass
        raise
    finally:
        conn.close()
