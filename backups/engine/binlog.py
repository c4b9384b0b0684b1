"""Raw binlog capture over the replication protocol, and the segment index.

Plain Python (no Django). `capture_instance()` registers as a replica with its
own server_id, asks the server for its binlog from a start coordinate with
COM_BINLOG_DUMP (annotate-rows flag set, so the copy is byte for byte what
`mariadb-binlog --raw` would write) and writes each binlog file's range as a
segment: a valid binlog file stream (magic, the file's format description
event, then the events in range), handed chunk by chunk to a caller-supplied
`store(key, chunks) -> StoredObject` that compresses, encrypts and uploads it.
Only event headers (and the table map's names) are parsed; rows are decoded at
restore time (`backups.engine.binlog_apply`).

Nothing is ever skipped: a start coordinate that is no longer on the server
(purged binlogs) fails with a message saying a new full backup is needed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pymysql
from pymysql.constants.COMMAND import COM_BINLOG_DUMP, COM_REGISTER_SLAVE

from backups.engine.errors import Cancelled, ConnectError, EngineError
from backups.engine.mysql import Endpoint, connect, describe_error
from backups.engine.types import CancelFn, ProgressEvent, ProgressFn

BINLOG_MAGIC = b"\xfebin"
HEADER_LEN = 19
# COM_BINLOG_DUMP flags.
BINLOG_SEND_ANNOTATE_ROWS_EVENT = 2
# Event header flags.
LOG_EVENT_ARTIFICIAL_F = 0x20

# Event types used here (MariaDB numbering where it differs from MySQL).
QUERY_EVENT = 2
ROTATE_EVENT = 4
FORMAT_DESCRIPTION_EVENT = 15
XID_EVENT = 16
TABLE_MAP_EVENT = 19
HEARTBEAT_LOG_EVENT = 27
ANNOTATE_ROWS_EVENT = 160
BINLOG_CHECKPOINT_EVENT = 161
GTID_EVENT = 162
GTID_LIST_EVENT = 163
START_ENCRYPTION_EVENT = 164
QUERY_COMPRESSED_EVENT = 165
# GTID event flags (MariaDB).
FL_STANDALONE = 1

# Segments are flushed to `store` in blocks of about this size.
BLOCK_BYTES = 1 << 20
READ_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class StoredObject:
    """What `store(key, chunks)` returns once an object is durably written."""

    key: str
    raw_bytes: int
    stored_bytes: int
    sha256: str


StoreFn = Callable[[str, Iterable[bytes]], StoredObject]


@dataclass
class Segment:
    """One binlog file's captured range, as listed in the incremental manifest."""

    key: str = ""
    index: int = 0
    instance: str = ""
    first_file: str = ""
    first_pos: int = 0
    last_file: str = ""
    last_pos: int = 0  # the position after the last captured event
    first_gtid: str = ""
    last_gtid: str = ""
    first_event_at: datetime | None = None
    last_event_at: datetime | None = None
    events: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    sha256: str = ""
    tables: list[str] = field(default_factory=list)

    def manifest_entry(self) -> dict:
        return {
            "key": self.key,
            "index": self.index,
            "sha256": self.sha256,
            "stored_bytes": self.stored_bytes,
            "raw_bytes": self.raw_bytes,
            "instance": self.instance,
            "first_file": self.first_file,
            "first_pos": self.first_pos,
            "last_file": self.last_file,
            "last_pos": self.last_pos,
            "first_gtid": self.first_gtid,
            "last_gtid": self.last_gtid,
            "first_event_at": _iso(self.first_event_at),
            "last_event_at": _iso(self.last_event_at),
            "events": self.events,
            "tables": self.tables,
        }


@dataclass
class InstanceCapture:
    """The result of capturing one instance's binlog range."""

    instance: str
    start_file: str
    start_pos: int
    end_file: str
    end_pos: int
    end_gtid: str
    segments: list[Segment]
    events: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    last_event_at: datetime | None = None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- event header parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class EventHeader:
    timestamp: int
    type: int
    server_id: int
    size: int
    next_pos: int
    flags: int


_HEADER = struct.Struct("<IBIIIH")


def parse_header(event: bytes | memoryview) -> EventHeader:
    return EventHeader(*_HEADER.unpack_from(event, 0))


def table_map_names(event: bytes | memoryview, post_header_len: int = 8) -> tuple[str, str]:
    """(database, table) from a TABLE_MAP event; only the names, never the column data."""
    offset = HEADER_LEN + post_header_len
    db_len = event[offset]
    database = bytes(event[offset + 1 : offset + 1 + db_len]).decode("utf-8", "replace")
    offset += 1 + db_len + 1
    table_len = event[offset]
    table = bytes(event[offset + 1 : offset + 1 + table_len]).decode("utf-8", "replace")
    return database, table


