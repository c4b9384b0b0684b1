"""Apply captured binlog segments to one restored database, up to a point in time.

Plain Python (no Django). The server's own decoder does the row work:

    segment (decoded bytes) -> [Python, event headers only: keep whole transactions
    of the source database after the applied position and committed at or before
    `until`; keep only the scoped tables' statements, table maps renamed; GTID event
    -> BEGIN; a Query event recording the position before each commit]
    -> mariadb-binlog [--rewrite-db=SRC->DST] - | mariadb DST

* Transaction-aware: a transaction is kept or dropped whole, judged by the time
  of its commit event (binlog time is whole seconds, so `until` is floored to
  its second and every transaction committed in that second is applied).
* Idempotent: the last applied (file, pos) is kept in `__shardvault_applied`
  in the target database, written inside each applied transaction, so a crash
  at any point and a rerun converge to the same rows. (A DDL statement commits
  by itself; its position is written right after it.)
* The source's GTIDs and server id are never replayed into the target's binlog.
* DDL in the window is applied in order, never skipped: `binlog_select.Scope` reads
  each statement's tables with a tokenizer (`backups.engine.ddl`), resolving unqualified
  names with the event's default database, and rewrites every in-scope name to the
  target's qualified name (so it never runs against the source, whatever database the
  session had). What cannot be redirected safely is refused with `ScopeError`, naming
  the statement, its position and GTID, and a stop point before it.
* Stops at `until` (a time) or `stop_at` (a position), and reports where it stopped.
* Memory stays bounded: a transaction past SPOOL_BYTES spills to a temporary file
  (`backups.engine.binlog_select` chooses what is applied; this module applies it).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime

from backups.engine.binlog_events import (
    BINLOG_MAGIC,
    HEADER_LEN,
    QUERY_EVENT,
    coordinate_key,
    gtid_of,
    parse_header,
)
from backups.engine.binlog_select import (
    Scope,
    ScopeError,
    Transactions,
    plan_statements,
    scoped_events,
)
from backups.engine.errors import Cancelled, EngineError
from backups.engine.mysql import (
    Endpoint,
    connect,
    control_character_refusal,
    endpoint_refusal,
    quote_ident,
    quote_qualified,
)
from backups.engine.throttle import ThreadsRunningGate
from backups.engine.types import CancelFn, ProgressEvent, ProgressFn

APPLIED_TABLE = "__shardvault_applied"


@dataclass
class SegmentSource:
    """One captured segment: its manifest entry and how to read its decoded bytes."""

    entry: dict
    open: Callable[[], Iterable[bytes]]


@dataclass
class ApplyResult:
    transactions: int = 0
    events: int = 0
    skipped_applied: int = 0
    last_file: str = ""
    last_pos: int = 0
    last_event_at: datetime | None = None
    reached_until: bool = False
    # Where the apply stopped: the end of the last transaction at or before the stop point
    # (applied, or not in scope), its GTID and commit time; the first transaction left out.
    stop_file: str = ""
    stop_pos: int = 0
    stop_gtid: str = ""
    stop_event_at: datetime | None = None
    next_gtid: str = ""
    next_event_at: datetime | None = None
    # The end of the last segment given: the apply had the binlog up to here.
    covered_file: str = ""
    covered_pos: int = 0

    def stopped(self, file: str, pos: int, gtid: str, commit_ts: int) -> None:
        self.stop_file, self.stop_pos, self.stop_gtid = file, pos, gtid
        self.stop_event_at = datetime.fromtimestamp(commit_ts, UTC)


def tools_available() -> bool:
    return bool(shutil.which("mariadb-binlog") and shutil.which("mariadb"))


def applied_position(endpoint: Endpoint, database: str, stream: str) -> tuple[str, int] | None:
    """The (file, pos) last applied to `database` from `stream`, or None."""
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {quote_ident(APPLIED_TABLE)} ("
                " stream VARCHAR(191) NOT NULL PRIMARY KEY,"
                " binlog_file VARCHAR(255) NOT NULL, binlog_pos BIGINT NOT NULL,"
                " event_at BIGINT NOT NULL DEFAULT 0) ENGINE=InnoDB"
            )
            cur.execute(
                f"SELECT binlog_file, binlog_pos FROM {quote_ident(APPLIED_TABLE)} WHERE stream = %s",  # noqa: S608 - quoted identifier
                (stream,),
            )
            row = cur.fetchone()
            return (row[0], int(row[1])) if row else None
    finally:
        conn.close()


def applied_marker_drop(endpoint: Endpoint, database: str) -> None:
    """Drop the position table once a restore is finished and verified."""
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {quote_ident(APPLIED_TABLE)}")
    finally:
        conn.close()


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _has_crc(fde: bytes) -> bool:
    """Whether events carry a CRC32: the format description's checksum algorithm byte."""
    return len(fde) > 5 and fde[-5] == 1


