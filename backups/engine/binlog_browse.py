"""The transactions of one stored binlog segment, summarised for a person.

Plain Python (no Django). `segment_transactions(blocks, file=...)` reads a segment's
decoded bytes block by block and yields one `TransactionSummary` per transaction: its
GTID, start and end position, commit time, the tables it changed with inserted /
updated / deleted row counts, and its statements when the binlog recorded them
(ANNOTATE_ROWS events, `binlog_annotate_row_events`). One event is in memory at a time.

`wants(database, table)`, when given, keeps only the transactions that change a
wanted table (and skips counting the rows of the others). A statement run without a
default database that names no table as `db.table` (DROP DATABASE x, CREATE USER ...)
is asked about as `wants("", word)` for each of its words: it cannot be attributed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from backups.engine.binlog_events import (
    ANNOTATE_ROWS_EVENT,
    FL_STANDALONE,
    FORMAT_DESCRIPTION_EVENT,
    GTID_EVENT,
    HEADER_LEN,
    QUERY_COMPRESSED_EVENT,
    QUERY_EVENT,
    TABLE_MAP_EVENT,
    XID_EVENT,
    gtid_of,
    query_of,
    query_uncompressed,
    split_events,
)
from backups.engine.binlog_rows import (
    ROWS_EVENTS,
    UPDATE_ROWS,
    WRITE_ROWS,
    count_rows,
    rows_table_id,
    table_map_parse,
)
from backups.engine.errors import EngineError

STATEMENT_LIMIT = 4000  # characters of statement text kept per transaction


@dataclass
class TransactionSummary:
    gtid: str
    file: str
    start_pos: int
    end_pos: int = 0
    committed_at: int = 0  # unix seconds (binlog time is whole seconds)
    databases: list[str] = field(default_factory=list)
    # (database, table) -> [inserted, updated, deleted]
    tables: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    statement: str = ""
    ddl: bool = False


class FormatDescription:
    """What the segment's format description event says about the others."""

    def __init__(self, event: bytes):
        self.event = event
        lens_at = HEADER_LEN + 2 + 50 + 4 + 1
        self.post_header = event[lens_at:]
        self.checksum = len(event) > 5 and event[-5] == 1

    def post_header_len(self, kind: int) -> int:
        return self.post_header[kind - 1] if kind - 1 < len(self.post_header) else 8


