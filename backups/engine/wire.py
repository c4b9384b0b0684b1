"""Reading the dump's result sets straight off the MySQL wire.

PyMySQL parses each row packet through several Python calls (~4 us a row). The dump
reads the packets itself: either one finished chunk line per row, built by the server
(one length-coded string per packet, parsed here in Python), or, when the optional C
helper `_rowlines` is built, the row's columns as binary, which the helper turns into the
same chunk lines and their CRC-32s without holding the GIL. Both are what let one worker
process keep up with several servers.
"""

from __future__ import annotations

import os
from functools import reduce
from operator import xor

import pymysql
import pymysql.cursors
import pymysql.protocol

from backups.engine.checksum import line_crc32
from backups.engine.errors import EngineError

try:  # the optional C helper (.ci/build-ext builds it); without it the server builds lines
    from backups.engine import _rowlines
except ImportError:  # pragma: no cover - exercised by the fallback tests in a subprocess
    _rowlines = None

READ_BYTES = 1 << 20
# Bytes of length prefix before a row's value, by the prefix's first byte, for the rows the
# fast loop takes: a value under 251 bytes (1-byte length) or under 64 KiB (0xFC + 2 bytes).
# 0 sends the packet to the slow path: 0xFB (NULL), 0xFD/0xFE (long values, maybe split over
# several packets), 0xFE with a short packet (EOF), 0xFF (error).
_SKIP = bytes([1] * 251 + [0, 3, 0, 0, 0])


def stream_lines(conn, sql: str, params=None):
    """Rows of a one-column query as lists of bytes, read straight off the wire.

    PyMySQL parses each row packet through several Python calls (~4 us a row); a chunk
    line is one length-coded string per packet, so reading the packets here is several
    times faster. Each list holds the rows that arrived in one read from the socket (about
    1 MiB). The query is sent by PyMySQL (unbuffered), which also reads the column
    definitions; on EOF the connection is handed back in the state PyMySQL expects.
    """
    return _stream(conn, sql, params, 1, _scan_one_column, _one_column_row)


def stream_line_blocks(conn, sql: str, columns: int):
    """Chunk lines of a dump query as blocks: (lines, rows, crc_sum, crc_xor).

    `lines` is the rows' chunk lines, each ending with a newline; the CRC-32 sum and XOR
    are over the lines without it (checksum.py). `columns == 0`: the query yields each
    row's finished line (`checksum.line_expression`, built by the server). Otherwise the
    query selects that many columns as binary (`checksum.client_select_list`) and the C
    helper writes the lines (`line_builder()` says which the dump uses).
    """
    if columns == 0:
        return _server_blocks(stream_lines(conn, sql))
    if _rowlines is None:
        raise EngineError("internal error: client-built lines need the C helper (_rowlines)")
    scan = _rowlines.scan
    row = _rowlines.row

    def scan_rows(buf, pos, seq):
        data, rows, crc_sum, crc_xor, pos, seq = scan(buf, pos, seq, columns)
        return (data, rows, crc_sum, crc_xor) if rows else None, pos, seq

    def one_row(payload):
        line, crc = row(payload, columns)
        return line, 1, crc, crc

    return _stream(conn, sql, None, columns, scan_rows, one_row)


def line_builder() -> str:
    """Who builds the chunk lines of a dump: "client" (the C helper) or "server".

    The client when the C helper is built, unless SHARDVAULT_LINE_BUILDER=server asks for
    the server's path (the bench compares the two). Both yield the same bytes.
    """
    asked = os.environ.get("SHARDVAULT_LINE_BUILDER", "").strip().lower()
    if asked not in ("", "client", "server"):
        raise EngineError(f"SHARDVAULT_LINE_BUILDER must be 'client' or 'server', not {asked!r}")
    if asked == "server":
        return "server"
    if _rowlines is None:
        if asked == "client":
            raise EngineError(
                "SHARDVAULT_LINE_BUILDER=client, but the C helper is not built"
                " (run .ci/build-ext; it needs gcc, Python's headers and zlib1g-dev)"
            )
        return "server"
    return "client"


def _server_blocks(batches):
    crc32 = line_crc32
    for lines in batches:
        crcs = list(map(crc32, lines))  # no Python bytecode per row
        count = len(lines)
        lines.append(b"")
        yield b"\n".join(lines), count, sum(crcs), reduce(xor, crcs, 0)


