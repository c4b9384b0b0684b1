"""Physical backups with mariabackup: stream an instance's data files into storage, and
bring them back into a data directory (rebuild of a lost instance, physical drills).

Plain Python (no Django, no RQ): subprocess pipes and the storage interface.

Backup: `mariabackup --backup --stream=mbstream` writes the whole backup (data files, redo
log tail, `xtrabackup_binlog_info`) to its stdout; we read it in 1 MiB pieces, compress
(and encrypt) them with `codec.encode` (the chunks' object format) and hand them to
`storage.put_stream`, so nothing is staged whole on disk or in memory. The connection
password never reaches argv: it goes into a 0600 defaults file in a 0700 scratch
directory, passed as `--defaults-file` (which also keeps the host's my.cnf out).

Binlog coordinates: MariaDB 10.11's mariabackup reads them while it holds
`BACKUP STAGE BLOCK_COMMIT` (so they are exactly the point the copied data stands at),
writes them into the stream as `xtrabackup_binlog_info` and logs the same values as
`MySQL binlog position: filename 'F', position 'P', GTID of the last change 'G'` on stderr.
MariaDB's mariabackup has no `--binlog-info` option (that is XtraBackup's); we take the
log line, which carries the same three values without decoding the mbstream.

Locks: mariabackup's BACKUP STAGE locks belong to its own server connection, so when it
dies (killed with its worker: it gets SIGKILL when the process that started it dies, and
a closed pipe otherwise) the server releases them with the connection.

Restore: the stored object is streamed down, decoded and piped into `mbstream -x` in a
scratch directory, then `mariabackup --prepare` makes the files consistent. The prepared
directory can be moved into an empty data directory (`datadir_install`), or a throwaway
`mariadbd` started on it (`ThrowawayServer`).
"""

from __future__ import annotations

import collections
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pymysql

from backups.engine import codec
from backups.engine.errors import Cancelled, EngineError
from backups.engine.mysql import Endpoint, connect
from backups.engine.types import CancelFn, ProgressEvent, ProgressFn

READ_BYTES = 1024 * 1024
CANCEL_POLL_SECONDS = 0.5
OBJECT_NAME = "backup.mbstream"
# Privileges mariabackup needs; either name of the binlog one is enough.
NEEDED_PRIVILEGES = ("RELOAD", "PROCESS", "LOCK TABLES")
BINLOG_PRIVILEGES = ("BINLOG MONITOR", "REPLICATION CLIENT")
_POSITION = re.compile(
    r"MySQL binlog position: filename '([^']*)', position '(\d+)'"
    r"(?:, GTID of the last change '([^']*)')?"
)
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def physical_key(set_prefix: str, instance_key_part: str, encrypted: bool) -> str:
    """`<set_prefix>/physical/<instance>/backup.mbstream.zst[.enc]`."""
    suffix = ".zst.enc" if encrypted else ".zst"
    return f"{set_prefix}/physical/{instance_key_part}/{OBJECT_NAME}{suffix}"


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the process that started it dies."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------------- tools


def tool_path(name: str, search_path: str | None = None) -> str | None:
    """The executable `name` on PATH (or `search_path`), also looking in /usr/sbin."""
    found = shutil.which(name, path=search_path)
    if found or search_path is not None:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def tool_version(binary: str) -> tuple[int, int, int] | None:
    """The MariaDB server version a mariabackup binary was built for, e.g. (10, 11, 19)."""
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(done.stdout + done.stderr)
    return tuple(int(x) for x in match.groups()) if match else None  # type: ignore[return-value]


def server_version(text: str) -> tuple[int, int, int] | None:
    match = _VERSION.search(text or "")
    return tuple(int(x) for x in match.groups()) if match else None  # type: ignore[return-value]


