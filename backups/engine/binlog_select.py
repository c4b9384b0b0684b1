"""Choosing what of a binlog segment to apply to one restored database.

Plain Python (no Django). A segment's events are grouped into whole transactions
(`Transactions`); for each, `plan_statements` decides which statements are in the
restore's `Scope` (refusing, with `ScopeError`, what cannot be applied safely) and
`scoped_events` yields the kept events with their table maps renamed to the target.
`backups.engine.binlog_apply` sends the result through mariadb-binlog | mariadb.

Memory stays bounded: a transaction past SPOOL_BYTES spills to a temporary file.
"""

from __future__ import annotations

import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator

from backups.engine.binlog_events import (
    ANNOTATE_ROWS_EVENT,
    BINLOG_MAGIC,
    FL_STANDALONE,
    FORMAT_DESCRIPTION_EVENT,
    GTID_EVENT,
    HEADER_LEN,
    QUERY_EVENT,
    TABLE_MAP_EVENT,
    XID_EVENT,
    gtid_of,
    parse_header,
    query_of,
    table_map_names,
)
from backups.engine.errors import EngineError

SPOOL_BYTES = 64 << 20  # a transaction larger than this spills to a temporary file
ROWS_EVENTS = frozenset({23, 24, 25, 30, 31, 32, 166, 167, 168, 169, 170, 171})
STMT_END_F = 1


class Transaction:
    """One transaction's events, spilled to a temporary file past SPOOL_BYTES."""

    def __init__(self, first: bytes):
        self.first = first
        self.last = first
        self.count = 1
        self.size = len(first)
        self.events: list[bytes] = [first]
        self.spool = None

    def add(self, event: bytes) -> None:
        self.count += 1
        self.last = event
        if self.spool is not None:
            self.spool.write(event)
            return
        self.events.append(event)
        self.size += len(event)
        if self.size > SPOOL_BYTES:
            self.spool = tempfile.TemporaryFile(prefix="shardvault-trx-")
            for held in self.events:
                self.spool.write(held)
            self.events = []

    def __iter__(self) -> Iterator[bytes]:
        if self.spool is None:
            yield from self.events
            return
        self.spool.flush()
        self.spool.seek(0)
        while True:
            header = self.spool.read(HEADER_LEN)
            if not header:
                return
            size = int.from_bytes(header[9:13], "little")
            yield header + self.spool.read(size - HEADER_LEN)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class Transactions:
    """Group a segment's events into transactions.

    Yields (events, end_pos, commit_ts, dbs, standalone); `standalone` marks a DDL.
    """

    def __init__(self, blocks: Iterable[bytes]):
        self.blocks = iter(blocks)
        self.buffer = bytearray()
        self.fde: bytes | None = None
        self.table_map_post = 8

    def _events(self) -> Iterator[bytes]:
        buffer = self.buffer
        offset = 0
        magic_checked = False
        for block in self.blocks:
            buffer += block
            if not magic_checked:
                if len(buffer) < 4:
                    continue
                if bytes(buffer[:4]) != BINLOG_MAGIC:
                    raise EngineError("a binlog segment does not start with the binlog magic")
                offset = 4
                magic_checked = True
            while len(buffer) - offset >= HEADER_LEN:
                size = int.from_bytes(buffer[offset + 9 : offset + 13], "little")
                if len(buffer) - offset < size:
                    break
                yield bytes(buffer[offset : offset + size])
                offset += size
            del buffer[:offset]
            offset = 0
        if len(buffer) - offset:
            raise EngineError("a binlog segment ends in the middle of an event")

    def __iter__(self):
        group: Transaction | None = None
        dbs: set[str] = set()
        in_trx = False
        standalone = False
        for event in self._events():
            header = parse_header(event)
            if header.type == FORMAT_DESCRIPTION_EVENT:
                self.fde = event
                post = HEADER_LEN + 2 + 50 + 4 + 1 + TABLE_MAP_EVENT - 1
                self.table_map_post = event[post]
                continue
            if header.type == GTID_EVENT:
                _gtid, flags = gtid_of(event, header.server_id)
                if group is not None:
                    group.close()
                group, dbs, in_trx = Transaction(event), set(), True
                standalone = bool(flags & FL_STANDALONE)
                continue
            if not in_trx:
                continue  # rotate, checkpoint, gtid list: nothing to apply
            group.add(event)
            if header.type == TABLE_MAP_EVENT:
                dbs.add(table_map_names(event, self.table_map_post)[0])
            elif header.type == QUERY_EVENT:
                database, statement = query_of(event)
                head = statement[:8].upper()
                if head.startswith(b"COMMIT") or head.startswith(b"ROLLBACK"):
                    in_trx = False
                    yield group, header.next_pos, header.timestamp, dbs, False
                    continue
                if not head.startswith(b"BEGIN"):
                    dbs.add(database or "*")
                if standalone:
                    in_trx = False
                    yield group, header.next_pos, header.timestamp, dbs, True
            elif header.type == XID_EVENT:
                in_trx = False
                yield group, header.next_pos, header.timestamp, dbs, False