def apply_segments(
    *,
    target: Endpoint,
    source_database: str,
    target_database: str,
    stream: str,
    segments: list[SegmentSource],
    start_file: str,
    start_pos: int,
    until: datetime | None,
    tables: dict[str, str] | None = None,
    whole_database: bool = False,
    stop_at: tuple[str, int] | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    crash_after_transactions: int | None = None,
    excluded: Iterable[str] = (),
    throttle: ThreadsRunningGate | None = None,
) -> ApplyResult:
    """Apply every transaction of `source_database` after (start_file, start_pos) up to `until`.

    `tables` maps the restored source tables to their target names (None: every table of
    the database, same names); `whole_database` also applies tables the window creates;
    `excluded` names tables the set's policy excluded, whose events are never applied.
    `stop_at` (file, pos) stops before the first transaction that ends past it (with
    `until`, whichever comes first). `throttle` (the target's max_threads_running gate)
    holds each next segment back while the target is busy. `stream` names the source (the
    instance) in the position table. Segments must be in binlog order.
    `crash_after_transactions` exists for tests: the apply is cut off (mariadb killed
    mid-stream) after that many transactions were sent. Returns what was applied and where
    it stopped; raises `EngineError` with mariadb's message on failure, `ScopeError` naming
    a statement that cannot be applied (with its position and GTID, to stop before it).
    """
    refusal = apply_refusal(target, source_database, target_database)
    if refusal:
        raise EngineError(refusal)
    if not tools_available():
        raise EngineError(
            "mariadb-binlog and mariadb must be installed on the worker to apply binlogs"
        )
    result = ApplyResult()
    until_ts = int(until.timestamp()) if until else None
    applied = applied_position(target, target_database, stream)
    resume = coordinate_key(start_file, start_pos)
    if applied and coordinate_key(*applied) > resume:
        resume = coordinate_key(*applied)
    stop_key = coordinate_key(*stop_at) if stop_at else None
    result.stop_file, result.stop_pos = resume[1], resume[2]
    scope = Scope(source_database, target_database, tables, excluded, whole_database=whole_database)
    sent = 0
    for source in segments:
        entry = source.entry
        file = entry["first_file"]
        result.covered_file = entry.get("last_file") or file
        result.covered_pos = int(entry["last_pos"])
        if coordinate_key(file, int(entry["last_pos"])) <= resume:
            result.skipped_applied += 1
            continue
        if stop_key is not None and coordinate_key(file, int(entry["first_pos"])) >= stop_key:
            result.reached_until = True
            break
        if should_cancel and should_cancel():
            raise Cancelled("cancelled while applying binlogs")
        if throttle is not None and not throttle.wait(
            stopped=should_cancel or (lambda: False), report=progress or (lambda event: None)
        ):
            raise Cancelled("cancelled while applying binlogs")
        with throttle.chunk() if throttle is not None else nullcontext():
            outcome = _apply_one(
                target=target,
                scope=scope,
                stream=stream,
                file=file,
                blocks=source.open(),
                resume=resume,
                until_ts=until_ts,
                stop_key=stop_key,
                result=result,
                crash_after=(crash_after_transactions - sent) if crash_after_transactions else None,
            )
        sent += outcome
        if progress:
            progress(
                ProgressEvent(
                    stage="binlog",
                    shard=stream,
                    message=f"applied {file} up to {result.last_pos}",
                )
            )
        if result.reached_until:
            break
    return result


def _query_event(like: bytes, query: bytes, checksum: bool) -> bytes:
    """A Query event carrying `query`, with the timestamp, server id and position of `like`."""
    header = parse_header(like)
    post = struct.pack("<IIBHH", 0, 0, 0, 0, 0)  # thread, exec time, no db, no error, no vars
    body = post + b"\x00" + query
    size = HEADER_LEN + len(body) + (4 if checksum else 0)
    event = (
        struct.pack(
            "<IBIIIH", header.timestamp, QUERY_EVENT, header.server_id, size, header.next_pos, 0
        )
        + body
    )
    if checksum:
        event += zlib.crc32(event).to_bytes(4, "little")
    return event


def apply_refusal(target: Endpoint, source_database: str, target_database: str) -> str | None:
    """Why binlogs cannot be applied from `source_database` to `target` / `target_database`,
    or None. Checked before anything runs:

    * every connection field goes into the client's option file, where a newline would add
      options of its own: hosts must be host names or IP addresses, no field may hold a
      control character;
    * mariadb-binlog's `--rewrite-db=FROM->TO` has no escaping, so a database name that
      contains `->` (or a control character) would be split in the wrong place.
    """
    problem = endpoint_refusal(target)
    if problem:
        return f"refusing to apply binlogs to {target.name}: {problem}"
    return rewrite_db_refusal(source_database, target_database)


