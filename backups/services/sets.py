"""A backup set's record, storage, data key, manifest and finish: what full and incremental
sets share, and the one place that binds a set to settings.

* `backup_set_record(...)` records a new set (full or incremental) and queues its job;
  `busy_reason(cluster)` says why a new set cannot start; `lock_set(pk)` locks a set row.
* `set_storage`, `set_prefix`, `set_data_key`, `set_manifest`: where a set's objects live
  and how to read them (backups, incrementals, restores and verification all use these).
* `backup_set_finish_failed` / `_cancelled` / `_succeeded`: the end transitions of a
  running set (a failed or cancelled set's objects are deleted: never a usable backup).
* `backup_set_expire` and `backup_set_delete_check`: retention, refused while a later set
  of the chain depends on the set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backups import queue
from backups.engine.errors import EngineError
from backups.engine.manifest import manifest_read
from backups.models import BackupSet, Chunk, PhysicalObject, ShardBackup, TableBackup
from backups.services.alerts import alert_backup_failed
from backups.services.errors import BackupError, ChainError, RestoreError
from backups.status import PartStatus, SetStatus
from backups.storage import Storage, storage_from_url
from console.audit import audit_record
from console.keys import data_key_new, data_key_unwrap, manifest_hmac_key
from console.roles import ADMIN, OPERATOR, require_role
from shards.models import Cluster

log = logging.getLogger(__name__)

WORKER_ACTOR = "worker"
HOUSEKEEPING_ACTOR = "housekeeping"


def set_job_id(set_id: int) -> str:
    """The id of a set's job on `backups` (full and incremental alike)."""
    return f"backup-{set_id}"


def backup_authorise(actor) -> None:
    """Users need operator or admin; a plain string is a system actor (cli, scheduler)."""
    if hasattr(actor, "pk"):
        require_role(actor, OPERATOR, ADMIN, action="run backups")
    elif not isinstance(actor, str) or not actor:
        raise BackupError("a backup needs an actor (a user or a system name)")


def lock_set(pk: int) -> BackupSet:
    """The set's row, locked until the end of the current transaction."""
    return BackupSet.objects.select_for_update().get(pk=pk)


def storage_for_url(url: str) -> Storage:
    """The backend for a storage URL, with the configured S3 endpoint (StorageError if bad)."""
    return storage_from_url(url, endpoint_url=settings.S3_ENDPOINT_URL)


def default_storage() -> Storage:
    """The storage configured by STORAGE_URL: where new sets are written."""
    return storage_for_url(settings.STORAGE_URL)


def set_storage(backup_set: BackupSet) -> Storage:
    """Where `backup_set` was written."""
    return storage_for_url(backup_set.storage_url) if backup_set.storage_url else default_storage()


def set_prefix(backup_set: BackupSet) -> str:
    """`<cluster>/<set-id>`: the set's objects, relative to its storage's prefix."""
    return backup_set.object_prefix or f"{backup_set.cluster.name}/{backup_set.pk}"


def set_data_key(backup_set: BackupSet) -> bytes | None:
    """The set's data key, None when it is not encrypted; EngineError when it cannot be opened."""
    if not backup_set.encrypted:
        return None
    return data_key_unwrap(backup_set.wrapped_key)


def set_data_key_create(backup_set: BackupSet) -> None:
    """A new data key for `backup_set`, wrapped under the master key; BackupError if unusable."""
    try:
        fresh = data_key_new()
    except EngineError as exc:
        raise BackupError(f"the set cannot be encrypted: {exc}") from None
    backup_set.wrapped_key = fresh.wrapped_key
    backup_set.key_id = fresh.key_id


def set_manifest_binding(backup_set: BackupSet) -> dict:
    """What the set's manifest must be: the sha256 recorded when it was written (sets from
    before that was recorded have none), and this set's own id and cluster."""
    return {
        "expect_sha256": backup_set.manifest_sha256 or None,
        "expect_set_id": backup_set.pk,
        "expect_cluster": backup_set.cluster.name,
    }


def set_manifest(backup_set: BackupSet, storage: Storage | None = None) -> dict:
    """The set's manifest, its signature checked; RestoreError when it cannot be read."""
    storage = storage or set_storage(backup_set)
    try:
        return manifest_read(
            storage, set_prefix(backup_set), manifest_hmac_key(), **set_manifest_binding(backup_set)
        )
    except Exception as exc:  # noqa: BLE001 - any failure here means: cannot restore from it
        raise RestoreError(
            f"the manifest of backup set {backup_set.pk} cannot be read: {exc}"
        ) from exc


# ------------------------------------------------------------------------------ record


