"""Binlog event headers and the few event bodies ShardVault reads.

Plain Python (no Django). Shared by capture (`backups.engine.capture`) and apply
(`backups.engine.binlog_select`, `backups.engine.binlog_apply`): the event type
numbers, the 19-byte header, and the names, GTIDs, statements and rotate targets
read from single events. Rows are never decoded here; the server's own decoder
does that at restore time.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from backups.engine.errors import EngineError

BINLOG_MAGIC = b"\xfebin"
HEADER_LEN = 19
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


@dataclass(frozen=True)
class EventHeader:
    timestamp: int
    type: int
    server_id: int
    size: int
    next_pos: int
    flags: int


# (timestamp, type, server_id, size, next_pos, flags): unpack_from(event, 0) where
# building an EventHeader per event costs too much (the capture's hot path).
EVENT_HEADER = struct.Struct("<IBIIIH")


def parse_header(event: bytes | memoryview) -> EventHeader:
    return EventHeader(*EVENT_HEADER.unpack_from(event, 0))


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


def query_uncompressed(event: bytes, checksum: bool) -> bytes:
    """The plain QUERY event a QUERY_COMPRESSED_EVENT stands for (`log_bin_compress`).

    The compressed event is a QUERY event whose statement is packed: one byte 0x80 |
    (algorithm << 4) | length-of-length, the statement's length (big-endian), then the
    zlib stream. The event type becomes QUERY_EVENT; its position fields stay; its size
    (and CRC32 when `checksum`) follow the new body. ValueError when it cannot be read:
    callers refuse the transaction rather than let an unread statement through.
    """
    status_len = struct.unpack_from("<H", event, HEADER_LEN + 11)[0]
    start = HEADER_LEN + 13 + status_len + event[HEADER_LEN + 8] + 1
    packed = bytes(event[start : len(event) - (4 if checksum else 0)])
    if not packed or not packed[0] & 0x80 or (packed[0] & 0x70) or not 1 <= packed[0] & 7 <= 4:
        raise ValueError("a compressed query event uses an unknown packing")
    lenlen = packed[0] & 7
    size = int.from_bytes(packed[1 : 1 + lenlen], "big")
    try:
        statement = zlib.decompress(packed[1 + lenlen :])
    except zlib.error as exc:
        raise ValueError(f"a compressed query event does not decompress ({exc})") from exc
    if len(statement) != size:
        raise ValueError("a compressed query event decompresses to the wrong length")
    body = bytearray(event[:start] + statement)
    body[4] = QUERY_EVENT
    body[9:13] = (len(body) + (4 if checksum else 0)).to_bytes(4, "little")
    if checksum:
        body += zlib.crc32(body).to_bytes(4, "little")
    return bytes(body)


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


def split_events(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Each event of a binlog file stream (the 4-byte magic first), whatever the block sizes;
    EngineError for a stream without the magic or one that ends mid-event."""
    buffer = bytearray()
    offset = 0
    magic_checked = False
    for block in blocks:
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
    if buffer:
        raise EngineError("a binlog segment ends in the middle of an event")