class ScopeError(EngineError):
    """A transaction mixes tables in and out of the restore's scope in one statement."""


def _with_crc(body: bytes, checksum: bool) -> bytes:
    """Fix the event size (and CRC32, when the binlog has checksums) after a rewrite."""
    total = len(body) + (4 if checksum else 0)
    body = body[:9] + total.to_bytes(4, "little") + body[13:]
    if checksum:
        body += zlib.crc32(body).to_bytes(4, "little")
    return body


def rewrite_table_map(event: bytes, post: int, database: str, table: str, checksum: bool) -> bytes:
    offset = HEADER_LEN + post
    db_len = event[offset]
    table_len = event[offset + 1 + db_len + 1]
    rest = offset + 1 + db_len + 1 + 1 + table_len + 1
    db_raw, table_raw = database.encode(), table.encode()
    end = len(event) - (4 if checksum else 0)
    body = (
        event[:offset]
        + bytes([len(db_raw)])
        + db_raw
        + b"\x00"
        + bytes([len(table_raw)])
        + table_raw
        + b"\x00"
        + event[rest:end]
    )
    return _with_crc(body, checksum)


# The table a DDL statement changes: the name after TABLE (the last part of a qualified name).
_DDL_TABLE = re.compile(
    r"\bTABLE\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(?:(?:`(?:[^`]|``)*`|\w+)\s*\.\s*)?"
    r"(?:`((?:[^`]|``)*)`|(\w+))",
    re.IGNORECASE,
)


class Scope:
    """Which source tables are restored, and under which target names."""

    def __init__(
        self,
        source_database: str,
        target_database: str,
        tables: dict[str, str] | None,
        excluded: Iterable[str] = (),
    ):
        self.source = source_database
        self.target = target_database
        self.tables = tables  # source table -> target table; None: every table of the database
        # Tables the set's policy excluded: never restored, so their events are never applied.
        self.excluded = frozenset(excluded)

    def wants(self, database: str, table: str) -> bool:
        return (
            database == self.source
            and (self.tables is None or table in self.tables)
            and table not in self.excluded
        )

    def target_table(self, table: str) -> str:
        return self.tables.get(table, table) if self.tables else table

    def renames(self) -> bool:
        return bool(self.tables) and any(k != v for k, v in self.tables.items())

    def names_source_explicitly(self, statement: bytes, *, always: bool = False) -> bool:
        """Whether the DDL's object is `src`.table (only matters when redirecting elsewhere).

        Looks at the name right after TABLE (or ON, for indexes), so `CREATE TABLE other.t
        LIKE src.t` (which only reads the source) is not mistaken for a change to it.
        """
        if self.source == self.target and not always:
            return False
        name = re.escape(self.source)
        pattern = rf"\b(?:TABLE|ON)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(?:`{name}`|{name})\s*\."
        return re.search(pattern, statement.decode("utf-8", "replace"), re.IGNORECASE) is not None

    def statement_touches(self, statement: bytes) -> bool:
        if self.excluded:
            match = _DDL_TABLE.search(statement.decode("utf-8", "replace"))
            if match and (match.group(1) or match.group(2)).replace("``", "`") in self.excluded:
                return False
        if self.tables is None:
            return True
        text = statement.decode("utf-8", "replace").lower()
        return any(name.lower() in text for name in self.tables)