def busy_reason(cluster: Cluster) -> str:
    """Why a new set of `cluster` cannot start now ("" when none is pending or running)."""
    active = (
        BackupSet.objects.filter(cluster=cluster, status__in=SetStatus.ACTIVE)
        .order_by("id")
        .first()
    )
    if active is None:
        return ""
    return (
        f"cluster {cluster.name} is already being backed up "
        f"(set {active.pk} is {active.status}); wait for it to finish or cancel it"
    )


def backup_set_record(
    *,
    cluster: Cluster,
    shards,
    actor,
    refused: str,
    enqueue: bool,
    shard_fields: Callable[[Any], dict],
    details: dict,
    **fields,
) -> BackupSet:
    """Record a new set (full or incremental) with one ShardBackup per shard, and its audit event.

    Call inside the transaction holding the cluster's row lock. A `refused` set is recorded
    `failed` with that reason; otherwise `pending`, queued after commit when `enqueue`.
    `fields` are the set's own columns (kind, consistency, ...), `shard_fields(shard)` the
    extra columns of each shard's row.
    """
    backup_set = BackupSet.objects.create(
        cluster=cluster,
        storage_url=settings.STORAGE_URL,
        triggered_by=actor if hasattr(actor, "pk") else None,
        status=SetStatus.FAILED if refused else SetStatus.PENDING,
        error=refused,
        **fields,
    )
    backup_set.object_prefix = f"{cluster.name}/{backup_set.pk}"
    backup_set.job_id = "" if refused else set_job_id(backup_set.pk)
    if refused:
        backup_set.finished_at = timezone.now()
    elif backup_set.encrypted:
        set_data_key_create(backup_set)
    backup_set.save()
    ShardBackup.objects.bulk_create(
        ShardBackup(
            backup_set=backup_set,
            shard=shard,
            shard_name=shard.name,
            instance_name=shard.instance.name,
            database=shard.database,
            status=backup_set.status,
            **shard_fields(shard),
        )
        for shard in shards
    )
    audit_record(
        actor=actor,
        action="backup.refused" if refused else "backup.start",
        obj=backup_set,
        details={
            "cluster": cluster.name,
            "kind": backup_set.kind,
            **details,
            **({"error": refused} if refused else {}),
        },
    )
    if not refused and enqueue:
        set_id, kind = backup_set.pk, backup_set.kind
        transaction.on_commit(lambda: _enqueue(set_id, kind))
    return backup_set


def _enqueue(set_id: int, kind: str) -> None:
    """Queue the set's job on `backups` and arm the periodic jobs (whose reaper fails the set
    if its worker dies); when Redis is down, fail the set saying so instead."""
    incremental = kind == BackupSet.Kind.INCREMENTAL
    try:
        queue.enqueue(
            "backups.jobs.incrementals.run_incremental_job"
            if incremental
            else "backups.jobs.backups.run_backup_job",
            set_id,
            queue=queue.BACKUPS,
            job_id=set_job_id(set_id),
            description=f"{'incremental ' if incremental else ''}backup set {set_id}",
            on_failure="backups.jobs.backups.run_backup_job_failed",
        )
        queue.periodic_ensure_scheduled()
    except Exception as exc:  # noqa: BLE001 - Redis down: say so on the set, never leave it pending
        log.exception("could not queue backup set %s", set_id)
        backup_set_finish_failed(
            BackupSet.objects.get(pk=set_id),
            f"the backup could not be queued: the job queue (Redis) is unreachable ({exc})",
            actor=HOUSEKEEPING_ACTOR,
            only_if=(SetStatus.PENDING,),
        )


# ------------------------------------------------------------------------------ finish


def set_objects_delete(backup_set: BackupSet) -> str:
    """Delete what the set stored; returns a sentence to append to its error, if that failed.

    Only `<cluster>/<set-id>/...`: the trailing slash keeps set 1 from taking sets 10, 100...
    """
    try:
        storage = set_storage(backup_set)
    except EngineError:
        return ""  # an unusable storage URL: nothing can have been stored there
    try:
        storage.delete_prefix(set_prefix(backup_set) + "/")
    except Exception as exc:  # noqa: BLE001 - reported on the set instead
        log.exception("deleting objects of set %s failed", backup_set.pk)
        return (
            f" Its partial objects under {backup_set.object_prefix} could not be deleted "
            f"({exc}); they are not a usable backup."
        )
    return ""