def rewrite_db_refusal(source_database: str, target_database: str) -> str | None:
    """Why binlogs of `source_database` cannot be rolled forward into `target_database`
    (mariadb-binlog's `--rewrite-db=FROM->TO` has no escaping), or None. The restore plan
    asks this when a request is filed; the apply asks it again before running anything."""
    if source_database != target_database:
        for name in (source_database, target_database):
            if "->" in name or control_character_refusal(name, "database name"):
                return (
                    f"cannot apply binlogs from database '{source_database}' to "
                    f"'{target_database}': a database name containing '->' or a control "
                    "character cannot be given to mariadb-binlog's --rewrite-db unambiguously; "
                    "rename the database or restore it in place"
                )
    return None


# Client auth plugins the mariadb client may load: the ones that never send the password
# itself. mysql_clear_password and dialog are left out, so a server that asks for them gets
# "plugin could not be loaded" instead of the password (the client has no switch for this).
SAFE_CLIENT_PLUGINS = (
    "caching_sha2_password.so",
    "client_ed25519.so",
    "sha256_password.so",
    "auth_gssapi_client.so",
    "parsec.so",
)
CLIENT_PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu/libmariadb3/plugin",
    "/usr/lib/aarch64-linux-gnu/libmariadb3/plugin",
    "/usr/lib64/mariadb/plugin",
    "/usr/lib/mysql/plugin",
    "/usr/local/mysql/lib/plugin",
)


def client_plugin_dir(tmp: str) -> str:
    """A plugin directory under `tmp` holding links to the safe client auth plugins only."""
    path = os.path.join(tmp, "client-plugins")
    os.makedirs(path, exist_ok=True)
    for directory in CLIENT_PLUGIN_DIRS:
        for name in SAFE_CLIENT_PLUGINS:
            source, link = os.path.join(directory, name), os.path.join(path, name)
            if os.path.isfile(source) and not os.path.lexists(link):
                os.symlink(source, link)
    return path