def physical_preflight(
    endpoint: Endpoint, datadir: str, *, search_path: str | None = None
) -> list[str]:
    """Why a physical backup of this instance cannot run here: one sentence per missing
    piece (no mariabackup on this worker, a version that does not match the server's
    major.minor, privileges the backup user lacks, a data directory this worker cannot
    read). An empty list means go."""
    problems = []
    binary = tool_path("mariabackup", search_path)
    tool = None
    if binary is None:
        problems.append(
            f"mariabackup is not installed on worker {socket.gethostname()} "
            "(install the mariadb-backup package)"
        )
    else:
        tool = tool_version(binary)
        if tool is None:
            problems.append(f"{binary} --version did not say which MariaDB version it is for")
    if not datadir:
        problems.append(
            f"instance {endpoint.name} has no datadir: set the server's data directory "
            "for physical backups"
        )
    elif not os.path.isdir(datadir) or not os.access(datadir, os.R_OK | os.X_OK):
        problems.append(
            f"the data directory {datadir} of instance {endpoint.name} is not readable on "
            f"worker {socket.gethostname()} (run the part on the database host: agent_queue)"
        )
    try:
        conn = connect(endpoint)
    except Exception as exc:  # noqa: BLE001 - one sentence, whatever the driver raised
        problems.append(f"instance {endpoint.name} unreachable: {exc}")
        return problems
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            server = server_version(cur.fetchone()[0])
            cur.execute("SHOW GRANTS")
            grants = " ".join(row[0].upper() for row in cur.fetchall())
    finally:
        conn.close()
    if tool and server and tool[:2] != server[:2]:
        problems.append(
            f"mariabackup on this worker is for MariaDB {tool[0]}.{tool[1]}, but instance "
            f"{endpoint.name} runs {server[0]}.{server[1]}: install the matching mariadb-backup"
        )
    on_everything = re.findall(r"GRANT (.*?) ON \*\.\*", grants)
    held = " , ".join(on_everything)
    if "ALL PRIVILEGES" not in held:
        missing = [p for p in NEEDED_PRIVILEGES if p not in held]
        if not any(p in held for p in BINLOG_PRIVILEGES):
            missing.append("BINLOG MONITOR (or REPLICATION CLIENT)")
        if missing:
            problems.append(
                f"the backup user {endpoint.user} on instance {endpoint.name} lacks "
                f"{', '.join(missing)} ON *.*, which mariabackup needs"
            )
    return problems


def _defaults_file(directory: Path, endpoint: Endpoint) -> Path:
    """A 0600 option file with the connection (the password never goes on argv)."""
    path = directory / "client.cnf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def value(text) -> str:
        return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "[client]",
        f"host={value(endpoint.host)}",
        f"port={int(endpoint.port)}",
        f"user={value(endpoint.user)}",
        f"password={value(endpoint.password)}",
        "protocol=TCP",
    ]
    if endpoint.tls_ca:
        lines.append(f"ssl-ca={value(endpoint.tls_ca)}")
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------- backup


@dataclass(frozen=True)
class PhysicalPart:
    """One instance's physical backup: where to read and where to store."""

    instance: str
    endpoint: Endpoint
    datadir: str
    key: str
    compression_level: int = 1
    data_key: bytes | None = None
    search_path: str | None = None  # PATH to find mariabackup on (None: the process's)


@dataclass
class PhysicalResult:
    instance: str
    key: str
    raw_bytes: int
    stored_bytes: int
    sha256: str
    binlog_file: str
    binlog_pos: int | None
    gtid: str
    started_at: datetime
    finished_at: datetime
    tool_version: str = ""
    worker: str = ""  # host:pid that ran mariabackup (filled by the service)

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


class _StderrTail:
    """Drains a child's stderr on a thread: keeps the last lines and the binlog position."""

    def __init__(self, stream) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.position: tuple[str, int, str] | None = None
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            match = _POSITION.search(line)
            if match:
                self.position = (match.group(1), int(match.group(2)), match.group(3) or "")

    def reason(self) -> str:
        for line in reversed(self.lines):
            text = re.sub(r"^\[\d+\] [\d-]+ [\d:]+ ", "", line).strip()
            if text and "completed OK" not in text:
                return text
        return "no output"


