"""Consistent snapshots: the global-lock cut (`locked`) and per-shard snapshots (`lockfree`).

`locked`: FLUSH TABLES WITH READ LOCK on every instance (bounded by a short
lock_wait_timeout; on timeout unlock everywhere, wait, retry), then every dump
connection starts `WITH CONSISTENT SNAPSHOT`, binlog coordinates are read, and
every instance is unlocked. While all instances are locked no commit can land
anywhere, so the snapshots of all instances show one instant.

`cold`: the same cut as `locked`, but the lock is held until the dump has read every
table (`take_locked(..., hold=True)`, then `release`), so tables of every engine (MyISAM
included) are copied at the cut. The lock connections get a short server-side
`wait_timeout` and are pinged while the lock is held (`GlobalLock.keepalive`): a worker
that dies or loses its network releases the lock with its connection.

`lockfree`: one snapshot connection per shard; MariaDB reports its exact binlog
position (`binlog_snapshot_file/position`).

`ConsistentCut` takes either cut over `SessionGroup`s (connections sharing one snapshot)
and records each shard's coordinates, the consistent instant and the lock window.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pymysql

from backups.engine.errors import ODD_ANSWER, Cancelled, ConnectError, EngineError, OddAnswer
from backups.engine.mysql import Endpoint, connect, describe_error
from backups.engine.types import ShardSpec

ER_LOCK_WAIT_TIMEOUT = 1205
ER_SPECIFIC_ACCESS_DENIED = 1227
ER_ACCESS_DENIED = 1045


@dataclass
class Coordinates:
    binlog_file: str = ""
    binlog_pos: int | None = None
    gtid: str = ""
    snapshot_at: datetime | None = None


def open_dump_connection(endpoint: Endpoint):
    conn = connect(endpoint, streaming=True, autocommit=True)
    try:
        with conn.cursor() as cur:
            # The chunk SQL relies on backslash escapes; a slow consumer (S3 upload) must not
            # make the server drop the stream.
            cur.execute(
                "SET SESSION sql_mode = '', net_write_timeout = 3600, net_read_timeout = 3600"
            )
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    except pymysql.err.MySQLError:
        conn.close()
        raise
    return conn


def session_open(instance: str, endpoint: Endpoint):
    """A dump connection to `instance`; EngineError names the instance when it is refused."""
    try:
        return open_dump_connection(endpoint)
    except ConnectError as exc:
        raise EngineError(f"cannot open dump connections to {instance}: {exc}") from exc
    except pymysql.err.MySQLError as exc:
        raise EngineError(
            f"cannot open dump connections to {instance}: {describe_error(exc, endpoint)}"
        ) from exc


def start_snapshot(conn) -> None:
    with conn.cursor() as cur:
        cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")


def _query_one(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def is_mariadb(conn) -> bool:
    return "mariadb" in str(_query_one(conn, "SELECT VERSION()")[0]).lower()


def master_status(conn) -> tuple[str, int | None, str]:
    """(file, position, executed GTID set on MySQL) or empty when the binlog is off."""
    with conn.cursor() as cur:
        try:
            cur.execute("SHOW MASTER STATUS")
        except pymysql.err.ProgrammingError:
            cur.execute("SHOW BINARY LOG STATUS")  # MySQL 8.4
        row = cur.fetchone()
        names = [d[0] for d in cur.description or []]
    if not row:
        return "", None, ""
    values = dict(zip(names, row, strict=False))
    return (
        str(values.get("File") or ""),
        int(values.get("Position") or 0),
        str(values.get("Executed_Gtid_Set") or ""),
    )


def snapshot_status(conn) -> tuple[str, int | None]:
    """MariaDB's binlog position of the current consistent snapshot."""
    with conn.cursor() as cur:
        cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%%'")
        values = {name.lower(): value for name, value in cur.fetchall()}
    file = values.get("binlog_snapshot_file") or ""
    pos = values.get("binlog_snapshot_position")
    return file, (int(pos) if file and pos not in (None, "") else None)


def gtid_at(conn, file: str, pos: int | None, mysql_gtid: str) -> str:
    if not file or pos is None:
        return ""
    if mysql_gtid:
        return mysql_gtid
    try:
        row = _query_one(conn, f"SELECT BINLOG_GTID_POS('{_sql_str(file)}', {int(pos)})")
    except pymysql.err.MySQLError:
        return ""
    return str(row[0] or "") if row else ""


def _sql_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


