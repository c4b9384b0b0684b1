"""A tiny fake MySQL server for trust-boundary tests: it plays a hostile or broken server.

Usage (the `fake_mysql` fixture in tests/conftest.py starts one and stops it after the test):

    server = fake_mysql(auth_switch="mysql_clear_password")   # or FakeMySQLServer(...).start()
    Endpoint(name="x", host=server.host, port=server.port, user="u", password="secret")
    ... connect ...
    assert server.received_passwords == []          # nothing came back in clear text

Options (all keyword-only, all optional):
- `mode`: "normal" (default) greets and answers; "silent" accepts TCP and never says a word.
- `auth_switch`: None (default: accept the client's first answer), "mysql_clear_password" or
  "dialog": after the handshake response, ask the client to switch to that plugin and record
  what it sends back in `received_passwords` (bytes, the trailing NUL removed).
- `greeting_plugin`: the auth plugin named in the greeting (default "mysql_native_password").
- `queries`: what any query that is not answered by `answers` gets, after the session set-up
  statements (`SET ...`, which always get OK):
    "ok" (default)   an OK packet;
    "empty"          a result set of one column `c0` and no rows;
    "infile"         a LOCAL INFILE request for `infile_name` (default "/proc/self/environ");
                     whatever the client sends back is recorded in `received_infile` (one bytes
                     object per request, b"" when the client sent an empty reply), and the
                     query then gets an OK;
    "error"          an error packet (1064, "fake error");
    "mute"           no answer at all (the connection stays open): a server that hangs mid-query.
- `infile_on`: a substring; any query containing it (case-insensitive, `SET ...` included) gets
  the LOCAL INFILE request as in "infile" above, whatever `queries` says.
- `answers`: {substring: rows} — a query containing `substring` (case-insensitive, first match
  in insertion order) gets a result set with those rows (tuples of str/None; columns c0..cN).
- `server_version`: the version string in the greeting (default "8.0.99-fake").

Recorded (lists shared with the handler threads; read them after the client is done):
`connections` (count of accepted TCP connections), `handshakes` ([{"user", "database",
"plugin", "auth_response"}]), `queries_seen` ([str]), `received_passwords`, `received_infile`.

The server never advertises TLS, so a client that needs TLS cannot get it here.
"""

from __future__ import annotations

import socket
import struct
import threading

CAPABILITIES = (
    0x00000001  # LONG_PASSWORD
    | 0x00000004  # LONG_FLAG
    | 0x00000008  # CONNECT_WITH_DB
    | 0x00000080  # LOCAL_FILES
    | 0x00000200  # PROTOCOL_41
    | 0x00002000  # TRANSACTIONS
    | 0x00008000  # SECURE_CONNECTION
    | 0x00010000  # MULTI_STATEMENTS
    | 0x00020000  # MULTI_RESULTS
    | 0x00080000  # PLUGIN_AUTH
)
STATUS_AUTOCOMMIT = 0x0002


def _lenenc_int(n: int) -> bytes:
    if n < 251:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + struct.pack("<H", n)
    if n < 1 << 24:
        return b"\xfd" + struct.pack("<I", n)[:3]
    return b"\xfe" + struct.pack("<Q", n)


def _lenenc_str(value: bytes) -> bytes:
    return _lenenc_int(len(value)) + value


class _Closed(Exception):
    pass


