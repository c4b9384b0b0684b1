"""Raw binlog capture: one instance's binlog range copied into stored segments.

Plain Python (no Django). `capture_instance()` streams the binlog from a start
coordinate through `backups.engine.binlog.BinlogDump` and writes each binlog
file's range as a segment: a valid binlog file stream (magic, the file's format
description event, then the events in range), handed chunk by chunk to a
caller-supplied `store(key, chunks) -> StoredObject` that compresses, encrypts and
uploads it. Only event headers (and the table map's names) are parsed; rows are
decoded at restore time (`backups.engine.binlog_apply`).

Nothing is ever skipped: a start coordinate that is no longer on the server
(purged binlogs) fails with a message saying a new full backup is needed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from backups.engine.binlog import BinlogDump, binary_logs, purged_message
from backups.engine.binlog_events import (
    BINLOG_MAGIC,
    EVENT_HEADER,
    FORMAT_DESCRIPTION_EVENT,
    GTID_EVENT,
    HEADER_LEN,
    HEARTBEAT_LOG_EVENT,
    LOG_EVENT_ARTIFICIAL_F,
    QUERY_COMPRESSED_EVENT,
    QUERY_EVENT,
    ROTATE_EVENT,
    TABLE_MAP_EVENT,
    binlog_index,
    coordinate_key,
    gtid_of,
    query_of,
    rotate_target,
    table_map_names,
)
from backups.engine.errors import ODD_ANSWER, Cancelled, EngineError, OddAnswer
from backups.engine.mysql import Endpoint
from backups.engine.types import CancelFn, ProgressEvent, ProgressFn

# Segments are flushed to `store` in blocks of about this size.
BLOCK_BYTES = 1 << 20


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
        raise EngineError(purged_message(instance, start_file, start_pos))

    try:
        return _capture(
            result, endpoint, instance, start_file, start_pos, end_file, end_pos,
            set_prefix, store, server_id, encrypted, progress, should_cancel,
        )  # fmt: skip
    except (*ODD_ANSWER, struct.error) as exc:  # events or answers of the wrong shape
        raise OddAnswer(instance, f"reading its binlog from {start_file}:{start_pos}") from exc


def _capture(
    result, endpoint, instance, start_file, start_pos, end_file, end_pos,
    set_prefix, store, server_id, encrypted, progress, should_cancel,
) -> InstanceCapture:  # fmt: skip
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
        unpack = EVENT_HEADER.unpack_from
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
            elif kind in (QUERY_EVENT, QUERY_COMPRESSED_EVENT):
                database, statement = query_of(event)  # (a compressed one: still not BEGIN)
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
