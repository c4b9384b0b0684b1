"""Prove a backup set restorable: the storage check (A) and the restore drill (T, D).

A drill of an incremental set restores its full set and rolls each shard's scratch
database forward through the chain's binlog (`roll_forward`, supplied by the caller).

Plain Python (no Django, no RQ). Callers pass a storage, keys, a progress callback
and, for drills, where each shard's scratch database goes. Problems name what failed:
`{"object": key, "reason": ...}` or `{"table": "shard/db.table", "reason": ...}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from backups.engine.binlog_apply import ApplyResult
from backups.engine.codec import decode
from backups.engine.errors import Cancelled, IntegrityError
from backups.engine.keys import ManifestKeys
from backups.engine.load import create_database_objects, load_table
from backups.engine.manifest import manifest_key, manifest_objects, manifest_read
from backups.engine.mysql import Endpoint, connect, quote_ident
from backups.engine.throttle import ThreadsRunningGate
from backups.engine.types import CancelFn, ProgressEvent, ProgressFn, TableLoadJob

# roll_forward(shard manifest entry, target endpoint, scratch database) -> what was applied
RollForwardFn = Callable[[dict[str, Any], Endpoint, str], ApplyResult]
DRILL_PREFIX = "__svdrill_"
# Connections a drill loads one table over (it restores one shard and one table at a time).
DRILL_PARALLEL = 2


def _never() -> bool:
    return False


def _quiet(_event: ProgressEvent) -> None:
    return None


@dataclass
class StorageCheck:
    """Outcome of the storage check of one set."""

    objects_total: int = 0
    objects_ok: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def a(self) -> float:
        if self.manifest is None:
            return 0.0
        return self.objects_ok / self.objects_total if self.objects_total else 1.0


@dataclass
class DrillTable:
    label: str  # "shard/db.table"
    rows_expected: int
    rows: int
    checksum_ok: bool
    reason: str = ""


@dataclass
class DrillOutcome:
    tables: list[DrillTable] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    scratch_databases: list[tuple[Endpoint, str]] = field(default_factory=list)
    dropped: bool = False
    rto_seconds: float = 0.0
    rows_total: int = 0
    tables_total: int = 0
    error: str = ""
    # shard name -> what `roll_forward` applied to that shard's scratch database
    rolled_forward: dict[str, ApplyResult] = field(default_factory=dict)

    @property
    def binlog_transactions(self) -> int:
        return sum(r.transactions for r in self.rolled_forward.values())

    @property
    def binlog_events(self) -> int:
        return sum(r.events for r in self.rolled_forward.values())

    @property
    def t(self) -> float:
        if not self.rows_total:
            return 1.0 if not self.error else 0.0
        restored = sum(min(t.rows, t.rows_expected) for t in self.tables if t.checksum_ok)
        return restored / self.rows_total

    @property
    def d(self) -> float:
        if not self.tables_total:
            return 1.0 if not self.error else 0.0
        return sum(1 for t in self.tables if t.checksum_ok) / self.tables_total


def quality(t: float, d: float, a: float) -> float:
    """DESIGN.md: Q = T * D * A, each a fraction in [0, 1]."""
    return round(t * d * a, 6)


def _decodes(key: str) -> bool:
    # Chunks and binlog segments are zstd (and maybe AES-GCM); schema files are plain SQL.
    return key.endswith(".zst") or key.endswith(".zst.enc")


def _drain(stream: Iterable[bytes]) -> int:
    total = 0
    for piece in stream:
        total += len(piece)
    return total


def storage_check(
    storage,
    set_prefix: str,
    *,
    hmac_key: bytes | ManifestKeys,
    data_key: bytes | None,
    progress: ProgressFn = _quiet,
    should_cancel: CancelFn = _never,
    expect_manifest_sha256: str | None = None,
    expect_set_id: int | None = None,
    expect_cluster: str | None = None,
) -> StorageCheck:
    """Read every object of the set once, streamed, and count those that are whole.

    An object counts as available when it is present, its size and sha256 match the
    manifest, and (for chunks and binlog segments) it decrypts and decompresses. The
    manifest's own signature is checked first: without a valid manifest nothing in the
    set can be trusted, so A = 0.
    """
    result = StorageCheck()
    try:
        doc = manifest_read(
            storage,
            set_prefix,
            hmac_key,
            expect_sha256=expect_manifest_sha256,
            expect_set_id=expect_set_id,
            expect_cluster=expect_cluster,
        )
    except Exception as exc:  # missing, unreadable or a bad signature: all say "untrusted"
        result.problems.append({"object": manifest_key(set_prefix), "reason": _reason(exc)})
        return result
    result.manifest = doc
    for obj in manifest_objects(doc):
        if should_cancel():
            raise Cancelled("verification cancelled")
        key = obj["key"]
        result.objects_total += 1
        try:
            stream = storage.get_stream(
                key, expect_sha256=obj.get("sha256"), expect_size=obj.get("stored_bytes")
            )
            if _decodes(key):
                _drain(decode(stream, data_key=data_key, aad=key.encode()))
            else:
                _drain(stream)
        except Cancelled:
            raise
        except Exception as exc:
            result.problems.append({"object": key, "reason": _reason(exc)})
            progress(ProgressEvent(stage="verify", message=f"{key}: {_reason(exc)}"))
            continue
        result.objects_ok += 1
        progress(
            ProgressEvent(
                shard=obj.get("shard", ""),
                table=obj.get("table", ""),
                bytes_done=int(obj.get("stored_bytes") or 0),
                stage="verify",
            )
        )
    return result


def _reason(exc: BaseException) -> str:
    if isinstance(exc, IntegrityError):
        return exc.reason
    if isinstance(exc, FileNotFoundError | KeyError):
        return "missing from storage"
    text = str(exc).strip() or exc.__class__.__name__
    if "not found" in text.lower() or "nosuchkey" in text.lower() or "404" in text:
        return f"missing from storage ({text})"
    return text


# The name backups.services.verification calls.
manifest_object_list = manifest_objects


def drill_database_name(verification_id: int, database: str, shard: str = "") -> str:
    """`__svdrill_<verification id>_<db>` (with the shard when two shards share a name)."""
    name = f"{DRILL_PREFIX}{verification_id}_{database}"
    if shard:
        name = f"{name}_{shard}"
    return name[:64]


def manifest_shards(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc.get("shards") or [])


def drill_run(
    doc: dict[str, Any],
    storage,
    *,
    verification_id: int,
    targets: dict[str, Endpoint],
    data_key: bytes | None,
    progress: ProgressFn = _quiet,
    should_cancel: CancelFn = _never,
    keep_going: bool = True,
    roll_forward: RollForwardFn | None = None,
    throttles: dict[str, ThreadsRunningGate] | None = None,
    parallel: int = DRILL_PARALLEL,
) -> DrillOutcome:
    """Restore every table of the manifest into scratch databases and compare checksums.

    `targets` maps each shard name to the server its scratch database goes to. The
    scratch databases are dropped afterwards whatever happens (failure, cancellation,
    a lost connection). The measured wall time is the RTO for this set's size.

    `roll_forward(shard_entry, target, scratch_database)` (drills of incremental sets)
    is called once a shard's tables are loaded and match the manifest, to apply the
    chain's binlog to the scratch database; what it returns is kept in
    `outcome.rolled_forward`. When it raises, or a table of the shard did not restore
    (so the shard cannot be rolled forward), every table of the shard counts as not
    matching, with the reason.

    `throttles` (by shard name) are the policy's max_threads_running gates of targets that
    serve production: each chunk load waits while its target is busy (and the RTO says so).
    At most `parallel` connections load a table at once (schema, checksum and binlog steps
    use one, in turn), so a drill never holds more than `parallel` on a target.
    """
    outcome = DrillOutcome()
    shards = manifest_shards(doc)
    for shard in shards:
        for table in shard.get("tables") or []:
            outcome.tables_total += 1
            outcome.rows_total += int(table.get("rows") or 0)
    started = time.monotonic()
    used: set[tuple[str, str]] = set()
    try:
        for shard in shards:
            shard_name = shard.get("name", "")
            target = targets[shard_name]
            database = drill_database_name(verification_id, shard.get("database", shard_name))
            if (target.address, database) in used:
                database = drill_database_name(
                    verification_id, shard.get("database", shard_name), shard_name
                )
            used.add((target.address, database))
            # Recorded before creating, so a half-created database is dropped too.
            outcome.scratch_databases.append((target, database))
            _drop_database(target, database)
            progress(
                ProgressEvent(shard=shard_name, stage="schema", message=f"creating {database}")
            )
            create_database_objects(target, database, shard, tables=None)
            first = len(outcome.tables)
            for table in shard.get("tables") or []:
                if should_cancel():
                    raise Cancelled("drill cancelled")
                label = f"{shard_name}/{shard.get('database', '')}.{table.get('name', '')}"
                expected = int(table.get("rows") or 0)
                job = TableLoadJob(
                    manifest_table=table,
                    target=target,
                    target_database=database,
                    target_table=table["name"],
                    data_key=data_key,
                )
                try:
                    loaded = load_table(
                        job,
                        storage,
                        progress=progress,
                        should_cancel=should_cancel,
                        throttle=(throttles or {}).get(shard_name),
                        parallel=parallel,
                    )
                except Cancelled:
                    raise
                except Exception as exc:
                    outcome.tables.append(DrillTable(label, expected, 0, False, _reason(exc)))
                    outcome.problems.append({"table": label, "reason": _reason(exc)})
                    if not keep_going:
                        raise
                    continue
                reason = loaded.error
                if not reason and not loaded.checksum_ok:
                    reason = (
                        f"checksum {loaded.checksum or '-'} does not match the manifest's "
                        f"{loaded.checksum_expected or '-'} ({loaded.rows} of {expected} rows)"
                    )
                ok = loaded.checksum_ok and not loaded.error
                outcome.tables.append(DrillTable(label, expected, loaded.rows, ok, reason))
                if not ok:
                    outcome.problems.append({"table": label, "reason": reason})
            if roll_forward is not None:
                _roll_shard_forward(
                    roll_forward,
                    outcome,
                    outcome.tables[first:],
                    shard,
                    target,
                    database,
                    progress=progress,
                    should_cancel=should_cancel,
                    keep_going=keep_going,
                )
    except Exception as exc:  # cancellation included: the finally drops the scratch databases
        outcome.error = str(exc) or exc.__class__.__name__
        if not any(p.get("reason") == outcome.error for p in outcome.problems):
            outcome.problems.append({"table": "*", "reason": f"drill stopped: {outcome.error}"})
    finally:
        outcome.rto_seconds = time.monotonic() - started
        outcome.dropped = drill_cleanup(outcome.scratch_databases, outcome)
    return outcome


def _roll_shard_forward(
    roll_forward: RollForwardFn,
    outcome: DrillOutcome,
    tables: list[DrillTable],
    shard: dict[str, Any],
    target: Endpoint,
    database: str,
    *,
    progress: ProgressFn,
    should_cancel: CancelFn,
    keep_going: bool,
) -> None:
    shard_name = shard.get("name", "")
    broken = next((t for t in tables if not t.checksum_ok), None)
    if broken is not None:
        _fail_tables(
            outcome,
            tables,
            f"not rolled forward through the binlog: {broken.label} did not restore",
        )
        return
    if should_cancel():
        raise Cancelled("drill cancelled")
    progress(
        ProgressEvent(
            shard=shard_name, stage="binlog", message=f"rolling {database} forward (binlog)"
        )
    )
    try:
        applied = roll_forward(shard, target, database)
    except Cancelled:
        raise
    except Exception as exc:
        _fail_tables(
            outcome, tables, f"rolling forward through the binlog failed: {_apply_reason(exc)}"
        )
        if not keep_going:
            raise
        return
    outcome.rolled_forward[shard_name] = applied


def _apply_reason(exc: BaseException) -> str:
    if isinstance(exc, IntegrityError):
        return f"{exc.key}: {exc.reason}"
    return _reason(exc)


def _fail_tables(outcome: DrillOutcome, tables: list[DrillTable], reason: str) -> None:
    """Every still-matching table of `tables` no longer counts as matching, with `reason`."""
    for table in tables:
        if table.checksum_ok:
            table.checksum_ok = False
            table.reason = reason
            outcome.problems.append({"table": table.label, "reason": reason})


def drill_cleanup(scratch: list[tuple[Endpoint, str]], outcome: DrillOutcome | None = None) -> bool:
    """Drop every scratch database; True when all are gone."""
    ok = True
    for endpoint, database in scratch:
        try:
            _drop_database(endpoint, database)
        except Exception as exc:  # keep dropping the others; say which one is left
            ok = False
            if outcome is not None:
                outcome.problems.append(
                    {"table": f"{database}", "reason": f"scratch database not dropped: {exc}"}
                )
    return ok


def _drop_database(endpoint: Endpoint, database: str) -> None:
    if not database.startswith(DRILL_PREFIX):
        raise ValueError(f"refusing to drop {database}: not a drill scratch database")
    conn = connect(endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")
    finally:
        conn.close()
