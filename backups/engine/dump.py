"""Full backups: preflight, consistent snapshot, parallel chunk dump, signed manifest.

Entry point: `dump_cluster(spec, storage, *, progress, should_cancel) -> BackupResult`.

Threads: one per dump connection. Workers never call `progress` or
`should_cancel` themselves; they post to a queue the calling thread drains, so
callers may touch their own database (Django) from those callbacks.
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from dataclasses import dataclass, field

import pymysql

from backups.engine import checksum, codec, schema
from backups.engine.chunking import ChunkRange, TablePlan
from backups.engine.errors import Cancelled, ConnectError, EngineError
from backups.engine.manifest import manifest_document, manifest_encryption, manifest_write
from backups.engine.mysql import connect, describe_error, quote_qualified
from backups.engine.snapshot import (
    Coordinates,
    GlobalLock,
    gtid_at,
    is_mariadb,
    master_status,
    now_utc,
    open_dump_connection,
    snapshot_status,
    start_snapshot,
)
from backups.engine.types import (
    BackupResult,
    BackupSpec,
    CancelFn,
    ChunkResult,
    ProgressEvent,
    ProgressFn,
    ShardResult,
    ShardSpec,
    TableResult,
)
from backups.engine.wire import stream_lines
from backups.storage import key_part

PROGRESS_INTERVAL = 0.5
CANCEL_POLL = 0.25
ER_NO_SUCH_TABLE = 1146
ER_TABLE_DEF_CHANGED = 1412
CONNECTION_LOST = (2006, 2013, 2055, 1927, 1053)


class _Aborted(Exception):
    """Raised inside a worker when the run is being torn down."""


class _TableFailed(Exception):
    def __init__(self, table, cause: BaseException):
        super().__init__(str(cause))
        self.table = table
        self.cause = cause


@dataclass
class _TableState:
    shard: ShardSpec
    info: schema.TableInfo
    plan: TablePlan
    line_sql: str
    set_prefix: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False
    schema_key: str = ""
    schema_sha256: str = ""
    schema_stored_bytes: int = 0
    chunks: list[ChunkResult] = field(default_factory=list)
    checksum: checksum.ChecksumAccumulator = field(default_factory=checksum.ChecksumAccumulator)
    error: str = ""

    @property
    def prefix(self) -> str:
        parts = (self.shard.name, self.info.database, self.info.name)
        return "/".join([self.set_prefix, *(key_part(p) for p in parts)])


@dataclass
class _Group:
    """Connections sharing one snapshot, and the tables they dump."""

    instance: str
    endpoint: object
    shards: list[ShardSpec]
    tables: list[_TableState]
    connections: list = field(default_factory=list)
    coordinates: Coordinates = field(default_factory=Coordinates)
    cursor: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def dump_cluster(
    spec: BackupSpec, storage, *, progress: ProgressFn, should_cancel: CancelFn
) -> BackupResult:
    """Back up every shard of `spec` into `storage` under `spec.set_prefix`.

    Returns `BackupResult(ok=True)` only after every chunk, schema file and the signed
    manifest are stored. Failures (unreachable shard, refused table, lost instance,
    storage error, table changed mid-backup) return `ok=False` with a per-shard error,
    after releasing every lock and connection. `Cancelled` is raised when
    `should_cancel()` turns true; everything is released first.
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
        self.groups: list[_Group] = []
        self.tables: dict[str, list[_TableState]] = {}  # shard name -> tables
        self.objects: dict[str, dict] = {}  # shard name -> views/triggers/...
        self.shard_errors: dict[str, str] = {}
        self.coordinates: dict[str, Coordinates] = {}  # shard name -> coordinates
        self.events: queue.Queue = queue.Queue()
        self.abort = threading.Event()
        self.first_error = ""
        self.error_lock = threading.Lock()
        self.lock_window_ms: float | None = None
        self.consistent_at = None
        self.cancelled = False

    # ---------------------------------------------------------------- driver
    def execute(self) -> BackupResult:
        lock: GlobalLock | None = None
        try:
            self._check_cancel()
            if not self._preflight():
                return self._result(ok=False)
            self._check_cancel()
            self._open_connections()
            if self.spec.consistency == "locked":
                lock = GlobalLock(
                    self.controls,
                    self.endpoints,
                    wait_timeout=self.spec.lock_wait_timeout,
                    retries=self.spec.lock_retries,
                    should_cancel=self.should_cancel,
                )
                self._progress(
                    ProgressEvent(stage="locking", message="taking the global read lock")
                )
                self._snapshot_locked(lock)
            else:
                self._snapshot_lockfree()
            self._run_workers()
            if self.cancelled:
                raise Cancelled("backup cancelled")
            if self.first_error:
                return self._result(ok=False)
            return self._finish()
        except Cancelled:
            self._teardown(lock)
            self._discard_objects()
            raise
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
        if self.first_error:
            return False
        for shard in self.spec.shards:
            try:
                self._describe_shard(shard)
            except EngineError as exc:
                self._record_error(shard.name, str(exc))
            except pymysql.err.MySQLError as exc:
                self._record_error(shard.name, describe_error(exc, shard.endpoint, shard.database))
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
        not_innodb = [
            f"{name} ({available[name][0] or 'no engine'})"
            for name in names
            if available[name][0].lower() != "innodb"
        ]
        if not_innodb:
            raise EngineError(
                f"hot backups need InnoDB; refusing non-InnoDB table(s) in {shard.database}: {', '.join(not_innodb)}"
            )
        regex = checksum.server_has_byte_regex(conn)
        states = []
        for name in names:
            engine, rows = available[name]
            info = schema.describe_table(
                conn, shard.database, name, engine=engine, rows_estimate=rows
            )
            if not info.columns:
                raise EngineError(f"table {shard.database}.{name} has no stored columns")
            states.append(
                _TableState(
                    shard=shard,
                    info=info,
                    plan=TablePlan(info, self.spec.chunk_rows),
                    line_sql=checksum.line_expression(info.columns, regex=regex),
                    set_prefix=self.spec.set_prefix,
                )
            )
        self.tables[shard.name] = states
        self.objects[shard.name] = schema.database_objects(conn, shard.database)

    # ---------------------------------------------------------------- snapshot
    def _open_connections(self) -> None:
        if self.spec.consistency == "locked":
            for instance, endpoint in self.endpoints.items():
                shards = [s for s in self.spec.shards if s.instance == instance]
                tables = [t for s in shards for t in self.tables[s.name]]
                self.groups.append(
                    _Group(instance=instance, endpoint=endpoint, shards=shards, tables=tables)
                )
            per_group = max(1, int(self.spec.connections_per_instance))
        else:
            for shard in self.spec.shards:
                self.groups.append(
                    _Group(
                        instance=shard.instance,
                        endpoint=shard.endpoint,
                        shards=[shard],
                        tables=self.tables[shard.name],
                    )
                )
            per_group = 1
        for group in self.groups:
            for _ in range(per_group):
                try:
                    group.connections.append(open_dump_connection(group.endpoint))
                except ConnectError as exc:
                    raise EngineError(
                        f"cannot open dump connections to {group.instance}: {exc}"
                    ) from exc
                except pymysql.err.MySQLError as exc:
                    raise EngineError(
                        f"cannot open dump connections to {group.instance}: "
                        f"{describe_error(exc, group.endpoint)}"
                    ) from exc

    def _snapshot_locked(self, lock: GlobalLock) -> None:
        lock.acquire()
        try:
            for group in self.groups:
                for conn in group.connections:
                    start_snapshot(conn)
            self.consistent_at = now_utc()
            for group in self.groups:
                file, pos, mysql_gtid = master_status(self.controls[group.instance])
                group.coordinates = Coordinates(file, pos, mysql_gtid, self.consistent_at)
        except pymysql.err.MySQLError as exc:
            raise EngineError(f"starting the consistent snapshot failed: {exc.args[-1]}") from exc
        finally:
            lock.release()
            self.lock_window_ms = lock.window_ms
        for group in self.groups:
            c = group.coordinates
            c.gtid = gtid_at(self.controls[group.instance], c.binlog_file, c.binlog_pos, c.gtid)
            for shard in group.shards:
                self.coordinates[shard.name] = c
        self._progress(
            ProgressEvent(stage="snapshot", message=f"lock window {self.lock_window_ms} ms")
        )

    def _snapshot_lockfree(self) -> None:
        latest = None
        for group in self.groups:
            conn = group.connections[0]
            try:
                start_snapshot(conn)
                taken = now_utc()
                if is_mariadb(conn):
                    file, pos = snapshot_status(conn)
                    mysql_gtid = ""
                else:
                    file, pos, mysql_gtid = master_status(conn)
            except pymysql.err.MySQLError as exc:
                raise EngineError(
                    f"starting the snapshot on {group.instance} failed: {exc.args[-1]}"
                ) from exc
            gtid = gtid_at(self.controls[group.instance], file, pos, mysql_gtid)
            group.coordinates = Coordinates(file, pos, gtid, taken)
            for shard in group.shards:
                self.coordinates[shard.name] = group.coordinates
            latest = taken
        self.consistent_at = latest
        self._progress(ProgressEvent(stage="snapshot", message="per-shard snapshots taken"))

    # ---------------------------------------------------------------- workers
    def _run_workers(self) -> None:
        threads = []
        for group in self.groups:
            for conn in group.connections:
                thread = threading.Thread(
                    target=self._worker,
                    args=(group, conn),
                    name=f"dump-{group.instance}",
                    daemon=True,
                )
                threads.append(thread)
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            self._drain_events(timeout=CANCEL_POLL)
            if not self.abort.is_set():
                if self.should_cancel():
                    self.cancelled = True
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

    def _next_task(self, group: _Group, conn) -> tuple[_TableState, ChunkRange] | None:
        while not self.abort.is_set():
            with group.lock:
                pending = [t for t in group.tables if not t.plan.exhausted and not t.error]
                if not pending:
                    return None
                table = pending[group.cursor % len(pending)]
                group.cursor += 1
            try:
                with table.lock:
                    if table.error:
                        continue
                    if not table.started:
                        self._start_table(table, conn)
                        table.started = True
                chunk = table.plan.next_range(conn)
            except _Aborted:
                raise
            except Exception as exc:  # noqa: BLE001 - attributed to the table below
                raise _TableFailed(table, exc) from exc
            if chunk is not None:
                return table, chunk
        return None

    def _start_table(self, table: _TableState, conn) -> None:
        """First touch inside the snapshot: pin the table (MDL) and check its definition."""
        info = table.info
        qualified = quote_qualified(info.database, info.name)
        with conn.cursor() as cur:
            cur.execute(f"SELECT 1 FROM {qualified} LIMIT 0")  # noqa: S608 - quoted identifier
            cur.fetchall()
        current = schema.show_create_table(conn, info.database, info.name)
        if schema.ddl_fingerprint(current) != schema.ddl_fingerprint(info.ddl):
            raise EngineError(f"table {info.database}.{info.name} was altered during the backup")
        info.ddl = current
        key = f"{table.prefix}/schema.sql"
        stored = self._put(key, [current.encode("utf-8")])
        table.schema_key, table.schema_sha256, table.schema_stored_bytes = (
            key,
            stored.sha256,
            stored.size,
        )

    def _worker(self, group: _Group, conn) -> None:
        table = None
        try:
            while not self.abort.is_set():
                task = self._next_task(group, conn)
                if task is None:
                    return
                table, chunk = task
                self._dump_chunk(conn, table, chunk)
        except _Aborted:
            return
        except Exception as exc:  # noqa: BLE001 - every failure becomes a per-shard error
            if self.abort.is_set():
                return
            if isinstance(exc, _TableFailed):
                table, exc = exc.table, exc.cause
            message = self._explain(exc, group, table)
            if table is not None:
                table.error = message
            shards = [table.shard.name] if table is not None else [s.name for s in group.shards]
            for name in shards:
                self._record_error(name, message)

    def _explain(self, exc: Exception, group: _Group, table: _TableState | None) -> str:
        where = f"{table.info.database}.{table.info.name}" if table else group.instance
        if isinstance(exc, pymysql.err.MySQLError):
            code = exc.args[0] if exc.args else None
            if code == ER_NO_SUCH_TABLE:
                return f"table {where} was dropped during the backup"
            if code == ER_TABLE_DEF_CHANGED:
                return f"table {where} was altered during the backup"
            if code in CONNECTION_LOST:
                return f"lost the connection to instance {group.instance} while dumping {where}"
            return f"dumping {where} failed: {describe_error(exc, group.endpoint)}"
        if isinstance(exc, EngineError):
            return str(exc)
        return f"dumping {where} failed: {exc}"

    def _put(self, key: str, chunks):
        try:
            return self.storage.put_stream(key, chunks)
        except (_Aborted, pymysql.err.MySQLError, EngineError):
            raise
        except Exception as exc:
            if isinstance(exc.__cause__ or exc.__context__, (_Aborted, pymysql.err.MySQLError)):
                raise (exc.__cause__ or exc.__context__) from exc
            raise EngineError(f"storage write failed for {key}: {exc}") from exc

    def _dump_chunk(self, conn, table: _TableState, chunk: ChunkRange) -> None:
        info = table.info
        suffix = ".tsv.zst.enc" if self.spec.data_key else ".tsv.zst"
        key = f"{table.prefix}/chunk-{chunk.index:06d}{suffix}"
        where, params = chunk.where()
        sql = f"SELECT {table.line_sql} FROM {quote_qualified(info.database, info.name)} WHERE {where}"  # noqa: S608
        counts = {"rows": 0, "raw": 0, "sum": 0, "xor": 0}
        abort = self.abort
        events = self.events

        def raw_chunks():
            crc32 = zlib.crc32
            rows_total = raw_total = crc_sum = crc_xor = 0
            pending_rows = pending_bytes = 0
            last_event = time.monotonic()
            for lines in stream_lines(conn, sql, params):
                if abort.is_set():
                    raise _Aborted()
                for line in lines:
                    crc = crc32(line)
                    crc_sum += crc
                    crc_xor ^= crc
                count = len(lines)
                lines.append(b"")
                data = b"\n".join(lines)
                rows_total += count
                raw_total += len(data)
                pending_rows += count
                pending_bytes += len(data)
                now = time.monotonic()
                if now - last_event >= PROGRESS_INTERVAL:
                    events.put(
                        ProgressEvent(
                            shard=table.shard.name,
                            table=info.name,
                            rows_done=pending_rows,
                            bytes_done=pending_bytes,
                            rows_estimate=info.rows_estimate,
                            stage="dump",
                        )
                    )
                    pending_rows = pending_bytes = 0
                    last_event = now
                yield data
            counts.update(
                rows=rows_total,
                raw=raw_total,
                sum=crc_sum,
                xor=crc_xor,
                pr=pending_rows,
                pb=pending_bytes,
            )

        stored = self._put(
            key,
            codec.encode(
                raw_chunks(),
                level=self.spec.compression_level,
                data_key=self.spec.data_key,
                aad=key.encode(),
            ),
        )
        if abort.is_set():
            raise _Aborted()
        result = ChunkResult(
            index=chunk.index,
            key=stored.key,
            rows=counts["rows"],
            raw_bytes=counts["raw"],
            stored_bytes=stored.size,
            sha256=stored.sha256,
        )
        part = checksum.ChecksumAccumulator()
        part.rows, part.crc_sum, part.crc_xor = counts["rows"], counts["sum"], counts["xor"]
        with table.lock:
            table.chunks.append(result)
            table.checksum.merge(part)
        events.put(
            ProgressEvent(
                shard=table.shard.name,
                table=info.name,
                rows_done=counts.get("pr", 0),
                bytes_done=counts.get("pb", 0),
                rows_estimate=info.rows_estimate,
                stage="dump",
                chunk=_chunk_entry(result),
            )
        )

    # ---------------------------------------------------------------- results
    def _teardown(self, lock: GlobalLock | None) -> None:
        if lock is not None and lock.locked:
            lock.release()
        for group in self.groups:
            for conn in group.connections:
                _close(conn)
            group.connections = []
        for conn in self.controls.values():
            _close(conn)
        self.controls = {}

    def _discard_objects(self) -> None:
        try:
            self.storage.delete_prefix(self.spec.set_prefix + "/")
        except Exception:  # noqa: BLE001 - best effort; housekeeping removes leftovers
            pass

    def _table_result(self, table: _TableState) -> TableResult:
        chunks = sorted(table.chunks, key=lambda c: c.index)
        return TableResult(
            database=table.info.database,
            name=table.info.name,
            engine=table.info.engine,
            has_primary_key=table.info.has_primary_key,
            rows=sum(c.rows for c in chunks),
            raw_bytes=sum(c.raw_bytes for c in chunks),
            stored_bytes=sum(c.stored_bytes for c in chunks),
            checksum=table.checksum.value,
            chunks=chunks,
            error=table.error,
        )

    def _result(self, ok: bool, manifest_key: str = "", manifest_sha256: str = "") -> BackupResult:
        shards = []
        for shard in self.spec.shards:
            coords = self.coordinates.get(shard.name, Coordinates())
            shards.append(
                ShardResult(
                    name=shard.name,
                    instance=shard.instance,
                    database=shard.database,
                    binlog_file=coords.binlog_file,
                    binlog_pos=coords.binlog_pos,
                    gtid=coords.gtid,
                    snapshot_at=coords.snapshot_at,
                    tables=[self._table_result(t) for t in self.tables.get(shard.name, [])],
                    error=self.shard_errors.get(shard.name, ""),
                )
            )
        if not ok:
            self._discard_objects()
        return BackupResult(
            ok=ok,
            shards=shards,
            lock_window_ms=self.lock_window_ms,
            consistent_at=self.consistent_at,
            manifest_key=manifest_key,
            manifest_sha256=manifest_sha256,
            rows=sum(t.rows for s in shards for t in s.tables),
            raw_bytes=sum(t.raw_bytes for s in shards for t in s.tables),
            stored_bytes=sum(t.stored_bytes for s in shards for t in s.tables),
            error="" if ok else (self.first_error or "backup failed"),
        )

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
        spec = self.spec
        shards_doc = []
        objects = 0
        for shard, shard_result in zip(spec.shards, result.shards, strict=True):
            coords = self.coordinates.get(shard.name, Coordinates())
            tables_doc = []
            for state, table in zip(self.tables[shard.name], shard_result.tables, strict=True):
                info = state.info
                objects += 1 + len(table.chunks)
                tables_doc.append(
                    {
                        "name": info.name,
                        "engine": info.engine,
                        "has_primary_key": info.has_primary_key,
                        "primary_key": list(info.primary_key),
                        "columns": info.column_names,
                        "ddl": info.ddl,
                        "schema_key": state.schema_key,
                        "schema_sha256": state.schema_sha256,
                        "schema_stored_bytes": state.schema_stored_bytes,
                        "rows": table.rows,
                        "raw_bytes": table.raw_bytes,
                        "stored_bytes": table.stored_bytes,
                        "checksum": table.checksum,
                        "chunks": [_chunk_entry(c) for c in table.chunks],
                    }
                )
            db_objects = self.objects.get(shard.name, {})
            shards_doc.append(
                {
                    "name": shard.name,
                    "instance": shard.instance,
                    "database": shard.database,
                    "binlog_file": coords.binlog_file,
                    "binlog_pos": coords.binlog_pos,
                    "gtid": coords.gtid,
                    "snapshot_at": _iso(coords.snapshot_at),
                    "views": db_objects.get("views", []),
                    "triggers": db_objects.get("triggers", []),
                    "routines": db_objects.get("routines", []),
                    "events": db_objects.get("events", []),
                    "tables": tables_doc,
                }
            )
        return manifest_document(
            cluster=spec.cluster,
            set_id=spec.set_id,
            kind="full",
            parent=None,
            consistency=spec.consistency,
            created_at=_iso(self.created_at),
            consistent_at=_iso(self.consistent_at),
            lock_window_ms=self.lock_window_ms,
            started_by=spec.started_by,
            topology=spec.topology,
            compression_level=spec.compression_level,
            encryption=(
                manifest_encryption(key_id=spec.key_id, wrapped_key=spec.wrapped_key)
                if spec.data_key
                else None
            ),
            checksum_algorithm=checksum.ALGORITHM,
            shards=shards_doc,
            binlog=[],
            totals={
                "rows": result.rows,
                "raw_bytes": result.raw_bytes,
                "stored_bytes": result.stored_bytes,
                "objects": objects,
            },
        )


def _chunk_entry(chunk: ChunkResult) -> dict:
    return {
        "index": chunk.index,
        "key": chunk.key,
        "rows": chunk.rows,
        "raw_bytes": chunk.raw_bytes,
        "stored_bytes": chunk.stored_bytes,
        "sha256": chunk.sha256,
    }


def _iso(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _close(conn) -> None:
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001
        pass
    try:
        conn.close()
    except Exception:  # noqa: BLE001
        pass