def backup_set_finish_failed(
    backup_set: BackupSet,
    message: str,
    *,
    shard_errors: dict[str, str] | None = None,
    actor: str = WORKER_ACTOR,
    only_if: Collection[str] = (SetStatus.RUNNING,),
) -> BackupSet:
    """Fail a set still in one of `only_if` (else return it unchanged): delete its objects,
    record `message` (and per-shard errors), audit, and alert after commit."""
    note = set_objects_delete(backup_set)
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status not in only_if:
            return locked
        now = timezone.now()
        locked.status = SetStatus.FAILED
        locked.error = (message + note).strip()
        locked.finished_at = now
        locked.progress_text = "failed"
        locked.save()
        for sb in locked.shard_backups.all():
            error = (shard_errors or {}).get(sb.shard_name, "")
            sb.status = PartStatus.FAILED
            sb.error = error or sb.error
            sb.finished_at = sb.finished_at or now
            sb.save(update_fields=["status", "error", "finished_at"])
        TableBackup.objects.filter(
            shard_backup__backup_set=locked, status=PartStatus.RUNNING
        ).update(status=PartStatus.FAILED)
        audit_record(actor=actor, action="backup.fail", obj=locked, details={"error": locked.error})
        transaction.on_commit(lambda: _after_failure(locked))
    return locked


def _after_failure(backup_set: BackupSet) -> None:
    """Alert (mail, webhook) that a set failed; an alert that cannot be sent never hides it."""
    try:
        alert_backup_failed(backup_set)
    except Exception:  # noqa: BLE001 - the failure itself is recorded on the set
        log.exception("alerting about failed set %s failed", backup_set.pk)


def backup_set_finish_cancelled(backup_set: BackupSet) -> BackupSet:
    """Cancel a running set (else return it unchanged), deleting whatever it stored."""
    note = set_objects_delete(backup_set)
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status != SetStatus.RUNNING:
            return locked
        locked.status = SetStatus.CANCELLED
        locked.error = ("cancelled while running; nothing of it was kept." + note).strip()
        locked.finished_at = timezone.now()
        locked.progress_text = "cancelled"
        locked.save()
        locked.shard_backups.update(status=PartStatus.CANCELLED, finished_at=locked.finished_at)
        TableBackup.objects.filter(shard_backup__backup_set=locked).exclude(
            status=PartStatus.SUCCEEDED
        ).update(status=PartStatus.CANCELLED)
        audit_record(actor=WORKER_ACTOR, action="backup.cancelled", obj=locked, details={})
    return locked


def backup_set_finish_succeeded(
    backup_set: BackupSet, result, *, on_commit: Callable[[BackupSet], None] | None = None
) -> BackupSet:
    """Record a full set's engine result (shards, tables, chunks) and mark it `succeeded`.

    Only a `running` set: when the reaper or a cancel got there first, the set is returned
    unchanged. `on_commit(set)` runs after the commit of a success.
    """
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status != SetStatus.RUNNING:
            # The reaper or a cancel got there first: never turn that into a success.
            return locked
        now = timezone.now()
        by_name = {sb.shard_name: sb for sb in locked.shard_backups.all()}
        for shard in result.shards:
            sb = by_name.get(shard.name)
            if sb is None:
                continue
            sb.binlog_file = shard.binlog_file or ""
            sb.binlog_pos = shard.binlog_pos
            sb.gtid = shard.gtid or ""
            sb.snapshot_at = shard.snapshot_at
            sb.finished_at = now
            sb.status = PartStatus.SUCCEEDED
            sb.rows = sum(t.rows for t in shard.tables)
            sb.raw_bytes = sum(t.raw_bytes for t in shard.tables)
            sb.stored_bytes = sum(t.stored_bytes for t in shard.tables)
            sb.rows_done = sb.rows
            sb.bytes_done = sb.raw_bytes
            sb.error = ""
            sb.save()
            set_tables_persist(sb, shard.tables, now)
        PhysicalObject.objects.bulk_create(
            PhysicalObject(
                backup_set=locked,
                instance_name=obj["instance"],
                key=obj["key"],
                sha256=obj["sha256"],
                stored_bytes=obj["stored_bytes"],
                raw_bytes=obj.get("raw_bytes") or 0,
                binlog_file=obj.get("binlog_file") or "",
                binlog_pos=obj.get("binlog_pos"),
                gtid=obj.get("gtid") or "",
            )
            for obj in result.physical
        )
        locked.status = SetStatus.SUCCEEDED
        locked.finished_at = now
        locked.consistent_at = result.consistent_at
        locked.lock_window_ms = result.lock_window_ms
        locked.manifest_sha256 = result.manifest_sha256 or ""
        locked.rows = result.rows or sum(sb.rows for sb in by_name.values())
        locked.raw_bytes = result.raw_bytes or sum(sb.raw_bytes for sb in by_name.values())
        locked.stored_bytes = result.stored_bytes or sum(sb.stored_bytes for sb in by_name.values())
        locked.rows_done = locked.rows
        locked.bytes_done = locked.raw_bytes
        locked.progress_text = "done"
        locked.error = ""
        locked.save()
        audit_record(
            actor=WORKER_ACTOR,
            action="backup.succeed",
            obj=locked,
            details={
                "rows": locked.rows,
                "stored_bytes": locked.stored_bytes,
                "lock_window_ms": locked.lock_window_ms,
                "manifest_sha256": locked.manifest_sha256,
            },
        )
        if on_commit is not None:
            transaction.on_commit(lambda: on_commit(locked))
        set_copies_on_commit(locked)
    return locked


