"""The parallel chunk dump: what each dump connection does inside its snapshot.

`ChunkDumper.work(group, conn)` runs on one thread per dump connection. It takes the
group's tables in turn, pins each table and stores its schema file on first touch, then
streams chunk after chunk (compressed, optionally encrypted) into storage while summing
the table checksum. Workers never call the run's callbacks: progress goes onto the
`events` queue the calling thread drains, and failures go to `record_error`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import pymysql

from backups.engine import checksum, codec, schema
from backups.engine.chunking import ChunkRange, TablePlan
from backups.engine.errors import ODD_ANSWER, EngineError, OddAnswer
from backups.engine.manifest import manifest_chunk_entry
from backups.engine.mysql import describe_error, quote_qualified
from backups.engine.snapshot import SessionGroup
from backups.engine.throttle import ThreadsRunningGate
from backups.engine.types import ChunkResult, ProgressEvent, ShardSpec, TableResult
from backups.engine.wire import stream_line_blocks
from backups.storage import key_part

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5
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
class TableDump:
    """One table being dumped: its description, chunk plan and what has been stored."""

    shard: ShardSpec
    info: schema.TableInfo
    plan: TablePlan
    line_sql: str  # a chunk query's select list: line_expression, or client_select_list
    set_prefix: str
    line_columns: int = 0  # columns the C helper joins into lines; 0: the server built them
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

    def result(self) -> TableResult:
        chunks = sorted(self.chunks, key=lambda c: c.index)
        return TableResult(
            database=self.info.database,
            name=self.info.name,
            engine=self.info.engine,
            has_primary_key=self.info.has_primary_key,
            rows=sum(c.rows for c in chunks),
            raw_bytes=sum(c.raw_bytes for c in chunks),
            stored_bytes=sum(c.stored_bytes for c in chunks),
            checksum=self.checksum.value,
            chunks=chunks,
            error=self.error,
        )


@dataclass(kw_only=True)
class DumpGroup(SessionGroup):
    """Connections sharing one snapshot, and the tables they dump."""

    tables: list[TableDump]
    cursor: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Policy max_threads_running: new chunks wait while the instance is busier (None = off).
    gate: ThreadsRunningGate | None = None


class ChunkDumper:
    """The chunk work shared by every worker thread of one run."""

    def __init__(
        self,
        *,
        storage,
        data_key: bytes | None,
        compression_level: int,
        abort: threading.Event,
        events: queue.Queue,
        record_error: Callable[[str | None, str], None],
    ):
        self.storage = storage
        self.data_key = data_key
        self.compression_level = compression_level
        self.abort = abort
        self.events = events
        self.record_error = record_error

    def work(self, group: DumpGroup, conn) -> None:
        """Dump chunks of `group`'s tables on `conn` until none remain or the run aborts."""
        table = None
        gate = group.gate
        try:
            while not self.abort.is_set():
                # A busy server holds the next chunk back; cancel and abort still end the wait.
                if gate is not None and not gate.wait(
                    stopped=self.abort.is_set, report=self.events.put
                ):
                    return
                with gate.chunk() if gate is not None else nullcontext():
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
                self.record_error(name, message)

    def _next_task(self, group: DumpGroup, conn) -> tuple[TableDump, ChunkRange] | None:
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

    def _start_table(self, table: TableDump, conn) -> None:
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

    def _explain(self, exc: Exception, group: DumpGroup, table: TableDump | None) -> str:
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
        if isinstance(exc, ODD_ANSWER):  # an empty or misshapen answer to a query
            log.warning("odd answer from %s while dumping %s", group.instance, where, exc_info=exc)
            return str(OddAnswer(group.instance, "dumping rows", where if table else ""))
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

    def _dump_chunk(self, conn, table: TableDump, chunk: ChunkRange) -> None:
        info = table.info
        suffix = ".tsv.zst.enc" if self.data_key else ".tsv.zst"
        key = f"{table.prefix}/chunk-{chunk.index:06d}{suffix}"
        where = chunk.where(conn.escape)  # values inlined: no %-formatting of identifiers
        sql = f"SELECT {table.line_sql} FROM {quote_qualified(info.database, info.name)} WHERE {where}"  # noqa: S608
        counts = {"rows": 0, "raw": 0, "sum": 0, "xor": 0}
        abort = self.abort
        events = self.events

        def raw_chunks():
            rows_total = raw_total = crc_sum = crc_xor = 0
            pending_rows = pending_bytes = 0
            last_event = time.monotonic()
            for data, count, block_sum, block_xor in stream_line_blocks(
                conn, sql, table.line_columns
            ):
                if abort.is_set():
                    raise _Aborted()
                crc_sum += block_sum
                crc_xor ^= block_xor
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

        if table.line_columns:  # bare string columns arrive unconverted (client_select_list)
            _results_charset(conn, "binary")
        stored = self._put(
            key,
            codec.encode(
                raw_chunks(),
                level=self.compression_level,
                data_key=self.data_key,
                aad=key.encode(),
            ),
        )
        if abort.is_set():
            raise _Aborted()
        if table.line_columns:  # the next table's first touch reads names and DDL as text
            _results_charset(conn, "utf8mb4")
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
                chunk=manifest_chunk_entry(result),
            )
        )


def _results_charset(conn, charset: str) -> None:
    """The session's character_set_results: "binary" while the C helper reads a chunk,
    "utf8mb4" (what `mysql.connect` sets) for everything else."""
    with conn.cursor() as cur:
        cur.execute(f"SET character_set_results = {charset}")