def blocking_query(conn) -> str:
    """The longest-running statement other than ours, for the lock-timeout message."""
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT ID, USER, TIME, LEFT(INFO, 200) FROM information_schema.PROCESSLIST"
                " WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Sleep', 'Daemon', 'Binlog Dump')"
                " AND INFO IS NOT NULL AND INFO NOT LIKE 'FLUSH TABLES%%' ORDER BY TIME DESC LIMIT 1"
            )
            row = cur.fetchone()
    except pymysql.err.MySQLError:
        return ""
    if not row or len(row) < 4:
        return ""
    return f"connection {row[0]} ({row[1]}, running {row[2]}s): {row[3]}"


class GlobalLock:
    """FLUSH TABLES WITH READ LOCK on several instances, measured and always released.

    `session_timeout` (seconds, 0 = the server's defaults) is set as the lock connections'
    `wait_timeout`/`net_read_timeout`/`net_write_timeout` before locking: a lock held for a
    whole dump (cold) must die with a client that vanished without closing its socket; the
    holder calls `keepalive()` more often than that to keep a live lock.
    """

    def __init__(
        self,
        controls: dict[str, object],
        endpoints: dict[str, Endpoint],
        *,
        wait_timeout: int,
        retries: int,
        retry_sleep: float = 1.0,
        should_cancel=lambda: False,
        session_timeout: int = 0,
    ):
        self.controls = controls  # instance name -> control connection
        self.endpoints = endpoints
        self.wait_timeout = max(1, int(wait_timeout))
        self.retries = max(0, int(retries))
        self.retry_sleep = retry_sleep
        self.should_cancel = should_cancel
        self.session_timeout = max(0, int(session_timeout))
        self.locked: list[str] = []
        self.first_acquired: float | None = None
        self.released_at: float | None = None
        self._release_guard = threading.Lock()

    def acquire(self) -> None:
        attempt = 0
        while True:
            failure = self._try_once()
            if failure is None:
                return
            instance, blocker = failure
            attempt += 1
            if attempt > self.retries:
                detail = f"; blocked by {blocker}" if blocker else ""
                raise EngineError(
                    f"could not take the global read lock on {instance} within {self.wait_timeout}s"
                    f" after {attempt} attempts{detail}"
                )
            if self.should_cancel():
                raise Cancelled("backup cancelled while waiting for the global read lock")
            time.sleep(self.retry_sleep)

    def _try_once(self) -> tuple[str, str] | None:
        self.first_acquired = None
        self.released_at = None
        for name, conn in self.controls.items():
            try:
                with conn.cursor() as cur:
                    cur.execute(f"SET SESSION lock_wait_timeout = {self.wait_timeout}")
                    if self.session_timeout:
                        t = self.session_timeout
                        cur.execute(
                            f"SET SESSION wait_timeout = {t}, net_read_timeout = {t},"
                            f" net_write_timeout = {t}"
                        )
                    cur.execute("FLUSH TABLES WITH READ LOCK")
            except pymysql.err.MySQLError as exc:
                code = exc.args[0] if exc.args else None
                blocker = blocking_query(conn) if code == ER_LOCK_WAIT_TIMEOUT else ""
                self.release()
                if code == ER_LOCK_WAIT_TIMEOUT:
                    return name, blocker
                if code in (ER_SPECIFIC_ACCESS_DENIED, ER_ACCESS_DENIED, 1044):
                    raise EngineError(
                        f"the backup user on {name} lacks the RELOAD privilege needed for FLUSH TABLES WITH"
                        " READ LOCK; grant it or use --consistency lockfree"
                    ) from exc
                raise EngineError(
                    f"global read lock failed on {describe_error(exc, self.endpoints[name])}"
                ) from exc
            if self.first_acquired is None:
                self.first_acquired = time.monotonic()
            self.locked.append(name)
        return None

    def release(self) -> None:
        """UNLOCK TABLES everywhere (idempotent; safe from the thread that took the lock)."""
        with self._release_guard:
            if not self.locked and self.released_at is not None:
                return
            for name in list(self.locked):
                try:
                    with self.controls[name].cursor() as cur:
                        cur.execute("UNLOCK TABLES")
                except (pymysql.err.MySQLError, OSError, AttributeError):
                    pass  # a dead connection has released its lock with it
                self.locked.remove(name)
            self.released_at = time.monotonic()

    def keepalive(self) -> list[str]:
        """Ping every locked connection; returns the instances whose lock was lost
        (connection killed or dropped), which no longer count as locked."""
        lost = []
        for name in list(self.locked):
            try:
                self.controls[name].ping(reconnect=False)
            except (pymysql.err.MySQLError, OSError, AttributeError):
                lost.append(name)
                self.locked.remove(name)
        return lost

    def sessions(self) -> dict[str, int]:
        """Instance name -> server thread id of the connection holding the lock there."""
        ids = {}
        for name in self.locked:
            try:
                ids[name] = int(self.controls[name].thread_id())
            except (TypeError, ValueError, AttributeError):
                pass
        return ids

    @property
    def held_seconds(self) -> float:
        if self.first_acquired is None:
            return 0.0
        return (self.released_at or time.monotonic()) - self.first_acquired

    @property
    def window_ms(self) -> float | None:
        if self.first_acquired is None or self.released_at is None:
            return None
        return round((self.released_at - self.first_acquired) * 1000.0, 3)


