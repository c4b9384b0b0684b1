"""Read-side queries for backup sets: lists, detail, progress, and the JSON of the CLI contract."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Prefetch, QuerySet
from django.utils import timezone

from backups.models import BackupSet, PhysicalObject, ShardBackup, TableBackup
from backups.selectors.copies import set_copies_json
from backups.status import SetStatus
from shards.models import Cluster

LONG_SNAPSHOT_SECONDS = 600


def backup_set_list(
    *,
    cluster: str | Cluster | None = None,
    kind: str = "",
    status: str = "",
    limit: int = 200,
) -> QuerySet[BackupSet]:
    """Newest first, with the cluster and trigger joined (no query per row)."""
    qs = BackupSet.objects.select_related("cluster", "triggered_by").order_by("-id")
    if isinstance(cluster, Cluster):
        qs = qs.filter(cluster=cluster)
    elif cluster:
        qs = qs.filter(cluster__name=cluster)
    if kind:
        qs = qs.filter(kind=kind)
    if status:
        qs = qs.filter(status=status)
    return qs[:limit]


def backup_set_detail(*, set_id: int) -> BackupSet:
    """One set with its shards, their tables, all prefetched (raises DoesNotExist)."""
    tables = TableBackup.objects.order_by("name")
    shards = ShardBackup.objects.order_by("shard_name").prefetch_related(
        Prefetch("tables", queryset=tables)
    )
    return (
        BackupSet.objects.select_related("cluster", "triggered_by", "parent", "held_by")
        .prefetch_related(Prefetch("shard_backups", queryset=shards))
        .get(pk=set_id)
    )


def set_physical_objects(backup_set: BackupSet) -> list[PhysicalObject]:
    """A physical set's objects, one per instance (one query; empty for a logical set)."""
    if backup_set.method != BackupSet.Method.PHYSICAL:
        return []
    return list(PhysicalObject.objects.filter(backup_set=backup_set).order_by("instance_name"))


def backup_set_json(backup_set: BackupSet) -> dict:
    """The object of `backup --json` and `backups list --json` (DESIGN.md; keys never removed)."""
    return {
        "id": backup_set.pk,
        "cluster": backup_set.cluster.name,
        "kind": backup_set.kind,
        "consistency": backup_set.consistency,
        "method": backup_set.method,
        "method_label": backup_set.method_label,
        "status": backup_set.status,
        "rows": backup_set.rows,
        "raw_bytes": backup_set.raw_bytes,
        "stored_bytes": backup_set.stored_bytes,
        "lock_window_ms": backup_set.lock_window_ms,
        "error": backup_set.error,
        "created_at": backup_set.created_at.isoformat() if backup_set.created_at else None,
        "started_at": backup_set.started_at.isoformat() if backup_set.started_at else None,
        "finished_at": backup_set.finished_at.isoformat() if backup_set.finished_at else None,
        "consistent_at": (
            backup_set.consistent_at.isoformat() if backup_set.consistent_at else None
        ),
        "encrypted": backup_set.encrypted,
        "manifest_sha256": backup_set.manifest_sha256,
        "q": backup_set.q,
        "triggered_by": set_triggered_by(backup_set),
    }


def set_triggered_by(backup_set: BackupSet) -> str | None:
    """ "scheduler" for sets the policy's schedule started, else the user's name (None for a
    system actor such as the CLI without --as)."""
    if backup_set.trigger == BackupSet.Trigger.SCHEDULER:
        return "scheduler"
    user = backup_set.triggered_by
    return user.get_username() if user is not None else None


def set_non_innodb_tables(shard_backups) -> list[TableBackup]:
    """The non-InnoDB tables a (cold) set copied, from its prefetched shard parts: the note
    its page shows in place of the refusal hot and warm sets give."""
    return [
        t
        for sb in shard_backups
        for t in sb.tables.all()
        if t.engine and t.engine.lower() != "innodb"
    ]


def backup_set_show_json(backup_set: BackupSet) -> dict:
    """The object of `backups show --json`: `backup --json` plus parent, hold, copies and
    shards (DESIGN.md; keys never removed). Pass a set from `backup_set_detail`."""
    hold = None
    if backup_set.held_at is not None:
        hold = {
            "reason": backup_set.hold_reason,
            "by": backup_set.held_by.get_username() if backup_set.held_by else None,
            "at": backup_set.held_at.isoformat(),
        }
    return {
        **backup_set_json(backup_set),
        "parent": backup_set.parent_id,
        "trigger": backup_set.trigger,
        "hold": hold,
        "expiring_since": (
            backup_set.expiring_since.isoformat() if backup_set.expiring_since else None
        ),
        "excluded_tables": list(backup_set.excluded_tables or []),
        "storage_url": backup_set.storage_url,
        "object_prefix": backup_set.object_prefix,
        "copies": set_copies_json(backup_set),
        "shards": [
            {
                "name": sb.shard_name,
                "instance": sb.instance_name,
                "database": sb.database,
                "status": sb.status,
                "rows": sb.rows,
                "worker": sb.worker,
                "binlog_file": sb.binlog_file,
                "binlog_pos": sb.binlog_pos,
                "gtid": sb.gtid,
            }
            for sb in backup_set.shard_backups.all()
        ],
    }


@dataclass
class Progress:
    percent: float | None  # None while the total is unknown
    rows_done: int
    rows_estimate: int
    bytes_done: int
    rows_per_second: float | None
    eta_seconds: float | None
    text: str
    active: bool


def progress_of(item, *, started_at=None, active: bool | None = None) -> Progress:
    """Percent, rate and ETA from rows_done/rows_estimate of a set or a shard backup."""
    started_at = started_at or getattr(item, "started_at", None)
    if active is None:
        active = type(item).Status.is_active(item.status)  # SetStatus or PartStatus
    done, total = item.rows_done, item.rows_estimate
    if item.status == SetStatus.SUCCEEDED:
        percent = 100.0
    elif total:
        percent = min(99.0 if active else 100.0, 100.0 * done / total)
    else:
        percent = None
    rate = eta = None
    if started_at and active and done:
        elapsed = (timezone.now() - started_at).total_seconds()
        if elapsed > 0:
            rate = done / elapsed
            if total > done and rate:
                eta = (total - done) / rate
    return Progress(
        percent=percent,
        rows_done=done,
        rows_estimate=total,
        bytes_done=item.bytes_done,
        rows_per_second=rate,
        eta_seconds=eta,
        text=getattr(item, "progress_text", ""),
        active=active,
    )


def snapshot_open_seconds(shard_backup: ShardBackup) -> float | None:
    """How long the shard's snapshot transaction stayed open (snapshot to shard finish)."""
    start = shard_backup.snapshot_at or shard_backup.started_at
    if start and shard_backup.finished_at:
        return (shard_backup.finished_at - start).total_seconds()
    return None


def long_snapshot_shards(backup_set: BackupSet) -> list[tuple[str, float]]:
    """Shards whose snapshot stayed open long enough to grow the undo log noticeably."""
    found = []
    for sb in backup_set.shard_backups.all():
        seconds = snapshot_open_seconds(sb)
        if seconds is not None and seconds >= LONG_SNAPSHOT_SECONDS:
            found.append((sb.shard_name, seconds))
    return found
