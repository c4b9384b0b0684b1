"""Orphan sweep: objects under a cluster's prefix that no backup set references.

An object `<cluster>/<set-id>/...` belongs to the set whose `object_prefix` is
`<cluster>/<set-id>`; anything under `<cluster>/` that no set (expired ones aside) claims is
an orphan: the leftovers of a worker killed before its set row said where it wrote, a removal
done by hand, a restored database's stray files. Only orphans older than the grace period
(24 h by default) are touched, and only under the prefixes of registered clusters, in every
storage target. Sets that are pending or running (or failed, cancelled, expiring: retention
handles those) still reference their prefix, so their objects are never touched whatever
their age; the sets are read after the listing, so a set that starts while the sweep lists
is seen too. An object whose age the store cannot tell is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from backups.models import BackupSet
from backups.services.errors import BackupError
from backups.services.storage_targets import storage_targets_all
from backups.status import SetStatus
from console.audit import audit_record
from shards.models import Cluster

log = logging.getLogger(__name__)

SWEEP_ACTOR = "sweep"
DEFAULT_GRACE_HOURS = 24.0


@dataclass(frozen=True)
class Orphan:
    target: str
    key: str
    age_hours: float
    size: int

    def as_json(self) -> dict:
        return {"target": self.target, "key": self.key, "age_hours": round(self.age_hours, 2)}


@dataclass
class SweepResult:
    dry_run: bool
    orphans: list[Orphan] = field(default_factory=list)
    deleted: int = 0
    bytes_freed: int = 0
    errors: list[dict] = field(default_factory=list)  # [{"target", "key", "error"}]

    def as_json(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "orphans": [o.as_json() for o in self.orphans],
            "deleted": self.deleted,
            "bytes_freed": self.bytes_freed,
            "errors": self.errors,
        }


def _set_prefix_of(key: str) -> str:
    """`<cluster>/<set-id>` of a key (or the key itself when it sits directly under the cluster)."""
    return "/".join(key.split("/")[:2])


def storage_sweep(
    *,
    cluster: Cluster | None = None,
    target: str = "",
    grace_hours: float = DEFAULT_GRACE_HOURS,
    dry_run: bool = False,
    actor=SWEEP_ACTOR,
    now: datetime | None = None,
) -> SweepResult:
    """Find (and unless `dry_run`, delete) the orphans of `cluster` (or every cluster) in
    `target` (or every target). BackupError for an unknown target or a negative grace."""
    if grace_hours < 0:
        raise BackupError("--grace-hours must be zero or more")
    targets = storage_targets_all()
    if target:
        targets = [(name, storage) for name, storage in targets if name == target]
        if not targets:
            known = ", ".join(name for name, _ in storage_targets_all())
            raise BackupError(f"no storage target named {target!r} (known: {known})")
    clusters = [cluster] if cluster is not None else list(Cluster.objects.order_by("name"))
    now = now or timezone.now()
    cutoff = now - timedelta(hours=grace_hours)
    result = SweepResult(dry_run=dry_run)
    for name, storage in targets:
        for each in clusters:
            candidates = [
                info
                for info in storage.list(f"{each.name}/")
                if info.modified_at is not None and info.modified_at <= cutoff
            ]
            if not candidates:
                continue
            # Read after listing: a set recorded meanwhile still protects its objects.
            claimed = set(
                BackupSet.objects.filter(
                    cluster=each,
                    object_prefix__in={_set_prefix_of(info.key) for info in candidates},
                )
                .exclude(status=SetStatus.EXPIRED)
                .values_list("object_prefix", flat=True)
            )
            for info in candidates:
                if _set_prefix_of(info.key) in claimed:
                    continue
                age = (now - info.modified_at).total_seconds() / 3600
                result.orphans.append(Orphan(name, info.key, age, info.size))
    if dry_run or not result.orphans:
        return result
    deleted: list[Orphan] = []
    storages = dict(targets)
    for orphan in result.orphans:
        try:
            storages[orphan.target].delete(orphan.key)
        except Exception as exc:  # noqa: BLE001 - reported; the next sweep tries again
            log.exception("sweep could not delete %s from %s", orphan.key, orphan.target)
            result.errors.append({"target": orphan.target, "key": orphan.key, "error": str(exc)})
            continue
        deleted.append(orphan)
    result.deleted = len(deleted)
    result.bytes_freed = sum(o.size for o in deleted)
    if deleted:
        with transaction.atomic():
            audit_record(
                actor=actor,
                action="storage.sweep",
                object_type="storage",
                object_id=",".join(sorted({o.target for o in deleted})),
                object_repr="orphan sweep",
                details={
                    "deleted": len(deleted),
                    "bytes_freed": result.bytes_freed,
                    "grace_hours": grace_hours,
                    "cluster": cluster.name if cluster is not None else None,
                    # The first keys, so the audit row stays small however many there were.
                    "keys": [f"{o.target}:{o.key}" for o in deleted[:100]],
                },
            )
    return result