def plan_statements(group: Transaction, scope: Scope, post: int) -> list[bool] | None:
    """Whether each statement of the transaction is kept; None when none of it is in scope.

    A statement is a run of table maps and row events ending with STMT_END_F, or one
    Query event. Read once here and once more when sending, so a huge transaction
    never has to sit in memory.
    """
    decisions: list[bool] = []
    tables: list[bool] = []
    events = iter(group)
    next(events)  # the GTID event
    for event in events:
        kind = event[4]
        if kind == TABLE_MAP_EVENT:
            tables.append(scope.wants(*table_map_names(event, post)))
        elif kind in ROWS_EVENTS:
            flags = int.from_bytes(event[HEADER_LEN + 6 : HEADER_LEN + 8], "little")
            if flags & STMT_END_F:
                if tables and all(tables):
                    decisions.append(True)
                elif any(tables):
                    raise ScopeError(
                        "a statement in the binlog changes tables inside and outside the "
                        "restore's scope together; restore all of them"
                    )
                else:
                    decisions.append(False)
                tables = []
        elif kind == QUERY_EVENT:
            database, statement = query_of(event)
            if statement[:8].upper().startswith((b"BEGIN", b"COMMIT", b"ROLLBACK")):
                continue
            if not database and scope.names_source_explicitly(statement, always=True):
                raise ScopeError(
                    f"a DDL statement in the window names database {scope.source} explicitly "
                    "without a default database; it cannot be applied to the restore safely "
                    "(restore to a point before it, or apply it by hand)"
                )
            keep = database == scope.source and scope.statement_touches(statement)
            if keep and scope.names_source_explicitly(statement):
                raise ScopeError(
                    f"a DDL statement in the window names database {scope.source} explicitly; "
                    "it cannot be redirected to the restore's database, so it is not applied "
                    "(restore to a point before it, or apply it by hand)"
                )
            if keep and scope.renames():
                raise ScopeError(
                    "a DDL statement in the window cannot be applied to renamed (in-place "
                    "shadow) tables; restore to a side database instead"
                )
            decisions.append(keep)
    return decisions if any(decisions) else None


def scoped_events(
    group: Transaction, decisions: list[bool], scope: Scope, post: int, checksum: bool
) -> Iterator[bytes]:
    """The events between the GTID event and the last one, for the scope (table maps renamed)."""
    index = 0
    count = group.count
    for position, event in enumerate(group):
        if position == 0 or position == count - 1:
            continue
        kind = event[4]
        keep = decisions[index] if index < len(decisions) else False
        if kind in (ANNOTATE_ROWS_EVENT, TABLE_MAP_EVENT) or kind in ROWS_EVENTS:
            if keep:
                if kind == TABLE_MAP_EVENT:
                    _database, table = table_map_names(event, post)
                    event = rewrite_table_map(
                        event, post, scope.target, scope.target_table(table), checksum
                    )
                yield event
            if kind in ROWS_EVENTS:
                flags = int.from_bytes(event[HEADER_LEN + 6 : HEADER_LEN + 8], "little")
                if flags & STMT_END_F:
                    index += 1
        elif kind == QUERY_EVENT:
            _database, statement = query_of(event)
            if statement[:8].upper().startswith((b"BEGIN", b"COMMIT", b"ROLLBACK")):
                yield event
                continue
            if keep:
                yield event
            index += 1
        else:
            yield event  # session variables and the like: harmless on their own