class FakeMySQLServer:
    def __init__(
        self,
        *,
        mode: str = "normal",
        auth_switch: str | None = None,
        greeting_plugin: str = "mysql_native_password",
        queries: str = "ok",
        answers: dict[str, list[tuple]] | None = None,
        infile_name: str = "/proc/self/environ",
        infile_on: str | None = None,
        server_version: str = "8.0.99-fake",
    ):
        assert mode in ("normal", "silent")
        assert auth_switch in (None, "mysql_clear_password", "dialog")
        assert queries in ("ok", "empty", "infile", "error", "mute")
        self.mode = mode
        self.auth_switch = auth_switch
        self.greeting_plugin = greeting_plugin
        self.query_mode = queries
        self.answers = dict(answers or {})
        self.infile_name = infile_name
        self.infile_on = infile_on
        self.server_version = server_version
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0
        self.handshakes: list[dict] = []
        self.queries_seen: list[str] = []
        self.received_passwords: list[bytes] = []
        self.received_infile: list[bytes] = []
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeMySQLServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def __enter__(self) -> FakeMySQLServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._sockets.append(sock)
            if self.mode == "silent":
                continue  # keep it open, say nothing
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    # --- packets ---------------------------------------------------------------------------

    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise _Closed
            data += chunk
        return data

    def _read(self, sock: socket.socket) -> tuple[int, bytes]:
        header = self._recv_exact(sock, 4)
        length = header[0] | header[1] << 8 | header[2] << 16
        return header[3], self._recv_exact(sock, length)

    @staticmethod
    def _write(sock: socket.socket, seq: int, payload: bytes) -> int:
        sock.sendall(struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload)
        return seq + 1

    @staticmethod
    def _ok() -> bytes:
        return b"\x00\x00\x00" + struct.pack("<HH", STATUS_AUTOCOMMIT, 0)

    @staticmethod
    def _eof() -> bytes:
        return b"\xfe" + struct.pack("<HH", 0, STATUS_AUTOCOMMIT)

    def _greeting(self) -> bytes:
        salt = b"abcdefgh" + b"ijklmnopqrst"
        return (
            b"\x0a"
            + self.server_version.encode() + b"\x00"
            + struct.pack("<I", 7)
            + salt[:8] + b"\x00"
            + struct.pack("<H", CAPABILITIES & 0xFFFF)
            + bytes([45])  # utf8mb4_general_ci
            + struct.pack("<H", STATUS_AUTOCOMMIT)
            + struct.pack("<H", CAPABILITIES >> 16)
            + bytes([21])
            + b"\x00" * 10
            + salt[8:] + b"\x00"
            + self.greeting_plugin.encode() + b"\x00"
        )  # fmt: skip

    def _result_set(self, sock: socket.socket, seq: int, rows: list[tuple]) -> None:
        width = max((len(r) for r in rows), default=1) or 1
        seq = self._write(sock, seq, _lenenc_int(width))
        for i in range(width):
            column = (
                _lenenc_str(b"def") + _lenenc_str(b"") + _lenenc_str(b"") + _lenenc_str(b"")
                + _lenenc_str(f"c{i}".encode()) + _lenenc_str(b"")
                + b"\x0c" + struct.pack("<HIBHB", 45, 1024, 0xFD, 0, 0) + b"\x00\x00"
            )  # fmt: skip
            seq = self._write(sock, seq, column)
        seq = self._write(sock, seq, self._eof())
        for row in rows:
            payload = b"".join(b"\xfb" if v is None else _lenenc_str(str(v).encode()) for v in row)
            seq = self._write(sock, seq, payload)
        self._write(sock, seq, self._eof())

    # --- one connection --------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._handshake(sock)
            while not self._stopping.is_set():
                _, packet = self._read(sock)
                if not packet or packet[0] == 0x01:  # COM_QUIT
                    return
                if packet[0] == 0x03:
                    self._query(sock, packet[1:].decode("utf-8", "replace"))
                else:
                    self._write(sock, 1, self._ok())
        except (_Closed, OSError):
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _handshake(self, sock: socket.socket) -> None:
        self._write(sock, 0, self._greeting())
        seq, response = self._read(sock)
        flags = struct.unpack("<I", response[:4])[0]
        i = 32
        end = response.index(b"\x00", i)
        user = response[i:end].decode("utf-8", "replace")
        i = end + 1
        auth_len = response[i]
        auth = response[i + 1 : i + 1 + auth_len]
        i += 1 + auth_len
        database = None
        if flags & 0x08 and i < len(response):
            end = response.index(b"\x00", i)
            database = response[i:end].decode("utf-8", "replace")
            i = end + 1
        plugin = None
        if flags & 0x80000 and i < len(response):
            end = response.find(b"\x00", i)
            plugin = response[i : end if end >= 0 else None].decode("utf-8", "replace")
        self.handshakes.append(
            {"user": user, "database": database, "plugin": plugin, "auth_response": auth}
        )
        seq += 1
        if self.auth_switch == "mysql_clear_password":
            seq = self._write(sock, seq, b"\xfe" + b"mysql_clear_password\x00")
            seq, answer = self._read(sock)
            self.received_passwords.append(answer.rstrip(b"\x00"))
            seq += 1
        elif self.auth_switch == "dialog":
            seq = self._write(sock, seq, b"\xfe" + b"dialog\x00" + b"\x05Password: ")
            seq, answer = self._read(sock)
            self.received_passwords.append(answer.rstrip(b"\x00"))
            seq += 1
        self._write(sock, seq, self._ok())

    def _query(self, sock: socket.socket, sql: str) -> None:
        self.queries_seen.append(sql)
        lowered = sql.lower()
        if self.infile_on and self.infile_on.lower() in lowered:
            self._infile(sock)
            return
        for key, rows in self.answers.items():
            if key.lower() in lowered:
                self._result_set(sock, 1, list(rows))
                return
        if lowered.lstrip().startswith("set ") or self.query_mode == "ok":
            self._write(sock, 1, self._ok())
        elif self.query_mode == "empty":
            self._result_set(sock, 1, [])
        elif self.query_mode == "mute":
            return
        elif self.query_mode == "error":
            self._write(sock, 1, b"\xff" + struct.pack("<H", 1064) + b"#42000fake error")
        else:
            self._infile(sock)

    def _infile(self, sock: socket.socket) -> None:
        self._write(sock, 1, b"\xfb" + self.infile_name.encode())
        received = b""
        try:
            while True:
                seq, data = self._read(sock)
                if seq == 0:  # a new command (COM_QUIT): the client sent no file at all
                    raise _Closed
                if not data:
                    break
                received += data
        finally:  # also when the client hangs up instead of answering
            self.received_infile.append(received)
        self._write(sock, seq + 1, self._ok())
