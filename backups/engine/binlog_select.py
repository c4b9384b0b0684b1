"""Choosing what of a binlog segment to apply to one restored database.

Plain Python (no Django). A segment's events are grouped into whole transactions
(`Transactions`); for each, `plan_statements` decides which statements are in the
restore's `Scope` (refusing, with `ScopeError`, what cannot be applied safely) and
`scoped_events` yields the kept events with their table maps renamed to the target.
`backups.engine.binlog_apply` sends the result through mariadb-binlog | mariadb.

Memory stays bounded: a transaction past SPOOL_BYTES spills to a temporary file.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterable, Iterator

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
    parse_header,
    query_of,
    query_uncompressed,
    split_events,
    table_map_names,
)
from backups.engine.ddl import (
    CHANGES,
    DATABASE,
    DML,
    HARMLESS,
    OBJECT,
    READS,
    RENAME,
    TEMPORARY,
    TRANSACTION,
    UNKNOWN,
    TableRef,
    ddl_analyse,
)
from backups.engine.errors import EngineError
from backups.engine.mysql import quote_qualified

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
        self.fde: bytes | None = None
        self.table_map_post = 8

    def _events(self) -> Iterator[bytes]:
        return split_events(self.blocks)

    def __iter__(self):
        group: Transaction | None = None
        dbs: set[str] = set()
        in_trx = False
        standalone = False
        for event in self._events():
            header = parse_header(event)
            if header.type == QUERY_COMPRESSED_EVENT:
                # log_bin_compress: read as the plain statement it packs, so the DDL rules
                # judge it like any other (an unreadable one refuses, never slips through).
                event = _query_plain(event, self.fde, header)
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


def _query_plain(event: bytes, fde: bytes | None, header) -> bytes:
    checksum = fde is not None and len(fde) > 5 and fde[-5] == 1
    try:
        return query_uncompressed(event, checksum)
    except ValueError as exc:
        raise ScopeError(
            f"the compressed statement ending at binlog position {header.next_pos} cannot be "
            f"read ({exc}); it is refused rather than applied or skipped unread"
        ) from exc


class ScopeError(EngineError):
    """A statement of the window cannot be applied to the restore safely; `statement` names it."""

    def __init__(self, message: str, *, statement: str = ""):
        super().__init__(message)
        self.statement = statement


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


class Scope:
    """Which source tables are restored, and under which target names.

    `tables` maps source tables to target tables (None: every table of the database, same
    names). `whole_database` also takes in tables the window creates (same names; tables
    that existed but were left out of the set, by policy, stay out). Tables
    a shadow-table migration creates from an in-scope table (`CREATE TABLE _t_gho LIKE t`,
    and the names a rename gives in-scope tables) join the scope as the window is read, so
    a gh-ost or pt-online-schema-change swap is applied whole. `excluded` names tables the
    set's policy excluded: never restored, so their events are never applied.
    """

    def __init__(
        self,
        source_database: str,
        target_database: str,
        tables: dict[str, str] | None,
        excluded: Iterable[str] = (),
        *,
        whole_database: bool = False,
    ):
        self.source = source_database
        self.target = target_database
        self.tables = dict(tables) if tables is not None else None
        self.excluded = frozenset(excluded)
        self.whole_database = whole_database and not self.renames()

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

    def _join(self, table: str) -> None:
        if self.tables is not None:
            self.tables.setdefault(table, table)

    def plan_query(self, event: bytes, checksum: bool) -> bool | bytes:
        """What to do with one QUERY event: False skip, True keep, bytes: send this instead.

        A statement that changes an in-scope table is rewritten to name the target's
        tables (qualified, so the session's default database no longer matters) or
        refused with `ScopeError` naming it; it is never skipped.
        """
        database, statement = query_of(event)
        if checksum:
            statement = statement[:-4]
        text = statement.decode("utf-8", "surrogateescape")
        ddl = ddl_analyse(text)
        src = self.source

        def in_db(ref: TableRef) -> bool:
            return ref.resolved(database) == src

        def in_scope(ref: TableRef) -> bool:
            return in_db(ref) and self.wants(src, ref.table)

        def refuse(reason: str) -> ScopeError:
            return ScopeError(f"the statement `{_shown(text)}` {reason}", statement=text)

        names_source = [r for r in ddl.stray if r.database == src]
        if ddl.kind == TRANSACTION:
            return True
        if ddl.kind in (HARMLESS, TEMPORARY):
            return False
        if ddl.kind == DATABASE:
            if src in ddl.databases:
                raise refuse(f"changes the restored database {src} itself")
            return False
        if ddl.kind == DML:
            if database == src or names_source:
                raise refuse(
                    f"changes rows of {src} as a statement (the binlog is not in ROW format); "
                    "it cannot be applied to one restored table safely"
                )
            return False
        if ddl.kind == UNKNOWN:
            if database == src or names_source:
                raise refuse(f"may change {src}, and ShardVault cannot tell what it changes")
            return False
        if ddl.kind == OBJECT:
            if any(in_scope(r) for r in ddl.refs[1:]) or (
                self.whole_database and (in_db(ddl.refs[0]) or names_source)
            ):
                raise refuse(
                    f"creates or drops a {ddl.refs[0].role.lower()} in {src}; "
                    "it is not replayed into a restore"
                )
            return False
        if ddl.kind == RENAME:
            return self._plan_rename(ddl, text, event, checksum, in_db, in_scope, refuse)
        # TABLE
        changed = [r for r in ddl.refs if r.role == CHANGES]
        if not any(in_scope(r) for r in changed):
            created = changed[0] if changed else None
            reads = [r for r in ddl.refs if r.role == READS]
            creates = (
                ddl.head == "CREATE"
                and created is not None
                and in_db(created)
                and not self.renames()
            )
            if creates and ddl.creates_like and reads and all(in_scope(r) for r in reads):
                self._join(created.table)  # a shadow copy of an in-scope table (gh-ost, pt-osc)
            elif creates and self.whole_database and not ddl.creates_like:
                self._join(created.table)  # a new table of a whole-database restore
            elif names_source:
                raise refuse(f"names {src} in a way ShardVault cannot follow")
            else:
                return False
        outside = [r for r in ddl.refs if not in_scope(r)]
        if outside or names_source:
            named = ", ".join(_ref_name(r, database) for r in outside + names_source)
            raise refuse(
                f"also names {named}, which the restore does not hold; it cannot be applied "
                "to the restore's tables alone"
            )
        if self.renames() and ddl.head in ("CREATE", "DROP"):
            raise refuse("creates or drops a table, which cannot be done to in-place shadow tables")
        return self._rewritten(event, text, ddl.refs, checksum)

    def _plan_rename(self, ddl, text, event, checksum, in_db, in_scope, refuse) -> bool | bytes:
        if not any(in_scope(old) or in_scope(new) for old, new in ddl.renames):
            return False
        if self.renames():
            raise refuse("renames a table, which cannot be done to in-place shadow tables")
        for old, new in ddl.renames:
            if not in_scope(old):
                raise refuse(
                    f"puts {_ref_name(old, None)} in the place of {_ref_name(new, None)}, but the "
                    f"restore does not hold {_ref_name(old, None)}"
                )
            if not in_db(new):
                raise refuse(
                    f"moves {_ref_name(old, None)} out of {self.source}; the restore cannot follow it"
                )
        for _old, new in ddl.renames:
            self._join(new.table)
        refs = [r for pair in ddl.renames for r in pair]
        return self._rewritten(event, text, refs, checksum)

    def _rewritten(self, event: bytes, text: str, refs: list[TableRef], checksum: bool) -> bytes:
        """The event with every named table replaced by its target, and the target as default."""
        pieces, last = [], 0
        for ref in sorted(refs, key=lambda r: r.start):
            pieces.append(text[last : ref.start])
            pieces.append(quote_qualified(self.target, self.target_table(ref.table)))
            last = ref.end
        pieces.append(text[last:])
        statement = "".join(pieces).encode("utf-8", "surrogateescape")
        return rewrite_query(event, self.target, statement, checksum)


def _shown(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _ref_name(ref: TableRef, default_database: str | None) -> str:
    database = ref.database if ref.database is not None else default_database
    return f"{database}.{ref.table}" if database else ref.table


def rewrite_query(event: bytes, database: str, statement: bytes, checksum: bool) -> bytes:
    """A QUERY event with its default database and statement replaced (status vars kept)."""
    status_len = int.from_bytes(event[HEADER_LEN + 11 : HEADER_LEN + 13], "little")
    db_start = HEADER_LEN + 13 + status_len
    db_raw = database.encode()
    body = (
        event[: HEADER_LEN + 8]
        + bytes([len(db_raw)])
        + event[HEADER_LEN + 9 : db_start]
        + db_raw
        + b"\x00"
        + statement
    )
    return _with_crc(body, checksum)


def plan_statements(
    group: Transaction, scope: Scope, post: int, checksum: bool = False
) -> list[bool | bytes] | None:
    """What to do with each statement of the transaction; None when none of it is in scope.

    A statement is a run of table maps and row events ending with STMT_END_F, or one
    Query event (True: keep, False: drop, bytes: a rewritten Query event to send instead).
    Read once here and once more when sending, so a huge transaction never has to sit in
    memory. `checksum`: whether the binlog's events end with a CRC32.
    """
    decisions: list[bool | bytes] = []
    tables: list[bool] = []
    meaningful = False
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
                    meaningful = True
                elif any(tables):
                    raise ScopeError(
                        "a statement in the binlog changes tables inside and outside the "
                        "restore's scope together; restore all of them"
                    )
                else:
                    decisions.append(False)
                tables = []
        elif kind == QUERY_EVENT:
            _database, statement = query_of(event)
            if statement[:8].upper().startswith((b"BEGIN", b"COMMIT", b"ROLLBACK")):
                continue
            decision = scope.plan_query(event, checksum)
            decisions.append(decision)
            if decision is not True or not _is_transaction_control(statement):
                meaningful = meaningful or decision is not False
    return decisions if meaningful else None


def _is_transaction_control(statement: bytes) -> bool:
    return statement.lstrip()[:9].upper().startswith((b"SAVEPOINT", b"RELEASE", b"XA "))


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
            if isinstance(keep, bytes):
                yield keep
            elif keep:
                yield event
            index += 1
        else:
            yield event  # session variables and the like: harmless on their own


def transaction_around(blocks: Iterable[bytes], pos: int) -> dict | None:
    """The transaction of a one-file segment that `pos` falls strictly inside (after its
    GTID event starts, before its commit ends): {"gtid", "start_pos", "end_pos"}; None
    when `pos` is a boundary between transactions (or past the segment)."""
    last_end = 0
    for group, end_pos, _commit_ts, _dbs, _standalone in Transactions(blocks):
        header = parse_header(group.first)
        start_pos = header.next_pos - header.size
        gtid = gtid_of(group.first, header.server_id)[0]
        group.close()
        if end_pos < last_end or start_pos >= pos:
            return None  # another file began (rotated), or every later transaction is past pos
        last_end = end_pos
        if start_pos < pos < end_pos:
            return {"gtid": gtid, "start_pos": start_pos, "end_pos": end_pos}
    return None


def transaction_find(blocks: Iterable[bytes], gtid: str) -> dict | None:
    """Where the transaction `gtid` sits in a segment: start and end position, commit time
    (epoch seconds) and the databases it touches; None when the segment does not hold it."""
    transactions = Transactions(blocks)
    for group, end_pos, commit_ts, dbs, _standalone in transactions:
        header = parse_header(group.first)
        found = gtid_of(group.first, header.server_id)[0] == gtid
        if found:
            start_pos = header.next_pos - header.size
            group.close()
            return {
                "start_pos": start_pos,
                "end_pos": end_pos,
                "commit_ts": commit_ts,
                "databases": sorted(d for d in dbs if d != "*"),
            }
        group.close()
    return None
