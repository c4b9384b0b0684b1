"""Full backups: preflight, consistent snapshot, parallel chunk dump, signed manifest.

Entry point: `dump_cluster(spec, storage, *, progress, should_cancel) -> BackupResult`.

The run is driven here; the cut lives in `snapshot` (`GlobalLock`, `ConsistentCut`), the
per-connection chunk work in `chunk_dump`, and the manifest document in `manifest`.

Threads: one per dump connection. Workers never call `progress` or
`should_cancel` themselves; they post to a queue the calling thread drains, so
callers may touch their own database (Django) from those callbacks.
"""

from __future__ import annotations

import queue
import threading
import time

import pymysql

from backups.engine import checksum, schema, wire
from backups.engine.chunk_dump import ChunkDumper, DumpGroup, TableDump
from backups.engine.chunking import TablePlan
from backups.engine.errors import ODD_ANSWER, Cancelled, ConnectError, EngineError, OddAnswer
from backups.engine.exclusions import Exclusions, exclusions_for_server
from backups.engine.manifest import manifest_full_document, manifest_write
from backups.engine.mysql import connect, describe_error
from backups.engine.snapshot import (
    ConsistentCut,
    Coordinates,
    GlobalLock,
    now_utc,
    session_open,
)
from backups.engine.throttle import ThreadsRunningGate
from backups.engine.types import (
    BackupResult,
    BackupSpec,
    CancelFn,
    ProgressEvent,
    ProgressFn,
    ShardResult,
    ShardSpec,
)

CANCEL_POLL = 0.25
# Cold: the lock connections' server-side idle timeout (a vanished client's lock dies with
# it), and how often they are pinged while the dump runs (well inside that timeout).
COLD_LOCK_SESSION_TIMEOUT = 30
COLD_LOCK_WATCH = 1.0


def dump_cluster(
    spec: BackupSpec, storage, *, progress: ProgressFn, should_cancel: CancelFn
) -> BackupResult:
    """Back up every shard of `spec` into `storage` under `spec.set_prefix`.

    Returns `BackupResult(ok=True)` only after every chunk, schema file and the signed
    manifest are stored. Failures (unreachable shard, refused table, lost instance,
    storage error, table changed mid-backup) return `ok=False` with a per-shard error,
    after releasing every lock and connection. `Cancelled` is raised when
    `should_cancel()` turns true; everything is released first.

    Tables matching `spec.exclude_tables` are never read (nor refused for their engine)
    and are listed as excluded in the result and the manifest. With
    `spec.max_threads_running`, each new chunk waits while its instance is busier
    (`throttle.ThreadsRunningGate`), reported as a "throttle" progress event.

    `cold`: the global read lock is held on every instance until every table has been
    read, so tables of any engine are included (each non-InnoDB table becomes a note in
    `result.notes`, not a refusal); the stored lock window is the whole dump. Meanwhile a
    "lock" progress event says each second how long it has been held (with `lock_sessions`
    naming the connections holding it; `{}` once released); a cancel releases it first,
    before the workers are stopped; a lock connection lost mid-dump fails the set. The
    throttle is off for cold sets (writers waiting on the lock count as running threads).
    """
    return _DumpRun(spec, storage, progress, should_cancel).execute()