def _scan_one_column(buf: bytes, pos: int, seq: int):
    """The hot loop of `stream_lines`: whole packets of short rows already in the buffer."""
    lines: list[bytes] = []
    append = lines.append
    size = len(buf)
    skip = _SKIP
    while True:
        head = pos + 4
        if head >= size:
            break
        end = head + (buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16))
        if end > size or buf[pos + 3] != seq:
            break
        start = skip[buf[head]]
        if not start:
            break
        append(buf[head + start : end])
        seq = (seq + 1) & 0xFF
        pos = end
    return lines or None, pos, seq


def _one_column_row(payload: bytes):
    return [_lenenc_value(payload)]


def _stream(conn, sql: str, params, columns: int, scan_rows, one_row):
    """Row packets of an unbuffered query: `scan_rows` takes the whole short rows in the
    buffer at once, `one_row` each row packet that is left (cut by a read, long)."""
    cur = conn.cursor(pymysql.cursors.SSCursor)
    try:
        cur.execute(sql, params)
        result = cur._result
        if result is None or not result.unbuffered_active:
            return
        if result.field_count != columns:
            raise EngineError(
                f"internal error: a chunk query returned {result.field_count} columns,"
                f" not {columns}"
            )
        rfile = conn._rfile
        seq = conn._next_seq_id
        buf = b""
        pos = 0
        while True:
            batch, pos, seq = scan_rows(buf, pos, seq)
            if batch is not None:
                yield batch
                continue
            # Everything else: a packet cut by the buffer's end, long rows, EOF, errors.
            if len(buf) - pos < 4:
                buf = _refill(conn, rfile, buf, pos, 4)
                pos = 0
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            if buf[pos + 3] != seq:
                conn._force_close()
                raise pymysql.err.OperationalError(
                    2013, "Lost connection to MySQL server during query"
                )
            seq = (seq + 1) & 0xFF
            end = pos + 4 + length
            if len(buf) < end:
                buf = _refill(conn, rfile, buf, pos, 4 + length)
                pos, end = 0, 4 + length
            start = pos + 4
            pos = end
            if length == 0xFFFFFF:  # a row of 16 MB or more continues in further packets
                parts = [buf[start:end]]
                while True:
                    if len(buf) - pos < 4:
                        buf = _refill(conn, rfile, buf, pos, 4)
                        pos = 0
                    more = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
                    if buf[pos + 3] != seq:
                        conn._force_close()
                        raise pymysql.err.OperationalError(
                            2013, "Lost connection to MySQL server during query"
                        )
                    seq = (seq + 1) & 0xFF
                    if len(buf) < pos + 4 + more:
                        buf = _refill(conn, rfile, buf, pos, 4 + more)
                        pos = 0
                    parts.append(buf[pos + 4 : pos + 4 + more])
                    pos += 4 + more
                    if more != 0xFFFFFF:
                        break
                yield one_row(b"".join(parts))
                continue
            first = buf[start] if length else 0
            if first == 0xFE and length < 9:  # EOF: end of rows
                conn._next_seq_id = seq
                result.unbuffered_active = False
                result.connection = None
                result.rows = None
                break
            if first == 0xFF:
                conn._next_seq_id = seq
                result.unbuffered_active = False
                pymysql.protocol.MysqlPacket(buf[start:end], conn.encoding).raise_for_error()
            yield one_row(buf[start:end])
    except ValueError as exc:  # a row packet that does not parse (scan_rows, one_row)
        conn._force_close()
        raise EngineError(f"the server sent a row the dump cannot read ({exc})") from exc
    finally:
        result = cur._result
        if result is not None and result.unbuffered_active:
            # Stopped before EOF (abort, error): unread rows make the connection unusable.
            result.unbuffered_active = False
            conn._force_close()
        cur._result = None
        cur.close()


def _lenenc_value(payload: bytes) -> bytes:
    if not payload:
        raise ValueError("an empty row packet")
    first = payload[0]
    if first < 251:
        return payload[1:]
    if first == 0xFC:
        return payload[3:]
    if first == 0xFD:
        return payload[4:]
    if first == 0xFE:
        return payload[9:]
    raise EngineError("internal error: a chunk line was NULL")


def _refill(conn, rfile, buf: bytes, pos: int, need: int) -> bytes:
    """`buf[pos:]` extended from the socket until it holds at least `need` bytes."""
    pieces = [buf[pos:]]
    have = len(pieces[0])
    while have < need:
        try:
            data = rfile.read1(max(need - have, READ_BYTES))
        except OSError as exc:
            conn._force_close()
            raise pymysql.err.OperationalError(
                2013, f"Lost connection to MySQL server during query ({exc})"
            ) from exc
        if not data:
            conn._force_close()
            raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
        pieces.append(data)
        have += len(data)
    return b"".join(pieces)