def binlog_events(blocks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(start position, event) for each event of a binlog file stream (magic first); a
    compressed query event comes as the plain QUERY event it packs."""
    position = 0
    checksum = False
    for event in split_events(blocks):
        size = len(event)
        next_pos = int.from_bytes(event[13:17], "little")
        position = next_pos - size if next_pos else position
        if event[4] == FORMAT_DESCRIPTION_EVENT:
            checksum = len(event) > 5 and event[-5] == 1
        elif event[4] == QUERY_COMPRESSED_EVENT:
            # log_bin_compress: handed on as the plain statement it packs.
            try:
                event = query_uncompressed(event, checksum)
            except ValueError as exc:
                raise EngineError(
                    f"the compressed statement at binlog position {position} cannot be read ({exc})"
                ) from exc
        yield position, event
        position = next_pos or position + size


def segment_transactions(
    blocks: Iterable[bytes],
    *,
    file: str,
    wants: Callable[[str, str], bool] | None = None,
) -> Iterator[TransactionSummary]:
    """Each whole transaction of a segment, in binlog order (see the module docstring)."""
    fde: FormatDescription | None = None
    maps: dict = {}
    current: TransactionSummary | None = None
    wanted = False
    statements: list[str] = []
    parsed: dict[bytes, object] = {}
    for position, event in binlog_events(blocks):
        kind = event[4]
        if kind == FORMAT_DESCRIPTION_EVENT:
            fde = FormatDescription(event)
            continue
        if kind == GTID_EVENT:
            server_id = int.from_bytes(event[5:9], "little")
            gtid, flags = gtid_of(event, server_id)
            current = TransactionSummary(gtid=gtid, file=file, start_pos=position)
            current.ddl = bool(flags & FL_STANDALONE)
            wanted, statements, maps = wants is None, [], {}
            continue
        if current is None:
            continue  # rotate, checkpoint, GTID list, or the tail of a transaction cut off
        if fde is None:
            raise EngineError(f"binlog segment {file} has no format description event")
        done = False
        if kind == TABLE_MAP_EVENT:
            # A busy binlog maps the same tables over and over: parse each mapping once.
            body = event[HEADER_LEN : len(event) - 4 if fde.checksum else len(event)]
            table_map = parsed.get(body)
            if table_map is None:
                if len(parsed) > 4096:
                    parsed.clear()
                table_map = table_map_parse(event, fde.post_header_len(TABLE_MAP_EVENT))
                parsed[body] = table_map
            maps[table_map.table_id] = table_map
            if table_map.database not in current.databases:
                current.databases.append(table_map.database)
            if wants is not None and wants(table_map.database, table_map.table):
                wanted = True
        elif kind in ROWS_EVENTS:
            table_map = maps.get(rows_table_id(event))
            if table_map is None:
                continue
            if wants is not None and not wants(table_map.database, table_map.table):
                continue
            rows = count_rows(event, table_map, fde.post_header_len(kind), fde.checksum)
            counts = current.tables.setdefault((table_map.database, table_map.table), [0, 0, 0])
            # count_rows refused compressed rows events: what is left writes, updates or deletes
            counts[0 if kind in WRITE_ROWS else 1 if kind in UPDATE_ROWS else 2] += rows
        elif kind == ANNOTATE_ROWS_EVENT:
            end = len(event) - (4 if fde.checksum else 0)
            statements.append(event[HEADER_LEN:end].decode("utf-8", "replace"))
        elif kind == QUERY_EVENT:
            database, statement = query_of(event)
            if fde.checksum:
                statement = statement[:-4]
            head = statement[:8].upper()
            if head.startswith((b"COMMIT", b"ROLLBACK")):
                done = True
            elif not head.startswith(b"BEGIN"):
                text = statement.decode("utf-8", "replace")
                statements.append(text)
                named = statement_tables(database, text)
                if not database and any(name_db for name_db, _table in named):
                    # No default database: the qualified names are what it changes.
                    named = [(name_db, table) for name_db, table in named if name_db]
                for name_db, _table in named:
                    if name_db and name_db not in current.databases:
                        current.databases.append(name_db)
                if wants is not None and any(wants(d, t) for d, t in named):
                    wanted = True
                if current.ddl:
                    done = True
        elif kind == XID_EVENT:
            done = True
        if done:
            current.end_pos = int.from_bytes(event[13:17], "little")
            current.committed_at = int.from_bytes(event[0:4], "little")
            current.statement = ";\n".join(statements)[:STATEMENT_LIMIT]
            if wanted:
                yield current
            current = None


_NAME = r"(?:`((?:[^`]|``)+)`|([A-Za-z0-9_$\u0080-\uffff]+))"
_QUALIFIED = re.compile(_NAME + r"\s*\.\s*" + _NAME)
_WORD = re.compile(_NAME)


def statement_tables(database: str, text: str) -> list[tuple[str, str]]:
    """(database, name) pairs a statement may name: `db`.`t` as written, and every other
    word under the session's default database. Generous on purpose: a word that is no
    table only costs a transaction shown that a table filter did not need."""
    pairs = []
    for found in _QUALIFIED.finditer(text):
        db = (found.group(1) or found.group(2) or "").replace("``", "`")
        table = (found.group(3) or found.group(4) or "").replace("``", "`")
        pairs.append((db, table))
    rest = _QUALIFIED.sub(" ", text)
    for found in _WORD.finditer(rest):
        pairs.append((database, (found.group(1) or found.group(2)).replace("``", "`")))
    if database and not pairs:
        pairs.append((database, ""))
    return pairs