class _DumpRun:
    def __init__(self, spec: BackupSpec, storage, progress: ProgressFn, should_cancel: CancelFn):
        self.spec = spec
        self.storage = storage
        self.progress = progress
        self.should_cancel = should_cancel
        self.created_at = now_utc()
        self.controls: dict[str, object] = {}  # instance -> control connection
        self.endpoints: dict[str, object] = {}
        self.groups: list[DumpGroup] = []
        self.tables: dict[str, list[TableDump]] = {}  # shard name -> tables
        self.objects: dict[str, dict] = {}  # shard name -> views/triggers/...
        self.exclusions: dict[str, Exclusions] = {}  # instance -> the policy's patterns there
        self.excluded: dict[str, list[str]] = {}  # shard name -> tables the policy kept out
        self.gates: dict[str, ThreadsRunningGate] = {}  # instance -> max_threads_running gate
        self.cold = spec.consistency == "cold"
        self.lock: GlobalLock | None = None  # held for the whole dump when cold
        self.notes: list[str] = []
        self.shard_errors: dict[str, str] = {}
        self.cut = ConsistentCut(self.controls)
        self.events: queue.Queue = queue.Queue()
        self.abort = threading.Event()
        self.first_error = ""
        self.error_lock = threading.Lock()
        self.cancelled = False
        self.dumper = ChunkDumper(
            storage=storage,
            data_key=spec.data_key,
            compression_level=spec.compression_level,
            abort=self.abort,
            events=self.events,
            record_error=self._record_error,
        )

    # ---------------------------------------------------------------- driver
    def execute(self) -> BackupResult:
        lock: GlobalLock | None = None
        try:
            self._check_cancel()
            if not self._preflight():
                return self._result(ok=False)
            self._check_cancel()
            self._open_connections()
            if self.spec.consistency in ("locked", "cold"):
                lock = GlobalLock(
                    self.controls,
                    self.endpoints,
                    wait_timeout=self.spec.lock_wait_timeout,
                    retries=self.spec.lock_retries,
                    should_cancel=self.should_cancel,
                    session_timeout=COLD_LOCK_SESSION_TIMEOUT if self.cold else 0,
                )
                self._progress(
                    ProgressEvent(stage="locking", message="taking the global read lock")
                )
                self._snapshot_locked(lock)
            else:
                self._snapshot_lockfree()
            self._run_workers()
            if self.lock is not None:
                if not self.cancelled and not self.first_error:
                    self._watch_cold_lock()  # still held when the last row was read?
                self._release_cold_lock()
            if self.cancelled:
                raise Cancelled("backup cancelled")
            if self.first_error:
                return self._result(ok=False)
            return self._finish()
        except Cancelled:
            self._teardown(lock)
            self._discard_objects()
            raise
        except OddAnswer as exc:  # the shards of the instance that answered oddly fail
            self._record_instance_error(exc.instance, str(exc))
            return self._result(ok=False)
        except EngineError as exc:
            self._record_error(None, str(exc))
            return self._result(ok=False)
        finally:
            self._teardown(lock)

    def _check_cancel(self) -> None:
        if self.should_cancel():
            self.cancelled = True
            raise Cancelled("backup cancelled")

    def _progress(self, event: ProgressEvent) -> None:
        try:
            self.progress(event)
        except Exception:  # noqa: BLE001 - a progress sink must never break a backup
            pass

    def _record_error(self, shard: str | None, message: str) -> None:
        with self.error_lock:
            if shard and shard not in self.shard_errors:
                self.shard_errors[shard] = message
            if not self.first_error:
                self.first_error = f"shard {shard}: {message}" if shard else message

    # ---------------------------------------------------------------- preflight
    def _preflight(self) -> bool:
        """Connect everywhere and describe every table before any lock is taken."""
        for shard in self.spec.shards:
            self.endpoints.setdefault(shard.instance, shard.endpoint)
        for instance, endpoint in self.endpoints.items():
            try:
                conn = connect(endpoint)
            except ConnectError as exc:
                self._record_instance_error(instance, f"instance {instance} unreachable: {exc}")
                continue
            self.controls[instance] = conn  # closed by _teardown whatever happens next
            try:
                with conn.cursor() as cur:
                    cur.execute("SET SESSION sql_mode = ''")
            except pymysql.err.MySQLError as exc:
                self._record_instance_error(instance, describe_error(exc, endpoint))
            self.exclusions[instance] = exclusions_for_server(self.spec.exclude_tables, conn)
            if self.spec.max_threads_running > 0:
                self.gates[instance] = ThreadsRunningGate(
                    instance=instance, endpoint=endpoint, limit=self.spec.max_threads_running
                )
        if self.first_error:
            return False
        if self.cold:
            self.gates.clear()  # writers blocked by the lock would hold every chunk back
        for shard in self.spec.shards:
            try:
                self._describe_shard(shard)
            except EngineError as exc:
                self._record_error(shard.name, str(exc))
            except pymysql.err.MySQLError as exc:
                self._record_error(shard.name, describe_error(exc, shard.endpoint, shard.database))
            except ODD_ANSWER:
                odd = OddAnswer(shard.instance, f"describing database {shard.database}")
                self._record_error(shard.name, str(odd))
        return not self.first_error

    def _record_instance_error(self, instance: str, message: str) -> None:
        for shard in self.spec.shards:
            if shard.instance == instance:
                self._record_error(shard.name, message)

    def _describe_shard(self, shard: ShardSpec) -> None:
        conn = self.controls[shard.instance]
        with conn.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                (shard.database,),
            )
            if cur.fetchone() is None:
                raise EngineError(f"database '{shard.database}' does not exist on {shard.instance}")
        available = {
            name: (engine, rows)
            for name, engine, rows in schema.list_base_tables(conn, shard.database)
        }
        names = list(shard.tables) if shard.tables is not None else sorted(available)
        missing = [name for name in names if name not in available]
        if missing:
            raise EngineError(f"table(s) not found in {shard.database}: {', '.join(missing)}")
        # Excluded tables are never read: no schema file, no chunks, no engine check.
        exclusions = self.exclusions.get(shard.instance) or Exclusions()
        names, self.excluded[shard.name] = exclusions.split(shard.database, names)
        not_innodb = [
            f"{name} ({available[name][0] or 'no engine'})"
            for name in names
            if available[name][0].lower() != "innodb"
        ]
        if not_innodb and self.cold:
            self.notes.append(
                f"non-InnoDB table(s) in {shard.database} copied under the global read lock: "
                f"{', '.join(not_innodb)}"
            )
        elif not_innodb:
            raise EngineError(
                f"hot backups need InnoDB; refusing non-InnoDB table(s) in {shard.database}: "
                f"{', '.join(not_innodb)} (convert them to InnoDB, exclude them with the "
                "policy's exclude_tables, or take a cold backup, which blocks writes while it runs)"
            )
        # Asked even when the C helper builds the lines: an instance that answers no rows to
        # everything (no VERSION) fails here instead of passing as an empty database.
        regex = checksum.server_has_byte_regex(conn)
        client_lines = wire.line_builder() == "client"
        states = []
        for name in names:
            engine, rows = available[name]
            try:
                info = schema.describe_table(
                    conn, shard.database, name, engine=engine, rows_estimate=rows
                )
            except ODD_ANSWER as exc:
                raise OddAnswer(
                    shard.instance, "reading a table's definition", f"{shard.database}.{name}"
                ) from exc
            if not info.columns:
                raise EngineError(f"table {shard.database}.{name} has no stored columns")
            if client_lines:
                line_sql, line_columns = (
                    checksum.client_select_list(info.columns),
                    len(info.columns),
                )
            else:
                line_sql, line_columns = checksum.line_expression(info.columns, regex=regex), 0
            states.append(
                TableDump(
                    shard=shard,
                    info=info,
                    plan=TablePlan(info, self.spec.chunk_rows),
                    line_sql=line_sql,
                    line_columns=line_columns,
                    set_prefix=self.spec.set_prefix,
                )
            )
        self.tables[shard.name] = states
        self.objects[shard.name] = schema.database_objects(conn, shard.database)

    # ---------------------------------------------------------------- snapshot
    def _open_connections(self) -> None:
        if self.spec.consistency in ("locked", "cold"):
            for instance, endpoint in self.endpoints.items():
                shards = [s for s in self.spec.shards if s.instance == instance]
                tables = [t for s in shards for t in self.tables[s.name]]
                self.groups.append(
                    DumpGroup(
                        instance=instance,
                        endpoint=endpoint,
                        shards=shards,
                        tables=tables,
                        gate=self.gates.get(instance),
                    )
                )
            per_group = max(1, int(self.spec.connections_per_instance))
        else:
            for shard in self.spec.shards:
                self.groups.append(
                    DumpGroup(
                        instance=shard.instance,
                        endpoint=shard.endpoint,
                        shards=[shard],
                        tables=self.tables[shard.name],
                        gate=self.gates.get(shard.instance),
                    )
                )
            per_group = 1
        for group in self.groups:
            for _ in range(per_group):
                group.connections.append(session_open(group.instance, group.endpoint))

    def _snapshot_locked(self, lock: GlobalLock) -> None:
        if self.cold:
            self.cut.take_locked(lock, self.groups, hold=True)
            self.lock = lock
            self._lock_held_event()
            return
        self.cut.take_locked(lock, self.groups)
        self._progress(
            ProgressEvent(stage="snapshot", message=f"lock window {self.cut.lock_window_ms} ms")
        )

    # ---------------------------------------------------------------- the cold lock
    def _lock_held_event(self) -> None:
        lock = self.lock
        count = len(lock.locked)
        self._progress(
            ProgressEvent(
                stage="lock",
                message=f"global read lock held for {int(lock.held_seconds)} s on {count} "
                f"instance{'s' if count != 1 else ''} (writes blocked until the dump ends)",
                lock_sessions=lock.sessions(),
            )
        )

    def _watch_cold_lock(self) -> None:
        """Once a second while dumping cold: keep the lock connections alive, fail the run
        when one lost its lock (its tables could change under the dump), say how long."""
        lost = self.lock.keepalive()
        if lost:
            self._record_error(
                None,
                "the global read lock of this cold backup was lost on "
                f"{', '.join(sorted(lost))} (its connection was closed or killed) mid-dump",
            )
            return
        self._lock_held_event()

    def _release_cold_lock(self) -> None:
        lock, self.lock = self.lock, None
        self.cut.release(lock)
        self._progress(
            ProgressEvent(
                stage="lock",
                message="",
                lock_sessions={},
            )
        )
        self._progress(
            ProgressEvent(
                stage="snapshot",
                message=f"global read lock released after {self.cut.lock_window_ms} ms",
            )
        )

    def _snapshot_lockfree(self) -> None:
        self.cut.take_lockfree(self.groups)
        self._progress(ProgressEvent(stage="snapshot", message="per-shard snapshots taken"))

    # ---------------------------------------------------------------- workers
    def _run_workers(self) -> None:
        threads = []
        for group in self.groups:
            for conn in group.connections:
                thread = threading.Thread(
                    target=self.dumper.work,
                    args=(group, conn),
                    name=f"dump-{group.instance}",
                    daemon=True,
                )
                threads.append(thread)
        for thread in threads:
            thread.start()
        watched = time.monotonic()
        while any(t.is_alive() for t in threads):
            self._drain_events(timeout=CANCEL_POLL)
            if not self.abort.is_set():
                if self.lock is not None and time.monotonic() - watched >= COLD_LOCK_WATCH:
                    watched = time.monotonic()
                    self._watch_cold_lock()
                if self.should_cancel():
                    self.cancelled = True
                    if self.lock is not None:
                        self._release_cold_lock()  # writers go on before workers are stopped
                    self._abort()
                elif self.first_error:
                    self._abort()
        for thread in threads:
            thread.join()
        self._drain_events(timeout=0)

    def _drain_events(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = (
                    self.events.get(timeout=remaining)
                    if remaining > 0
                    else self.events.get_nowait()
                )
            except queue.Empty:
                return
            self._progress(event)

    def _abort(self) -> None:
        """Stop every worker now: flag them and kill their server-side connections."""
        self.abort.set()
        for group in self.groups:
            control = self.controls.get(group.instance)
            for conn in group.connections:
                try:
                    with control.cursor() as cur:
                        cur.execute(f"KILL {int(conn.thread_id())}")
                except Exception:  # noqa: BLE001 - the instance may be gone already
                    pass

    # ---------------------------------------------------------------- results
    def _teardown(self, lock: GlobalLock | None) -> None:
        if self.lock is not None:
            self._release_cold_lock()
        elif lock is not None and lock.locked:
            lock.release()
        for group in self.groups:
            for conn in group.connections:
                _close(conn)
            group.connections = []
        for conn in self.controls.values():
            _close(conn)
        self.controls.clear()  # the cut holds this same dict
        for gate in self.gates.values():
            gate.close()

    def _discard_objects(self) -> None:
        try:
            self.storage.delete_prefix(self.spec.set_prefix + "/")
        except Exception:  # noqa: BLE001 - best effort; housekeeping removes leftovers
            pass

    def _result(self, ok: bool, manifest_key: str = "", manifest_sha256: str = "") -> BackupResult:
        shards = []
        for shard in self.spec.shards:
            coords = self.cut.coordinates.get(shard.name, Coordinates())
            shards.append(
                ShardResult(
                    name=shard.name,
                    instance=shard.instance,
                    database=shard.database,
                    binlog_file=coords.binlog_file,
                    binlog_pos=coords.binlog_pos,
                    gtid=coords.gtid,
                    snapshot_at=coords.snapshot_at,
                    tables=[t.result() for t in self.tables.get(shard.name, [])],
                    error=self.shard_errors.get(shard.name, ""),
                )
            )
        if not ok:
            self._discard_objects()
        return BackupResult(
            ok=ok,
            shards=shards,
            lock_window_ms=self.cut.lock_window_ms,
            consistent_at=self.cut.consistent_at,
            manifest_key=manifest_key,
            manifest_sha256=manifest_sha256,
            rows=sum(t.rows for s in shards for t in s.tables),
            raw_bytes=sum(t.raw_bytes for s in shards for t in s.tables),
            stored_bytes=sum(t.stored_bytes for s in shards for t in s.tables),
            error="" if ok else (self.first_error or "backup failed"),
            excluded=self._excluded_names(),
            notes=list(self.notes),
        )

    def _excluded_names(self) -> list[str]:
        names = set()
        for shard in self.spec.shards:
            names.update(f"{shard.database}.{t}" for t in self.excluded.get(shard.name, []))
        return sorted(names)

    def _finish(self) -> BackupResult:
        self._progress(ProgressEvent(stage="manifest", message="writing the manifest"))
        result = self._result(ok=True)
        doc = self._manifest(result)
        try:
            stored = manifest_write(
                self.storage, self.spec.set_prefix, doc, self.spec.manifest_hmac_key
            )
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"storage write failed for the manifest: {exc}") from exc
        result.manifest_key = stored.key
        result.manifest_sha256 = stored.sha256
        return result

    def _manifest(self, result: BackupResult) -> dict:
        return manifest_full_document(
            spec=self.spec,
            result=result,
            tables=self.tables,
            objects=self.objects,
            excluded=self.excluded,
            coordinates=self.cut.coordinates,
            created_at=self.created_at,
            consistent_at=self.cut.consistent_at,
            lock_window_ms=self.cut.lock_window_ms,
        )


def _close(conn) -> None:
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001
        pass
    try:
        conn.close()
    except Exception:  # noqa: BLE001
        pass