def physical_backup(
    part: PhysicalPart, storage, *, progress: ProgressFn, should_cancel: CancelFn
) -> PhysicalResult:
    """Stream `part`'s instance into `storage` under `part.key`.

    Returns once the object is stored (size and sha256 from the store) and mariabackup
    said `completed OK` with the binlog position. Raises EngineError (mariabackup failed,
    no position) or Cancelled; in both cases no object is left under `part.key`.
    """
    binary = tool_path("mariabackup", part.search_path)
    if binary is None:
        raise EngineError("mariabackup is not installed on this worker")
    started = datetime.now(UTC)
    scratch = Path(tempfile.mkdtemp(prefix="sv-physical-"))
    os.chmod(scratch, 0o700)
    counted = {"raw": 0}
    tail: _StderrTail | None = None
    process: subprocess.Popen | None = None
    try:
        defaults = _defaults_file(scratch, part.endpoint)
        args = [
            binary,
            f"--defaults-file={defaults}",
            "--backup",
            "--stream=mbstream",
            f"--target-dir={scratch / 'target'}",
            f"--datadir={part.datadir}",
        ]
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        tail = _StderrTail(process.stderr)

        def raw_pieces() -> Iterator[bytes]:
            # select() with a timeout, so a cancel is seen within a second even while
            # mariabackup sends nothing (waiting for a lock, copying a large file's tail).
            fd = process.stdout.fileno()
            last_report = last_poll = time.monotonic()
            reported = 0
            pending: list[bytes] = []
            pending_bytes = 0
            while True:
                now = time.monotonic()
                if now - last_poll >= CANCEL_POLL_SECONDS:
                    last_poll = now
                    if should_cancel():
                        raise Cancelled("backup cancelled")
                ready, _, _ = select.select([fd], [], [], CANCEL_POLL_SECONDS)
                if not ready:
                    continue
                piece = os.read(fd, READ_BYTES)
                if not piece:
                    break
                counted["raw"] += len(piece)
                pending.append(piece)
                pending_bytes += len(piece)
                if pending_bytes >= READ_BYTES:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
                if now - last_report >= 1.0:
                    progress(
                        ProgressEvent(
                            stage="physical",
                            bytes_done=counted["raw"] - reported,
                            message=f"streaming instance {part.instance}",
                            instance=part.instance,
                        )
                    )
                    reported = counted["raw"]
                    last_report = now
            if pending:
                yield b"".join(pending)
            code = process.wait()
            tail.thread.join(timeout=10)
            if code != 0:
                raise EngineError(
                    f"mariabackup failed on instance {part.instance} (exit {code}): {tail.reason()}"
                )
            if tail.position is None:
                raise EngineError(
                    f"mariabackup on instance {part.instance} reported no binlog position "
                    "(is the binary log enabled?)"
                )

        encoded = codec.encode(
            raw_pieces(),
            level=part.compression_level,
            data_key=part.data_key,
            aad=part.key.encode(),
        )
        stored = storage.put_stream(part.key, encoded)
    except BaseException:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        try:
            storage.delete(part.key)
        except Exception:  # noqa: BLE001 - best effort; the reaper removes leftovers
            pass
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    file, pos, gtid = tail.position  # type: ignore[misc]
    version = tool_version(binary)
    return PhysicalResult(
        instance=part.instance,
        key=stored.key,
        raw_bytes=counted["raw"],
        stored_bytes=stored.size,
        sha256=stored.sha256,
        binlog_file=file,
        binlog_pos=pos,
        gtid=gtid,
        started_at=started,
        finished_at=datetime.now(UTC),
        tool_version=".".join(map(str, version)) if version else "",
    )


# ---------------------------------------------------------------------------- restore


