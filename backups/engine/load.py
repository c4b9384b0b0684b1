"""Restores: create schema objects from a manifest, stream chunks back with LOAD DATA.

Entry points:
* `create_database_objects(target, target_database, shard_manifest, *, tables, table_renames, create_database, resume)`
* `load_table(job, storage, *, progress, should_cancel, is_chunk_done, on_chunk_done, parallel) -> TableLoadResult`
* `recreate_database_objects(target, target_database, shard_manifest, *, kinds)`

Chunks stream from storage through `codec.decode` straight into the server's
`LOAD DATA LOCAL INFILE` request (no temporary file, no whole table in memory),
one transaction per chunk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import pymysql
import pymysql.connections

from backups.engine import checksum, codec, schema
from backups.engine.errors import (
    ODD_ANSWER,
    Cancelled,
    ConnectError,
    EngineError,
    IntegrityError,
    OddAnswer,
)
from backups.engine.mysql import Endpoint, connect, describe_error, quote_ident, quote_qualified
from backups.engine.throttle import ThreadsRunningGate
from backups.engine.types import CancelFn, ProgressEvent, ProgressFn, TableLoadJob, TableLoadResult

STREAM_NAME = "shardvault-chunk-stream"
PACKET_BYTES = 1 << 20

# --------------------------------------------------------------------------- LOAD DATA LOCAL from an iterator
LOCAL_FILE_REFUSED = 2000  # CR_UNKNOWN_ERROR: the client refused the server's request


def _send_local_stream(filename, conn):
    """PyMySQL hook (replaces its `_send_local_file`): send the chunk stream the loader armed.

    This is the only LOAD DATA LOCAL answer PyMySQL gives anywhere in the process: it never
    opens a file. Only a connection the loader armed (`_shardvault_source`), and only for the
    name the loader's own statement gave (STREAM_NAME), gets the stream; any other request (a
    server asking for /proc/self/environ, or any name at all outside a load) gets an empty
    reply (PyMySQL sends the end-of-data packet after this returns or raises) and the
    statement fails with one sentence.
    """
    source = getattr(conn, "_shardvault_source", None)
    conn._shardvault_source = None
    name = filename.decode("utf-8", "replace") if isinstance(filename, bytes) else str(filename)
    if source is None or name != STREAM_NAME:
        raise pymysql.err.OperationalError(
            LOCAL_FILE_REFUSED,
            f"the server asked for the local file '{name[:200]}', which was refused: only the "
            "chunk stream the restore itself opened is ever sent (is this really the target "
            "server?)",
        )
    packet = max(16 * 1024, min(int(conn.max_allowed_packet) - 1024, PACKET_BYTES))
    try:
        for piece in source:
            # Never send an empty packet: it tells the server the data has ended.
            for start in range(0, len(piece), packet):
                conn.write_packet(piece[start : start + packet] if len(piece) > packet else piece)
    except BaseException as exc:  # noqa: BLE001 - surfaced after the server has answered
        conn._shardvault_error = exc


pymysql.connections._send_local_file = _send_local_stream


def _load_stream(conn, sql: str, source: Iterable[bytes]) -> int:
    conn._shardvault_source = iter(source)
    conn._shardvault_error = None
    try:
        with conn.cursor() as cur:
            affected = cur.execute(sql)
    finally:
        conn._shardvault_source = None
    error = conn._shardvault_error
    conn._shardvault_error = None
    if error is not None:
        raise error
    return int(affected or 0)


# --------------------------------------------------------------------------- schema
# ER_SPECIFIC_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_ERROR: creating an object for another definer
DEFINER_REFUSED = (1227, 1045)
LOAD_SQL_MODE = "SET SESSION sql_mode = 'NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION'"


def _open(target: Endpoint, database: str | None = None, *, local_infile: bool = False):
    """A restore session on `target`; an unreachable server is an EngineError saying so."""
    try:
        conn = connect(target, database, local_infile=local_infile, autocommit=True)
    except ConnectError as exc:
        raise EngineError(str(exc)) from exc
    try:
        with conn.cursor() as cur:
            cur.execute(LOAD_SQL_MODE)
            cur.execute("SET SESSION foreign_key_checks = 0")
    except pymysql.err.MySQLError as exc:
        conn.close()
        raise EngineError(describe_error(exc, target, database)) from exc
    return conn


def _table_has_rows(cur, database: str, table: str) -> bool | None:
    """None when the table does not exist."""
    cur.execute(
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (database, table),
    )
    if cur.fetchone() is None:
        return None
    cur.execute(f"SELECT 1 FROM {quote_qualified(database, table)} LIMIT 1")  # noqa: S608 - quoted identifier
    return cur.fetchone() is not None


def create_database_objects(
    target: Endpoint,
    target_database: str,
    shard_manifest: dict,
    *,
    tables: list[str] | None,
    table_renames: dict[str, str] | None = None,
    create_database: bool = True,
    resume: bool = False,
) -> list[str]:
    """Create the database (if missing) and the tables from the stored DDL.

    Refuses (EngineError naming it) when a target table already holds rows, unless
    `resume` is set, in which case existing tables are kept for a resumed load.
    An existing empty table is replaced by the stored definition. Returns the target
    table names created or kept.
    """
    renames = table_renames or {}
    wanted = [t for t in shard_manifest["tables"] if tables is None or t["name"] in tables]
    if tables is not None:
        unknown = sorted(set(tables) - {t["name"] for t in shard_manifest["tables"]})
        if unknown:
            raise EngineError(
                f"table(s) not in the backup of shard {shard_manifest.get('name')}: {', '.join(unknown)}"
            )
    conn = _open(target)
    created = []
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                (target_database,),
            )
            if cur.fetchone() is None:
                if not create_database:
                    raise EngineError(
                        f"database '{target_database}' does not exist on {target.name}"
                    )
                cur.execute(f"CREATE DATABASE {quote_ident(target_database)}")
            cur.execute(f"USE {quote_ident(target_database)}")
            for table in wanted:
                name = renames.get(table["name"], table["name"])
                state = _table_has_rows(cur, target_database, name)
                if state is True and not resume:
                    raise EngineError(
                        f"target table {target_database}.{name} on {target.name} is not empty"
                    )
                if state is not None and resume:
                    created.append(name)
                    continue
                if state is False:
                    cur.execute(f"DROP TABLE {quote_qualified(target_database, name)}")
                cur.execute(schema.rename_table_ddl(table["ddl"], name))
                created.append(name)
    except pymysql.err.MySQLError as exc:
        raise EngineError(
            f"creating tables in {target_database} failed: {describe_error(exc, target)}"
        ) from exc
    finally:
        conn.close()
    return created


def recreate_database_objects(
    target: Endpoint,
    target_database: str,
    shard_manifest: dict,
    *,
    kinds: Iterable[str] = ("views", "triggers", "routines", "events"),
) -> list[str]:
    """Create views, triggers, routines and events after the data is loaded.

    DEFINER clauses are kept, so a restored object runs as the account it ran as at the
    source, never as the (usually all-powerful) restore account; creating an object for
    another definer needs SET USER (or SUPER) on the target, and a refusal says so. Events
    are created DISABLED: a restored copy (side, instance, drill) must not run production's
    schedule against its tables. References to the source database are pointed at
    `target_database`. Returns the names created; raises EngineError naming the first
    object that cannot be created.
    """
    source = shard_manifest.get("database", target_database)
    created: list[str] = []
    conn = _open(target, target_database)
    try:
        with conn.cursor() as cur:
            for kind in kinds:
                entries = list(shard_manifest.get(kind, []))
                # Views may depend on views: retry until no more progress is made.
                while entries:
                    failed, last_error = [], None
                    for entry in entries:
                        ddl = schema.retarget_database(entry["ddl"], source, target_database)
                        try:
                            if kind == "events":
                                ddl = schema.event_disabled(ddl)
                            if entry.get("sql_mode") is not None:
                                cur.execute("SET SESSION sql_mode = %s", (entry["sql_mode"],))
                            cur.execute(ddl)
                            created.append(entry["name"])
                        except (pymysql.err.MySQLError, ValueError) as exc:
                            failed.append(entry)
                            last_error = (entry, exc)
                        finally:
                            cur.execute(LOAD_SQL_MODE)
                    if len(failed) == len(entries):
                        entry, exc = last_error
                        hint = ""
                        if exc.args and exc.args[0] in DEFINER_REFUSED:
                            hint = (
                                f" (its definer is {schema.definer_of(entry['ddl'])}: the restore "
                                "account needs SET USER or SUPER to create it as that account)"
                            )
                        raise EngineError(
                            f"cannot create {kind[:-1]} {entry['name']} in {target_database}: "
                            f"{exc.args[-1]}{hint}"
                        )
                    entries = failed
    except pymysql.err.MySQLError as exc:
        raise EngineError(
            f"creating views, triggers and routines in {target_database} failed: "
            f"{describe_error(exc, target, target_database)}"
        ) from exc
    finally:
        conn.close()
    return created


# --------------------------------------------------------------------------- data
def _chunk_source(storage, chunk: dict, data_key: bytes | None):
    key = chunk["key"]
    stored = storage.get_stream(
        key, expect_sha256=chunk.get("sha256"), expect_size=chunk.get("stored_bytes")
    )
    try:
        yield from codec.decode(stored, data_key=data_key, aad=key.encode(), object_key=key)
    except IntegrityError:
        raise
    except Exception as exc:  # noqa: BLE001 - a wrong key or damaged frame names the object
        raise IntegrityError(
            key, f"cannot be decoded ({exc or type(exc).__name__}); wrong key or damaged data"
        ) from exc


# ER_LOCK_DEADLOCK and ER_LOCK_WAIT_TIMEOUT: the chunk's transaction was rolled back whole.
_RETRYABLE = (1213, 1205)
CHUNK_DEADLOCK_ATTEMPTS = 3


def load_table(
    job: TableLoadJob,
    storage,
    *,
    progress: ProgressFn,
    should_cancel: CancelFn,
    is_chunk_done: Callable[[str], bool] = lambda key: False,
    on_chunk_done: Callable[[str, int], None] = lambda key, rows: None,
    parallel: int = 2,
    throttle: ThreadsRunningGate | None = None,
) -> TableLoadResult:
    """Load one table's chunks (skipping those `is_chunk_done` reports) and prove it.

    Each chunk is one transaction; `on_chunk_done(key, rows)` is called (in the
    caller's thread) after its commit. Afterwards the server-side checksum of the
    target table is compared with the manifest's. Raises IntegrityError naming the
    object for a damaged or undecryptable chunk, Cancelled when asked to stop (also while
    `throttle`, the target's max_threads_running gate, holds the next chunk back).
    """
    table = job.manifest_table
    columns = list(table["columns"])
    target = quote_qualified(job.target_database, job.target_table)
    column_list = ", ".join(quote_ident(c) for c in columns)
    sql = (
        f"LOAD DATA LOCAL INFILE '{STREAM_NAME}' INTO TABLE {target} CHARACTER SET binary"
        f" FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n' ({column_list})"
    )
    chunks = list(table.get("chunks", []))
    todo = [c for c in chunks if not is_chunk_done(c["key"])]
    skipped = len(chunks) - len(todo)
    work: queue.Queue = queue.Queue()
    for chunk in todo:
        work.put(chunk)
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def worker() -> None:
        conn = None
        try:
            conn = _open(job.target, job.target_database, local_infile=True)
            with conn.cursor() as cur:
                cur.execute("SET SESSION unique_checks = 0")
                try:
                    cur.execute("SET SESSION sql_log_bin = 0")
                except pymysql.err.MySQLError:
                    pass  # needs SUPER/BINLOG ADMIN; the load still works, only binlogged
            conn.autocommit(False)
            while not stop.is_set():
                if work.empty():
                    return
                # A busy target holds the next chunk back (its pause line goes to progress).
                if throttle is not None and not throttle.wait(
                    stopped=stop.is_set, report=lambda event: results.put(("note", None, event))
                ):
                    return
                try:
                    chunk = work.get_nowait()
                except queue.Empty:
                    return
                for attempt in range(1, CHUNK_DEADLOCK_ATTEMPTS + 1):
                    try:
                        with throttle.chunk() if throttle is not None else nullcontext():
                            loaded = _load_stream(
                                conn, sql, _chunk_source(storage, chunk, job.data_key)
                            )
                        conn.commit()
                        break
                    except pymysql.err.OperationalError as exc:
                        try:
                            conn.rollback()
                        except Exception:  # noqa: BLE001
                            pass
                        # Parallel loads into one table can meet in InnoDB's gap locks; the
                        # server rolled the chunk's transaction back, so it is loaded again.
                        if exc.args[0] not in _RETRYABLE or attempt == CHUNK_DEADLOCK_ATTEMPTS:
                            raise
                    except BaseException:
                        try:
                            conn.rollback()
                        except Exception:  # noqa: BLE001
                            pass
                        raise
                results.put(("done", chunk, loaded))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller's thread
            stop.set()
            results.put(("error", None, exc))
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass

    threads = [
        threading.Thread(target=worker, daemon=True, name="load")
        for _ in range(max(1, min(parallel, len(todo))))
    ]
    for thread in threads:
        thread.start()
    loaded_chunks = rows_loaded = 0
    error: BaseException | None = None
    cancelled = False
    while any(t.is_alive() for t in threads) or not results.empty():
        try:
            kind, chunk, value = results.get(timeout=0.25)
        except queue.Empty:
            if not stop.is_set() and should_cancel():
                cancelled = True
                stop.set()
            continue
        if kind == "note":
            try:
                progress(value)
            except Exception:  # noqa: BLE001 - a progress sink must never break a restore
                pass
            if not stop.is_set() and should_cancel():
                cancelled = True
                stop.set()
            continue
        if kind == "error":
            error = error or value
            continue
        if value != chunk["rows"]:
            error = error or EngineError(
                f"chunk {chunk['key']} loaded {value} rows into {job.target_database}.{job.target_table},"
                f" the manifest says {chunk['rows']}"
            )
            stop.set()
            continue
        loaded_chunks += 1
        rows_loaded += value
        on_chunk_done(chunk["key"], value)
        try:
            progress(
                ProgressEvent(
                    table=table["name"],
                    rows_done=value,
                    bytes_done=chunk.get("raw_bytes", 0),
                    rows_estimate=table.get("rows", 0),
                    stage="load",
                )
            )
        except Exception:  # noqa: BLE001 - a progress sink must never break a restore
            pass
    for thread in threads:
        thread.join()
    if cancelled:
        raise Cancelled(f"load of {job.target_database}.{job.target_table} cancelled")
    if error is not None:
        if isinstance(error, EngineError):
            raise error
        if isinstance(error, pymysql.err.MySQLError):
            raise EngineError(
                f"loading {job.target_database}.{job.target_table} failed: {describe_error(error, job.target)}"
            ) from error
        raise EngineError(
            f"loading {job.target_database}.{job.target_table} failed: {error}"
        ) from error

    conn = _open(job.target, job.target_database)
    try:
        rows, value = checksum.table_checksum(conn, job.target_database, job.target_table, columns)
    except pymysql.err.MySQLError as exc:
        raise EngineError(
            f"checksumming {job.target_database}.{job.target_table} failed: {describe_error(exc, job.target)}"
        ) from exc
    except ODD_ANSWER as exc:  # no row, or a row of the wrong shape
        raise OddAnswer(
            job.target.name, "computing its checksum", f"{job.target_database}.{job.target_table}"
        ) from exc
    finally:
        conn.close()
    expected_rows, expected = int(table.get("rows", 0)), str(table.get("checksum", ""))
    ok = rows == expected_rows and value == expected
    return TableLoadResult(
        target_database=job.target_database,
        target_table=job.target_table,
        rows=rows,
        rows_expected=expected_rows,
        checksum=value,
        checksum_expected=expected,
        checksum_ok=ok,
        chunks_loaded=loaded_chunks,
        chunks_skipped=skipped,
        error=""
        if ok
        else (
            f"checksum mismatch on {job.target_database}.{job.target_table}: {rows} rows / {value},"
            f" expected {expected_rows} rows / {expected}"
        ),
    )