def gtid_of(event: bytes | memoryview, server_id: int) -> tuple[str, int]:
    """('domain-server-seq', flags) from a MariaDB GTID event."""
    seq_no, domain_id, flags = struct.unpack_from("<QIB", event, HEADER_LEN)
    return f"{domain_id}-{server_id}-{seq_no}", flags


def query_of(event: bytes | memoryview) -> tuple[str, bytes]:
    """(default database, statement) of a QUERY event (statement raw, never decoded fully)."""
    # Post-header: thread id 4, exec time 4, db len 1, error code 2, status vars len 2.
    db_len = event[HEADER_LEN + 8]
    status_len = struct.unpack_from("<H", event, HEADER_LEN + 11)[0]
    db_start = HEADER_LEN + 13 + status_len
    database = bytes(event[db_start : db_start + db_len]).decode("utf-8", "replace")
    return database, bytes(event[db_start + db_len + 1 :])


def rotate_target(event: bytes | memoryview, checksum_len: int) -> tuple[str, int]:
    pos = struct.unpack_from("<Q", event, HEADER_LEN)[0]
    end = len(event) - checksum_len
    return bytes(event[HEADER_LEN + 8 : end]).decode(), pos


def binlog_index(name: str) -> int:
    """The numeric suffix of a binlog file name (binlog.000012 -> 12), for ordering."""
    try:
        return int(name.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return 0


def coordinate_key(file: str, pos: int) -> tuple[int, str, int]:
    return (binlog_index(file), file, int(pos))


# --- server side ----------------------------------------------------------------------------


def master_status(endpoint: Endpoint) -> tuple[str, int, str]:
    """(file, position, gtid_binlog_pos) the server is writing now."""
    return master_status_at(endpoint)[:3]


def _connect(endpoint: Endpoint, **options):
    """`connect`, with an unreachable server as an EngineError sentence."""
    try:
        return connect(endpoint, **options)
    except ConnectError as exc:
        raise EngineError(str(exc)) from exc


def master_status_at(endpoint: Endpoint) -> tuple[str, int, str, datetime]:
    """(file, position, gtid_binlog_pos, server time read just before them).

    Every transaction the server stamped at least a second before that time is before
    the returned position, which is what an incremental can promise to restore to.
    """
    conn = _connect(endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT UNIX_TIMESTAMP(NOW(6))")
            server_time = datetime.fromtimestamp(float(cur.fetchone()[0]), UTC)
            cur.execute("SHOW MASTER STATUS")
            row = cur.fetchone()
            if not row:
                raise EngineError(
                    f"instance {endpoint.name}: the binary log is off; incrementals need log_bin"
                )
            gtid = ""
            try:
                cur.execute("SELECT @@GLOBAL.gtid_binlog_pos")
                gtid = (cur.fetchone() or [""])[0] or ""
            except pymysql.MySQLError:
                gtid = ""
            return row[0], int(row[1]), gtid, server_time
    except pymysql.MySQLError as exc:
        raise EngineError(
            f"reading the binlog position failed: {describe_error(exc, endpoint)}"
        ) from exc
    finally:
        conn.close()


def binary_logs(endpoint: Endpoint) -> list[tuple[str, int]]:
    conn = _connect(endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW BINARY LOGS")
            return [(row[0], int(row[1])) for row in cur.fetchall()]
    except pymysql.MySQLError as exc:
        raise EngineError(f"listing the binlogs failed: {describe_error(exc, endpoint)}") from exc
    finally:
        conn.close()


def _purged_message(instance: str, file: str, pos: int) -> str:
    return (
        f"instance {instance}: binlog {file} at {pos} is no longer on the server (purged); "
        "the chain cannot continue, so a new full backup is needed"
    )


class BinlogDump:
    """A replica connection streaming raw events from (file, pos); iterate for event bytes.

    The first events are the server's fake ROTATE and the file's FORMAT_DESCRIPTION
    (artificial when starting past position 4); callers decide what to keep.
    """

    def __init__(self, endpoint: Endpoint, file: str, pos: int, *, server_id: int):
        self.endpoint = endpoint
        # Every event in range already exists on the server, so a long silence means trouble.
        self.conn = _connect(endpoint, read_timeout=READ_TIMEOUT_SECONDS)
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT @@GLOBAL.binlog_checksum")
                checksum = (cur.fetchone() or ["NONE"])[0] or "NONE"
                # Ask for events exactly as stored (with their checksums), GTID events included.
                cur.execute("SET @master_binlog_checksum = @@GLOBAL.binlog_checksum")
                cur.execute("SET @mariadb_slave_capability = 4")
            self.checksum_len = 0 if str(checksum).upper() == "NONE" else 4
            self._command(
                COM_REGISTER_SLAVE,
                struct.pack("<I", server_id)
                + b"\x00\x00\x00"  # hostname, user, password: empty
                + struct.pack("<HII", 0, 0, 0),
            )
            self.conn._read_packet()
            self._command(
                COM_BINLOG_DUMP,
                struct.pack("<IHI", pos, BINLOG_SEND_ANNOTATE_ROWS_EVENT, server_id)
                + file.encode(),
            )
        except pymysql.MySQLError as exc:
            self.close()
            raise self._translate(exc, file, pos) from exc

    def _command(self, command: int, payload: bytes) -> None:
        body = bytes([command]) + payload
        self.conn._next_seq_id = 0
        self.conn._write_bytes(struct.pack("<I", len(body))[:3] + b"\x00" + body)
        self.conn._next_seq_id = 1

    def _translate(self, exc: BaseException, file: str, pos: int) -> EngineError:
        code = exc.args[0] if exc.args else None
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        if code == 1236 and ("purged" in text or "Could not find" in text or "not find" in text):
            return EngineError(_purged_message(self.endpoint.name, file, pos))
        return EngineError(describe_error(exc, self.endpoint))

    def events(self, file: str, pos: int) -> Iterator[bytes]:
        """Raw events as the server sends them (read straight off the socket: this loop is
        the capture's hot path, so it skips PyMySQL's per-packet objects)."""
        read = self.conn._rfile.read
        try:
            while True:
                header = read(4)
                if len(header) < 4:
                    raise EngineError(
                        f"instance {self.endpoint.name}: the server closed the replication stream"
                    )
                length = header[0] | header[1] << 8 | header[2] << 16
                payload = read(length)
                while length == 0xFFFFFF:  # an event larger than one protocol packet
                    header = read(4)
                    length = header[0] | header[1] << 8 | header[2] << 16
                    payload += read(length)
                marker = payload[0]
                if marker == 0xFF:
                    code = struct.unpack_from("<H", payload, 1)[0]
                    text = payload[9:] if payload[3:4] == b"#" else payload[3:]
                    error = pymysql.err.OperationalError(code, text.decode("utf-8", "replace"))
                    raise self._translate(error, file, pos)
                if marker == 0xFE and length < 9:
                    return  # EOF: only in non-blocking mode
                yield payload[1:]
        except OSError as exc:
            raise EngineError(
                f"instance {self.endpoint.name}: reading the binlog failed: {exc}"
            ) from exc

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a broken replica connection
            pass


# --- capture --------------------------------------------------------------------------------


def segment_key(
    set_prefix: str, instance: str, binlog_file: str, index: int, encrypted: bool
) -> str:
    return f"{set_prefix}/binlog/{instance}/{binlog_file}.{index}.zst" + (
        ".enc" if encrypted else ""
    )


def capture_instance(
    *,
    endpoint: Endpoint,
    instance: str,
    start_file: str,
    start_pos: int,
    end_file: str,
    end_pos: int,
    end_gtid: str = "",
    set_prefix: str,
    store: StoreFn,
    server_id: int,
    encrypted: bool = False,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> InstanceCapture:
    """Copy the binlog of one instance from (start_file, start_pos) to (end_file, end_pos).

    One segment per binlog file touched; an empty range gives no segment. Each
    segment is handed to `store` as a stream of blocks; nothing holds a whole
    binlog file in memory. Raises `EngineError` when the start is purged or the
    server cannot be read; never skips events.
    """
    result = InstanceCapture(
        instance=instance,
        start_file=start_file,
        start_pos=start_pos,
        end_file=end_file,
        end_pos=end_pos,
        end_gtid=end_gtid,
        segments=[],
    )
    if coordinate_key(start_file, start_pos) >= coordinate_key(end_file, end_pos):
        return result
    on_server = dict(binary_logs(endpoint))
    if start_file not in on_server or start_pos > on_server[start_file]:
        raise EngineError(_purged_message(instance, start_file, start_pos))

    dump = BinlogDump(endpoint, start_file, start_pos, server_id=server_id)
    try:
        stream = _Stream(dump, start_file, start_pos, end_file, end_pos, should_cancel)
        index = 0
        while not stream.finished:
            index += 1
            segment = Segment(index=index, instance=instance)
            writer = _SegmentWriter(stream, segment)
            key = segment_key(set_prefix, instance, stream.file, index, encrypted)
            segment.key = key
            stored = store(key, writer.blocks())
            if not writer.complete:
                raise EngineError(
                    f"instance {instance}: segment {key} was not fully read by storage"
                )
            segment.raw_bytes = stored.raw_bytes
            segment.stored_bytes = stored.stored_bytes
            segment.sha256 = stored.sha256
            if segment.events == 0:
                continue  # only a format description: nothing of the range in this file
            result.segments.append(segment)
            result.events += segment.events
            result.raw_bytes += segment.raw_bytes
            result.stored_bytes += segment.stored_bytes
            if segment.last_event_at:
                result.last_event_at = segment.last_event_at
            if progress:
                progress(
                    ProgressEvent(
                        shard=instance,
                        stage="binlog",
                        bytes_done=segment.raw_bytes,
                        message=f"captured {segment.first_file} {segment.first_pos}..{segment.last_pos}",
                    )
                )
    finally:
        dump.close()
    return result


class _Stream:
    """The dump's events and where the copy stands, shared by the segments of one capture."""

    def __init__(self, dump, start_file, start_pos, end_file, end_pos, should_cancel):
        self.dump = dump
        self.events = dump.events(start_file, start_pos)
        self.file = start_file
        self.end_file = end_file
        self.end_pos = end_pos
        self.end_index = binlog_index(end_file)
        self.finished = False
        self.fde: bytes | None = None
        self.should_cancel = should_cancel
        self.checksum_len = dump.checksum_len


class _SegmentWriter:
    """Yields one file's range as binlog file bytes, filling in the segment's index."""

    def __init__(self, stream: _Stream, segment: Segment):
        self.stream = stream
        self.segment = segment
        self.complete = False

    def blocks(self) -> Iterator[bytes]:
        stream, segment = self.stream, self.segment
        unpack = _HEADER.unpack_from
        buffer = bytearray()
        tables: dict[str, None] = {}
        events = 0
        first_ts = last_ts = 0
        last_pos = 0
        post = 8
        should_cancel = stream.should_cancel
        end_file, end_pos = stream.end_file, stream.end_pos
        for event in stream.events:
            ts, kind, server_id, size, next_pos, flags = unpack(event, 0)
            if kind == HEARTBEAT_LOG_EVENT:
                continue
            if kind == ROTATE_EVENT and (next_pos == 0 or ts == 0):
                # The server's fake rotate at the start of every file it sends.
                stream.file = rotate_target(event, stream.checksum_len)[0]
                continue
            if kind == FORMAT_DESCRIPTION_EVENT:
                stream.fde = event
                continue
            if flags & LOG_EVENT_ARTIFICIAL_F or next_pos == 0:
                continue
            if events == 0:
                if stream.fde is None:
                    raise EngineError(
                        f"instance {segment.instance}: no format description event was sent"
                    )
                buffer += BINLOG_MAGIC
                buffer += stream.fde
                post = stream.fde[HEADER_LEN + 2 + 50 + 4 + 1 + TABLE_MAP_EVENT - 1]
                segment.first_file = segment.last_file = stream.file
                segment.first_pos = next_pos - size
                first_ts = ts
            events += 1
            last_pos = next_pos
            if ts:
                last_ts = ts
            if kind == GTID_EVENT:
                gtid = gtid_of(event, server_id)[0]
                segment.first_gtid = segment.first_gtid or gtid
                segment.last_gtid = gtid
            elif kind == TABLE_MAP_EVENT:
                database, table = table_map_names(event, post)
                tables.setdefault(f"{database}.{table}")
            elif kind == QUERY_EVENT:
                database, statement = query_of(event)
                if not statement.startswith((b"BEGIN", b"COMMIT", b"ROLLBACK")):
                    # A statement (DDL): its default database, or "*" when it had none.
                    tables.setdefault(f"{database or '*'}.*")
            buffer += event
            if len(buffer) >= BLOCK_BYTES:
                yield bytes(buffer)
                buffer.clear()
            if events % 5000 == 0 and should_cancel and should_cancel():
                raise Cancelled("cancelled while reading the binlog")
            if stream.file == end_file and next_pos >= end_pos:
                stream.finished = True
                break
            if kind == ROTATE_EVENT:
                # The real rotate ends this file; the next segment starts with the next file.
                stream.file = rotate_target(event, stream.checksum_len)[0]
                if binlog_index(stream.file) > stream.end_index:
                    stream.finished = True
                break
        else:
            raise EngineError(f"instance {segment.instance}: the binlog stream ended early")
        segment.events = events
        segment.last_pos = last_pos
        segment.first_event_at = datetime.fromtimestamp(first_ts, UTC) if events else None
        segment.last_event_at = datetime.fromtimestamp(last_ts, UTC) if last_ts else None
        segment.tables = sorted(tables)
        if buffer:
            yield bytes(buffer)
        self.complete = True