def physical_extract(
    storage,
    obj: dict,
    *,
    data_key: bytes | None,
    target_dir: Path,
    should_cancel: CancelFn,
    search_path: str | None = None,
) -> int:
    """Stream the stored object `obj` ({"key", "sha256", "stored_bytes"}) down, decode it
    and unpack it with `mbstream -x` into the empty `target_dir`. Returns raw bytes.
    IntegrityError when the stored bytes do not match, EngineError when mbstream fails."""
    binary = tool_path("mbstream", search_path)
    if binary is None:
        raise EngineError("mbstream is not installed on this worker (package mariadb-backup)")
    target_dir.mkdir(parents=True, exist_ok=True)
    key = obj["key"]
    stored = storage.get_stream(
        key, expect_sha256=obj.get("sha256") or None, expect_size=obj.get("stored_bytes")
    )
    process = subprocess.Popen(
        [binary, "-x", "-C", str(target_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    tail = _StderrTail(process.stderr)
    total = 0
    pieces = codec.decode(stored, data_key=data_key, aad=key.encode(), object_key=key)
    try:
        for piece in pieces:
            if should_cancel():
                raise Cancelled("cancelled")
            try:
                process.stdin.write(piece)
            except BrokenPipeError:
                # mbstream gave up on its input: read the object to its end first, so a
                # damaged object is reported as such (sha256, decryption) rather than as
                # mbstream's complaint about the garbage it was fed.
                for _rest in pieces:
                    pass
                break
            total += len(piece)
        try:
            process.stdin.close()
        except BrokenPipeError:
            pass
    except BaseException:
        process.kill()
        process.wait()
        raise
    code = process.wait()
    tail.thread.join(timeout=10)
    if code != 0:
        raise EngineError(f"mbstream -x failed (exit {code}): {tail.reason()}")
    return total


def physical_prepare(target_dir: Path, *, search_path: str | None = None) -> None:
    """`mariabackup --prepare` on an extracted backup: crash recovery of the copied files."""
    binary = tool_path("mariabackup", search_path)
    if binary is None:
        raise EngineError("mariabackup is not installed on this worker")
    done = subprocess.run(
        [binary, "--prepare", f"--target-dir={target_dir}"],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_die_with_parent,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise EngineError(
            f"mariabackup --prepare failed (exit {done.returncode}): "
            f"{lines[-1] if lines else 'no output'}"
        )


def datadir_problem(path: str) -> str:
    """Why `path` cannot receive a rebuilt instance ("" when it can: absent or empty)."""
    if not path or not path.startswith("/"):
        return f"the datadir {path!r} must be an absolute path"
    target = Path(path)
    if target.exists() and not target.is_dir():
        return f"the datadir {path} exists and is not a directory"
    if target.is_dir() and any(target.iterdir()):
        return f"the datadir {path} is not empty: a rebuild only writes into an empty directory"
    return ""


def datadir_owner(path: Path) -> tuple[int, int] | None:
    """Who should own a rebuilt data directory: the directory's owner, or `mysql` when the
    directory belongs to root; None when neither tells (files keep our own user)."""
    import pwd

    if path.exists():
        info = path.stat()
        if info.st_uid != 0:
            return info.st_uid, info.st_gid
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("mysql")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def datadir_install(prepared: Path, datadir: str, *, owner: tuple[int, int] | None) -> int:
    """Move the prepared files into the empty `datadir` and chown them to `owner`.
    Returns the number of entries moved. Refuses a non-empty directory."""
    problem = datadir_problem(datadir)
    if problem:
        raise EngineError(problem)
    target = Path(datadir)
    target.mkdir(parents=True, exist_ok=True)
    moved = 0
    for entry in sorted(prepared.iterdir()):
        shutil.move(str(entry), str(target / entry.name))
        moved += 1
    if owner is not None and os.geteuid() == 0:
        uid, gid = owner
        os.chown(target, uid, gid)
        for root, dirs, files in os.walk(target):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)
    return moved


# ---------------------------------------------------------------------------- throwaway server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ThrowawayServer:
    """A `mariadbd` on a prepared data directory, on a free loopback port, without grant
    checks (it never listens beyond 127.0.0.1 and lives only for one drill or roll-forward).
    """

    datadir: Path
    run_dir: Path
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    socket_dir: Path | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(name="throwaway", host="127.0.0.1", port=self.port, user="root")

    def start(self, timeout: float = 120) -> None:
        binary = tool_path("mariadbd") or "/usr/sbin/mariadbd"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        self.log_path = self.run_dir / "error.log"
        # A unix socket path may not pass 107 bytes; the run directory can be deep, so the
        # socket lives in a short directory of its own (removed in stop()).
        self.socket_dir = Path(tempfile.mkdtemp(prefix="sv-"))
        args = [
            binary,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket_dir / 'mysqld.sock'}",
            f"--pid-file={self.run_dir / 'mysqld.pid'}",
            "--bind-address=127.0.0.1",
            f"--port={self.port}",
            "--skip-grant-tables",
            "--skip-log-bin",
            "--skip-slave-start",
            "--innodb-buffer-pool-size=128M",
            "--local-infile=0",
            f"--tmpdir={self.run_dir}",
            *self.extra_args,
        ]
        if os.geteuid() == 0:
            args.append("--user=root")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise EngineError(f"mariadbd on the restored files exited: {' / '.join(tail)}")
            try:
                connect(self.endpoint, connect_timeout=2).close()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        self.stop()
        raise EngineError(f"mariadbd on the restored files did not start within {timeout:.0f} s")

    def stop(self) -> None:
        """Clean shutdown (so the data directory is left consistent), kill if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                conn = connect(self.endpoint, connect_timeout=2)
                with conn.cursor() as cur:
                    cur.execute("SHUTDOWN")
                conn.close()
            except Exception:  # noqa: BLE001 - fall back to a signal
                self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None


def user_tables(endpoint: Endpoint) -> list[tuple[str, str, str]]:
    """(database, table, engine) of every base table outside the system schemas."""
    conn = connect(endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT TABLE_SCHEMA, TABLE_NAME, ENGINE FROM information_schema.TABLES "
                "WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN "
                "('mysql', 'information_schema', 'performance_schema', 'sys') "
                "ORDER BY TABLE_SCHEMA, TABLE_NAME"
            )
            return [(r[0], r[1], r[2] or "") for r in cur.fetchall()]
    finally:
        conn.close()


def check_table(conn: pymysql.connections.Connection, database: str, table: str) -> str:
    """ "" when CHECK TABLE says OK, else its message."""
    from backups.engine.mysql import quote_qualified

    with conn.cursor() as cur:
        cur.execute(f"CHECK TABLE {quote_qualified(database, table)}")
        rows = cur.fetchall()
    bad = [r[3] for r in rows if r[2] in ("error", "Error") or (r[2] == "status" and r[3] != "OK")]
    return "; ".join(bad)