@dataclass(kw_only=True)
class SessionGroup:
    """Dump connections to one instance that share one snapshot, and the shards they serve."""

    instance: str
    endpoint: object
    shards: list[ShardSpec]
    connections: list = field(default_factory=list)
    coordinates: Coordinates = field(default_factory=Coordinates)


class ConsistentCut:
    """Where every shard's binlog stood at the instant its dump connections see.

    `coordinates` (shard name -> Coordinates), `consistent_at` and `lock_window_ms` are
    filled as the cut is taken, so a cut that fails part way still reports what it has.
    """

    def __init__(self, controls: dict[str, object]):
        self.controls = controls  # instance name -> control connection
        self.coordinates: dict[str, Coordinates] = {}
        self.consistent_at: datetime | None = None
        self.lock_window_ms: float | None = None

    def take_locked(
        self, lock: GlobalLock, groups: list[SessionGroup], *, hold: bool = False
    ) -> None:
        """One instant for every group: snapshots started while every instance is locked.

        The lock is released before returning, unless `hold` (cold): then the caller dumps
        under it and calls `release(lock)`, and the lock window is the whole dump.
        """
        lock.acquire()
        current = ""
        taken = False
        try:
            for group in groups:
                current = group.instance
                for conn in group.connections:
                    start_snapshot(conn)
            self.consistent_at = now_utc()
            for group in groups:
                current = group.instance
                file, pos, mysql_gtid = master_status(self.controls[group.instance])
                group.coordinates = Coordinates(file, pos, mysql_gtid, self.consistent_at)
            taken = True
        except pymysql.err.MySQLError as exc:
            raise EngineError(f"starting the consistent snapshot failed: {exc.args[-1]}") from exc
        except ODD_ANSWER as exc:
            raise OddAnswer(current, "taking the consistent snapshot") from exc
        finally:
            if not (hold and taken):
                self.release(lock)
        for group in groups:
            c = group.coordinates
            try:
                c.gtid = gtid_at(self.controls[group.instance], c.binlog_file, c.binlog_pos, c.gtid)
            except ODD_ANSWER as exc:
                raise OddAnswer(group.instance, "reading the snapshot's GTID position") from exc
            for shard in group.shards:
                self.coordinates[shard.name] = c

    def release(self, lock: GlobalLock) -> None:
        """Release the cut's global lock (if still held) and record the lock window."""
        lock.release()
        self.lock_window_ms = lock.window_ms

    def take_lockfree(self, groups: list[SessionGroup]) -> None:
        """One snapshot per group (its first connection), each at its own instant."""
        latest = None
        for group in groups:
            conn = group.connections[0]
            try:
                start_snapshot(conn)
                taken = now_utc()
                if is_mariadb(conn):
                    file, pos = snapshot_status(conn)
                    mysql_gtid = ""
                else:
                    file, pos, mysql_gtid = master_status(conn)
                gtid = gtid_at(self.controls[group.instance], file, pos, mysql_gtid)
            except pymysql.err.MySQLError as exc:
                raise EngineError(
                    f"starting the snapshot on {group.instance} failed: {exc.args[-1]}"
                ) from exc
            except ODD_ANSWER as exc:
                raise OddAnswer(group.instance, "taking its snapshot") from exc
            group.coordinates = Coordinates(file, pos, gtid, taken)
            for shard in group.shards:
                self.coordinates[shard.name] = group.coordinates
            latest = taken
        self.consistent_at = latest


def now_utc() -> datetime:
    return datetime.now(UTC)


def lock_session_kill(endpoint: Endpoint, thread_id: int) -> bool:
    """KILL the connection `thread_id` holding a global read lock (a cancel's backstop).

    Kills only a live connection of `endpoint`'s user, so a stale id never hits another
    client's session. True when it was killed.
    """
    conn = connect(endpoint, connect_timeout=3, read_timeout=5, write_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT USER FROM information_schema.PROCESSLIST WHERE ID = %s", (int(thread_id),)
            )
            row = cur.fetchone()
            if not row or row[0] != endpoint.user:
                return False
            try:
                cur.execute(f"KILL CONNECTION {int(thread_id)}")
            except pymysql.err.MySQLError as exc:
                if exc.args and exc.args[0] == 1094:  # ER_NO_SUCH_THREAD: it ended meanwhile
                    return False
                raise
        return True
    finally:
        conn.close()
