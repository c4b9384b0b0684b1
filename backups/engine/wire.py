"""Reading one-column result sets straight off the MySQL wire.

PyMySQL parses each row packet through several Python calls (~4 us a row); a chunk
line is one length-coded string per packet, so reading the packets here is several
times faster, which is what lets one worker process keep up with several servers.
"""

from __future__ import annotations

import pymysql
import pymysql.cursors
import pymysql.protocol

from backups.engine.errors import EngineError

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
    cur = conn.cursor(pymysql.cursors.SSCursor)
    try:
        cur.execute(sql, params)
        result = cur._result
        if result is None or not result.unbuffered_active:
            return
        if result.field_count != 1:
            raise EngineError("internal error: a chunk query must return one column")
        rfile = conn._rfile
        seq = conn._next_seq_id
        skip = _SKIP
        buf = b""
        pos = 0
        while True:
            lines: list[bytes] = []
            append = lines.append
            size = len(buf)
            # The hot loop: whole packets of short rows already in the buffer.
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
            if lines:
                yield lines
                continue
            # Everything else: a packet cut by the buffer's end, long rows, EOF, errors.
            if size - pos < 4:
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
                yield [_lenenc_value(b"".join(parts))]
                continue
            first = buf[start]
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
            yield [_lenenc_value(buf[start:end])]
    finally:
        result = cur._result
        if result is not None and result.unbuffered_active:
            # Stopped before EOF (abort, error): unread rows make the connection unusable.
            result.unbuffered_active = False
            conn._force_close()
        cur._result = None
        cur.close()


def _lenenc_value(payload: bytes) -> bytes:
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
