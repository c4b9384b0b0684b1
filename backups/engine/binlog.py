"""The binlog server side: where the server is writing, which binlogs it still has, and
a replica connection streaming raw events over the replication protocol.

Plain Python (no Django). `BinlogDump` registers as a replica with its own
server_id and asks the server for its binlog from a start coordinate with
COM_BINLOG_DUMP (annotate-rows flag set, so the events are byte for byte what
`mariadb-binlog --raw` would write). `backups.engine.capture` turns the stream
into stored segments.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import UTC, datetime

import pymysql
from pymysql.constants.COMMAND import COM_BINLOG_DUMP, COM_REGISTER_SLAVE

from backups.engine.errors import ODD_ANSWER, ConnectError, EngineError, OddAnswer
from backups.engine.mysql import Endpoint, connect, describe_error

# COM_BINLOG_DUMP flags.
BINLOG_SEND_ANNOTATE_ROWS_EVENT = 2
READ_TIMEOUT_SECONDS = 300


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
            return str(row[0]), int(row[1]), str(gtid), server_time
    except pymysql.MySQLError as exc:
        raise EngineError(
            f"reading the binlog position failed: {describe_error(exc, endpoint)}"
        ) from exc
    except ODD_ANSWER as exc:  # no time, or a status row of the wrong shape
        raise OddAnswer(endpoint.name, "reading its binlog position") from exc
    finally:
        conn.close()


def binary_logs(endpoint: Endpoint) -> list[tuple[str, int]]:
    conn = _connect(endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW BINARY LOGS")
            return [(str(row[0]), int(row[1])) for row in cur.fetchall()]
    except pymysql.MySQLError as exc:
        raise EngineError(f"listing the binlogs failed: {describe_error(exc, endpoint)}") from exc
    except ODD_ANSWER as exc:
        raise OddAnswer(endpoint.name, "listing its binlogs") from exc
    finally:
        conn.close()


def purged_message(instance: str, file: str, pos: int) -> str:
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
            return EngineError(purged_message(self.endpoint.name, file, pos))
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
