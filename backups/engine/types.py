"""The engine's contract: plain data in, plain data out (no Django, no RQ).

Services build these from models, call the engine entry points, and persist
the results. The entry points are:

* `backups.engine.dump.dump_cluster(spec, storage, *, progress, should_cancel) -> BackupResult`
  (full backups; writes chunks, schema files and the signed manifest)
* `backups.engine.load.load_table(job, storage, *, progress, should_cancel, ...) -> TableLoadResult`
  and `backups.engine.load.create_database_objects(...)` (restores, drills)
* `backups.engine.manifest.read_manifest(storage, set_prefix, hmac_key) -> dict`
  (verifies the signature)
* `backups.engine.capture.capture_instance(...)` (incrementals, issue 5)

Storage keys are relative to the STORAGE_URL prefix: `<cluster>/<set-id>/...`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from backups.engine.keys import ManifestKeys
from backups.engine.mysql import Endpoint


@dataclass(frozen=True)
class ShardSpec:
    name: str
    instance: str  # instance name
    database: str
    endpoint: Endpoint
    # Physical table names to back up; None means every base table of the database.
    tables: list[str] | None = None


@dataclass(frozen=True)
class BackupSpec:
    cluster: str
    set_id: int
    set_prefix: str  # "<cluster>/<set-id>", relative to the storage prefix
    shards: list[ShardSpec]
    consistency: str = "locked"  # or "lockfree", or "cold" (lock held for the whole dump)
    compression_level: int = 1
    data_key: bytes | None = None  # None: no encryption
    key_id: str = ""
    wrapped_key: str = ""
    manifest_hmac_key: bytes | ManifestKeys = b""  # ManifestKeys: signs with its key id
    connections_per_instance: int = 4
    chunk_rows: int = 200_000
    lock_wait_timeout: int = 2
    lock_retries: int = 5
    topology: dict[str, Any] = field(default_factory=dict)  # snapshot written into the manifest
    started_by: str = ""
    # Policy `exclude_tables`: "database.table" globs never dumped (listed in the manifest).
    exclude_tables: tuple[str, ...] = ()
    # Policy `max_threads_running`: new chunks wait while an instance is busier; 0 = off.
    max_threads_running: int = 0


@dataclass
class ProgressEvent:
    """Sent by the engine through `progress(event)`; callers throttle their own writes."""

    shard: str = ""
    table: str = ""
    rows_done: int = 0  # increments since the previous event for this table
    bytes_done: int = 0
    rows_estimate: int = 0
    stage: str = ""  # "locking", "snapshot", "schema", "dump", "checksum", "manifest", "load"
    message: str = ""
    chunk: dict[str, Any] | None = None  # a finished chunk's manifest entry, when one is stored
    # The instance a "throttle" event is about; its message is the pause line, "" on resume.
    instance: str = ""
    # "lock" events of a cold dump: instance -> thread id of the connection holding the
    # global read lock there ({} once released); None on every other event.
    lock_sessions: dict[str, int] | None = None


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


@dataclass
class ChunkResult:
    index: int
    key: str
    rows: int
    raw_bytes: int
    stored_bytes: int
    sha256: str


@dataclass
class TableResult:
    database: str
    name: str
    engine: str
    has_primary_key: bool
    rows: int
    raw_bytes: int
    stored_bytes: int
    checksum: str
    chunks: list[ChunkResult]
    error: str = ""


@dataclass
class ShardResult:
    name: str
    instance: str
    database: str
    binlog_file: str
    binlog_pos: int | None
    gtid: str
    snapshot_at: datetime | None
    tables: list[TableResult]
    error: str = ""


@dataclass
class BackupResult:
    ok: bool
    shards: list[ShardResult]
    lock_window_ms: float | None
    consistent_at: datetime | None
    manifest_key: str = ""
    manifest_sha256: str = ""
    rows: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    error: str = ""
    excluded: list[str] = field(default_factory=list)  # "database.table" the policy kept out
    notes: list[str] = field(default_factory=list)  # e.g. non-InnoDB tables a cold set copied
    physical: list[dict[str, Any]] = field(default_factory=list)  # a physical set's objects


@dataclass(frozen=True)
class TableLoadJob:
    """Load one table of a manifest into `target_database`.`target_table`."""

    manifest_table: dict[str, Any]  # the table's entry from the manifest
    target: Endpoint
    target_database: str
    target_table: str
    data_key: bytes | None = None


@dataclass
class TableLoadResult:
    target_database: str
    target_table: str
    rows: int
    rows_expected: int
    checksum: str
    checksum_expected: str
    checksum_ok: bool
    chunks_loaded: int = 0
    chunks_skipped: int = 0
    error: str = ""
