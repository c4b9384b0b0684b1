"""Physical full sets (mariabackup), one part per instance.

`physical_backup_run(spec, shard_backups, storage, tracker)` is the physical branch of
`full_backups.backup_execute`: after the shared reachability preflight and connection
slots, it checks each instance for physical backups (mariabackup on this worker, its
version, the user's privileges, a readable datadir: one sentence per missing piece), then
streams every instance in turn into `<set>/physical/<instance>/backup.mbstream.zst[.enc]`
and writes the signed manifest listing those objects and each instance's binlog
coordinates. Its `BackupResult` carries each shard's coordinates (those of its instance),
so incrementals chain onto a physical set exactly as onto a logical one.

A failure or cancel deletes what was stored (the finish transitions do so for the whole
set prefix; the engine removes a half-written object itself).
"""

from __future__ import annotations

from datetime import UTC, datetime

from backups.engine.errors import EngineError
from backups.engine.manifest import manifest_document, manifest_encryption, manifest_write
from backups.engine.physical import (
    PhysicalPart,
    PhysicalResult,
    physical_backup,
    physical_key,
    physical_preflight,
)
from backups.engine.types import BackupResult, BackupSpec, ShardResult
from backups.services.backup_spec import PreflightRefused
from backups.storage.base import key_part

PATH_ENV = "SHARDVAULT_MARIABACKUP_PATH"


def physical_search_path() -> str | None:
    """Where this worker looks for mariabackup/mbstream: SHARDVAULT_MARIABACKUP_PATH when
    set (a PATH-like list), else the process's PATH."""
    import os

    return os.environ.get(PATH_ENV) or None


def physical_preflight_set(*, spec: BackupSpec, datadirs: dict[str, str]) -> None:
    """PreflightRefused naming every missing piece, per shard, before anything is copied."""
    endpoints = {}
    for shard in spec.shards:
        endpoints.setdefault(shard.instance, shard.endpoint)
    by_instance: dict[str, list[str]] = {}
    for instance, endpoint in endpoints.items():
        problems = physical_preflight(
            endpoint, datadirs.get(instance, ""), search_path=physical_search_path()
        )
        if problems:
            by_instance[instance] = problems
    if not by_instance:
        return
    shard_errors = {
        shard.name: " ".join(p.rstrip(".") + "." for p in by_instance[shard.instance])
        for shard in spec.shards
        if shard.instance in by_instance
    }
    sentences = [p.rstrip(".") + "." for problems in by_instance.values() for p in problems]
    raise PreflightRefused(
        "physical backup refused: " + " ".join(sentences), shard_errors=shard_errors
    )


def physical_backup_run(
    *, spec: BackupSpec, datadirs: dict[str, str], storage, progress, should_cancel
) -> BackupResult:
    """Copy every instance of `spec` with mariabackup, then write the manifest.

    Raises PreflightRefused (nothing copied), EngineError (a part failed: the caller fails
    the set, which deletes its objects) or Cancelled.
    """
    physical_preflight_set(spec=spec, datadirs=datadirs)
    created_at = datetime.now(UTC)
    instances: list[str] = []
    endpoints = {}
    for shard in spec.shards:
        if shard.instance not in endpoints:
            instances.append(shard.instance)
            endpoints[shard.instance] = shard.endpoint
    results: dict[str, PhysicalResult] = {}
    for instance in instances:
        part = PhysicalPart(
            instance=instance,
            endpoint=endpoints[instance],
            datadir=datadirs[instance],
            key=physical_key(spec.set_prefix, key_part(instance), spec.data_key is not None),
            compression_level=spec.compression_level,
            data_key=spec.data_key,
            search_path=physical_search_path(),
        )
        results[instance] = physical_backup(
            part, storage, progress=progress, should_cancel=should_cancel
        )
    consistent_at = max(r.finished_at for r in results.values())
    shards = [
        ShardResult(
            name=shard.name,
            instance=shard.instance,
            database=shard.database,
            binlog_file=results[shard.instance].binlog_file,
            binlog_pos=results[shard.instance].binlog_pos,
            gtid=results[shard.instance].gtid,
            snapshot_at=results[shard.instance].finished_at,
            tables=[],
        )
        for shard in spec.shards
    ]
    raw = sum(r.raw_bytes for r in results.values())
    stored = sum(r.stored_bytes for r in results.values())
    doc = manifest_document(
        cluster=spec.cluster,
        set_id=spec.set_id,
        kind="full",
        parent=None,
        consistency=spec.consistency,
        created_at=created_at.isoformat(),
        consistent_at=consistent_at.isoformat(),
        compression_level=spec.compression_level,
        encryption=(
            manifest_encryption(key_id=spec.key_id, wrapped_key=spec.wrapped_key)
            if spec.data_key is not None
            else None
        ),
        shards=[
            {
                "name": s.name,
                "instance": s.instance,
                "database": s.database,
                "binlog_file": s.binlog_file,
                "binlog_pos": s.binlog_pos,
                "gtid": s.gtid,
                "snapshot_at": s.snapshot_at.isoformat() if s.snapshot_at else None,
                "tables": [],
            }
            for s in shards
        ],
        binlog=[],
        totals={"rows": 0, "raw_bytes": raw, "stored_bytes": stored},
        method="physical",
        lock_window_ms=None,
        started_by=spec.started_by,
        topology=spec.topology,
        physical=[
            {
                "instance": r.instance,
                "key": r.key,
                "sha256": r.sha256,
                "stored_bytes": r.stored_bytes,
                "raw_bytes": r.raw_bytes,
                "binlog_file": r.binlog_file,
                "binlog_pos": r.binlog_pos,
                "gtid": r.gtid,
                "datadir": datadirs[r.instance],
                "tool": "mariabackup",
                "tool_version": r.tool_version,
                "started_at": r.started_at.isoformat(),
                "finished_at": r.finished_at.isoformat(),
                "seconds": round(r.seconds, 3),
            }
            for r in results.values()
        ],
        # No per-table checksums: mariabackup's consistent point is inside its own
        # BLOCK_COMMIT stage, where no snapshot of ours can be opened. Drills rest on
        # CHECK TABLE and row counts (verification says so).
        checksums=None,
    )
    try:
        stored_manifest = manifest_write(storage, spec.set_prefix, doc, spec.manifest_hmac_key)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"storage write failed for the manifest: {exc}") from exc
    return BackupResult(
        ok=True,
        shards=shards,
        lock_window_ms=None,
        consistent_at=consistent_at,
        manifest_key=stored_manifest.key,
        manifest_sha256=stored_manifest.sha256,
        rows=0,
        raw_bytes=raw,
        stored_bytes=stored,
    )