def client_command(target: Endpoint, tmp: str, database: str) -> list[str]:
    """The `mariadb` client command that runs SQL from stdin in `database` on `target`: the
    connection in an option file under `tmp` (mode 0600, every value quoted), only the safe
    auth plugins loadable, LOAD DATA LOCAL off."""
    defaults = os.path.join(tmp, "client.cnf")
    with open(os.open(defaults, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
        handle.write(
            "[client]\n"
            f"host={_option_value(target.host)}\nport={int(target.port)}\n"
            f"user={_option_value(target.user)}\n"
            f"password={_option_value(target.password or '')}\n"
        )
        if target.tls_ca:
            handle.write(f"ssl-ca={_option_value(target.tls_ca)}\n")
    return [
        "mariadb",
        f"--defaults-extra-file={defaults}",
        f"--plugin-dir={client_plugin_dir(tmp)}",
        "--local-infile=0",
        "--binary-mode",
        "--batch",
        "--silent",
        database,
    ]


def _option_value(value: str) -> str:
    """One option-file value, double-quoted (backslash and quote escaped). Callers have refused
    control characters already (`apply_refusal`), so the value stays on its own line."""
    if control_character_refusal(value, "value"):
        raise EngineError("an option-file value cannot contain a control character")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _apply_one(
    *,
    target: Endpoint,
    scope: Scope,
    stream: str,
    file: str,
    blocks: Iterable[bytes],
    resume: tuple,
    until_ts: int | None,
    result: ApplyResult,
    crash_after: int | None,
    stop_key: tuple | None = None,
) -> int:
    """Apply one segment; returns the number of transactions sent to the server.

    Each kept transaction reaches mariadb-binlog with its GTID event replaced by a BEGIN
    (so the source's GTIDs and server id are never replayed into the target's binlog) and
    a Query event recording its end position just before its commit; the decoder's SQL
    goes straight into the client, with no Python in between.
    """
    source_database, target_database = scope.source, scope.target
    transactions = Transactions(blocks)
    table = quote_qualified(target_database, APPLIED_TABLE)
    stream_sql, file_sql = _sql_string(stream), _sql_string(file)

    def marker(pos: int) -> bytes:
        return (
            f"INSERT INTO {table} (stream, binlog_file, binlog_pos) VALUES "  # noqa: S608 - quoted identifier, escaped literals
            f"({stream_sql}, {file_sql}, {pos}) ON DUPLICATE KEY UPDATE "
            "binlog_file = VALUES(binlog_file), binlog_pos = VALUES(binlog_pos)"
        ).encode()

    with tempfile.TemporaryDirectory(prefix="shardvault-apply-") as tmp:
        # Both tools' stderr go to files: an unread pipe could fill and stall the feed.
        decoder_err_file = open(os.path.join(tmp, "decoder.err"), "w+b")
        client_err = open(os.path.join(tmp, "client.err"), "w+b")
        decoder = subprocess.Popen(
            [
                "mariadb-binlog",
                "--no-defaults",
                *(
                    [f"--rewrite-db={source_database}->{target_database}"]
                    if source_database != target_database
                    else []
                ),
                "--skip-annotate-row-events",
                "-",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=decoder_err_file,
        )
        client = subprocess.Popen(
            client_command(target, tmp, target_database),
            stdin=decoder.stdout,
            stdout=subprocess.DEVNULL,
            stderr=client_err,
        )
        decoder.stdout.close()  # the client owns the pipe now
        state: dict = {"sent": 0, "error": None, "crashed": False}

        def feed() -> None:
            try:
                out = decoder.stdin
                header_written = False
                for group, end_pos, commit_ts, dbs, standalone in transactions:
                    fde = transactions.fde or b""
                    if not header_written:
                        out.write(BINLOG_MAGIC + fde)
                        header_written = True
                    gtid = gtid_of(group.first, parse_header(group.first).server_id)[0]
                    if coordinate_key(file, end_pos) <= resume:
                        result.skipped_applied += 1
                        result.stopped(file, end_pos, gtid, commit_ts)
                        continue
                    if (stop_key is not None and coordinate_key(file, end_pos) > stop_key) or (
                        until_ts is not None and commit_ts > until_ts
                    ):
                        result.reached_until = True
                        result.next_gtid = gtid
                        result.next_event_at = datetime.fromtimestamp(commit_ts, UTC)
                        break
                    result.stopped(file, end_pos, gtid, commit_ts)
                    # A DDL is judged by what it names, whatever its default database was.
                    if not standalone and source_database not in dbs and "*" not in dbs:
                        continue
                    crc = _has_crc(fde)
                    post = transactions.table_map_post
                    try:
                        decisions = plan_statements(group, scope, post, crc)
                    except ScopeError as exc:
                        first = parse_header(group.first)
                        start_pos = first.next_pos - first.size
                        at = datetime.fromtimestamp(commit_ts, UTC).isoformat()
                        raise ScopeError(
                            f"{exc} (binlog {stream}:{file}:{start_pos}, GTID {gtid}, "
                            f"committed {at}); restore to a point before it: "
                            f"--before-gtid {gtid} or --until {stream}:{file}:{start_pos}",
                            statement=exc.statement,
                        ) from exc
                    if decisions is None:
                        continue
                    cut = crash_after is not None and state["sent"] >= crash_after
                    last = group.last
                    if not standalone:
                        out.write(_query_event(group.first, b"BEGIN", crc))
                    written = 0
                    for event in scoped_events(group, decisions, scope, post, crc):
                        if cut and written >= max(1, group.count // 2):
                            break
                        out.write(event)
                        written += 1
                    if cut:
                        # Test hook: half a transaction reached the server; the apply stops here.
                        state["crashed"] = True
                        break
                    if standalone:
                        # A DDL: its statement (as rewritten for the target), then its
                        # position (a DDL commits by itself).
                        rewritten = decisions[-1] if decisions else None
                        out.write(rewritten if isinstance(rewritten, bytes) else last)
                        out.write(_query_event(last, marker(end_pos), crc))
                    else:
                        out.write(_query_event(last, marker(end_pos), crc))
                        out.write(last)
                    group.close()
                    state["sent"] += 1
                    result.transactions += 1
                    result.events += group.count
                    result.last_file, result.last_pos = file, end_pos
                    result.last_event_at = datetime.fromtimestamp(commit_ts, UTC)
                if not header_written and transactions.fde:
                    out.write(BINLOG_MAGIC + transactions.fde)
            except BrokenPipeError:
                pass
            except BaseException as exc:  # noqa: BLE001 - raised once both tools have exited
                state["error"] = exc
            finally:
                try:
                    decoder.stdin.close()
                except BrokenPipeError:
                    pass

        feed()
        decoder.wait()
        client.wait()
        decoder_err = _read_closed(decoder_err_file)
        message = _read_closed(client_err)
        if state["error"] is not None:
            raise state["error"]
        if state["crashed"]:
            raise EngineError("apply cut off (test hook)")
        if client.returncode != 0:
            last_line = (
                message.splitlines()[-1] if message else f"mariadb exited with {client.returncode}"
            )
            raise EngineError(f"applying {file} to {target_database} failed: {last_line}")
        if decoder.returncode != 0:
            raise EngineError(f"mariadb-binlog could not decode {file}: {decoder_err[:300]}")
        return state["sent"]


def _read_closed(handle) -> str:
    """What a subprocess wrote to `handle` (a temporary file), as text; closes it."""
    handle.seek(0)
    text = handle.read().decode("utf-8", "replace").strip()
    handle.close()
    return text