def set_copies_on_commit(backup_set: BackupSet) -> None:
    """After the commit of a success: copy the set to its policy's `copy_to` targets."""
    from backups.services.copies import set_copies_after_success  # copies builds on sets

    transaction.on_commit(lambda: set_copies_after_success(backup_set))


def set_tables_persist(shard_backup: ShardBackup, tables, now: datetime) -> None:
    """The engine's table results of one shard as TableBackup rows and their Chunk rows."""
    existing = {t.name: t for t in shard_backup.tables.all()}
    for table in tables:
        row = existing.get(table.name) or TableBackup(shard_backup=shard_backup, name=table.name)
        row.database = table.database
        row.engine = table.engine
        row.has_primary_key = table.has_primary_key
        row.status = PartStatus.FAILED if table.error else PartStatus.SUCCEEDED
        row.rows = table.rows
        row.rows_estimate = row.rows_estimate or table.rows
        row.raw_bytes = table.raw_bytes
        row.stored_bytes = table.stored_bytes
        row.chunk_count = len(table.chunks)
        row.checksum = table.checksum
        row.error = table.error
        row.started_at = row.started_at or shard_backup.started_at
        row.finished_at = now
        row.save()
        row.chunks.all().delete()
        Chunk.objects.bulk_create(
            (
                Chunk(
                    table_backup=row,
                    index=c.index,
                    key=c.key,
                    rows=c.rows,
                    raw_bytes=c.raw_bytes,
                    stored_bytes=c.stored_bytes,
                    sha256=c.sha256,
                )
                for c in table.chunks
            ),
            batch_size=500,
        )


# ------------------------------------------------------------------------- expire / delete


def backup_set_delete_check(*, backup_set: BackupSet) -> None:
    """Raise ChainError when a later set depends on `backup_set` (delete and expiry call this)."""
    child = (
        BackupSet.objects.filter(parent=backup_set)
        .exclude(status__in=[SetStatus.FAILED, SetStatus.CANCELLED, SetStatus.EXPIRED])
        .order_by("id")
        .first()
    )
    if child is not None:
        raise ChainError(
            f"set {backup_set.pk} cannot be removed: incremental set {child.pk} depends on it; "
            "remove the later sets of the chain first"
        )


def backup_set_expire(*, backup_set: BackupSet, actor) -> BackupSet:
    """Mark a finished set `expired` and delete its objects (after commit).

    Refused (ChainError) while a later set of its chain depends on it, and for sets that
    are still pending or running. Operators and admins only.
    """
    backup_authorise(actor)
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status in SetStatus.ACTIVE:
            raise ChainError(
                f"set {locked.pk} is {locked.status}; cancel it instead of expiring it"
            )
        if locked.status == SetStatus.EXPIRED:
            return locked
        backup_set_delete_check(backup_set=locked)
        previous = locked.status
        locked.status = SetStatus.EXPIRED
        locked.save(update_fields=["status"])
        audit_record(
            actor=actor,
            action="backup.expired",
            obj=locked,
            details={"previous_status": previous, "kind": locked.kind},
        )
        set_id = locked.pk
        transaction.on_commit(lambda: _delete_objects_quietly(set_id))
    return locked


def _delete_objects_quietly(set_id: int) -> None:
    # The set is expired either way: what could not be deleted is logged. Every target
    # holding the set, the default one included, is walked once.
    from backups.services.storage_targets import set_objects_delete_everywhere

    backup_set = BackupSet.objects.get(pk=set_id)
    try:
        problems = set_objects_delete_everywhere(backup_set, set_prefix(backup_set) + "/")
    except EngineError as exc:  # an unusable storage URL: nothing can have been stored there
        problems = [str(exc)]
    for problem in problems:
        log.warning("deleting the objects of expired set %s: %s", set_id, problem)
