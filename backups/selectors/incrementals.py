"""Read-side queries for incremental chains and the recoverable window (issue 5)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from backups.models import BackupSet
from shards.models import Cluster


def chain_after(full_set: BackupSet) -> list[BackupSet]:
    """The succeeded incrementals that follow `full_set`, parent to child, up to the first gap."""
    chain: list[BackupSet] = []
    current = full_set
    while True:
        child = (
            BackupSet.objects.filter(
                parent=current,
                kind=BackupSet.Kind.INCREMENTAL,
                status=BackupSet.Status.SUCCEEDED,
            )
            .order_by("id")
            .first()
        )
        if child is None:
            return chain
        chain.append(child)
        current = child


def _first_children(sets) -> dict[int, BackupSet]:
    """parent id -> its first child (lowest id) among `sets`."""
    children: dict[int, BackupSet] = {}
    for backup_set in sorted(sets, key=lambda s: s.pk):
        if backup_set.parent_id is not None:
            children.setdefault(backup_set.parent_id, backup_set)
    return children


def _walk(start: BackupSet, children: dict[int, BackupSet]) -> list[BackupSet]:
    chain = []
    current = children.get(start.pk)
    while current is not None:
        chain.append(current)
        current = children.get(current.pk)
    return chain


def recoverable_window(cluster: Cluster) -> tuple[datetime | None, datetime | None]:
    """(earliest, latest) instants a point-in-time restore of `cluster` can reach.

    Earliest: the oldest succeeded full set's consistent point. Latest: the newest point
    any full set's unbroken incremental chain reaches (to the second). One query.
    """
    succeeded = list(BackupSet.objects.filter(cluster=cluster, status=BackupSet.Status.SUCCEEDED))
    fulls = sorted(
        (s for s in succeeded if s.kind == BackupSet.Kind.FULL and s.consistent_at),
        key=lambda s: s.consistent_at,
    )
    if not fulls:
        return None, None
    children = _first_children(s for s in succeeded if s.kind == BackupSet.Kind.INCREMENTAL)
    latest = None
    for full in fulls:
        chain = _walk(full, children)
        point = chain[-1].consistent_at if chain else full.consistent_at
        if point and (latest is None or point > latest):
            latest = point
    return fulls[0].consistent_at, latest


def cluster_chains(cluster: Cluster, *, limit: int = 10) -> list[list[BackupSet]]:
    """The newest `limit` full sets of `cluster`, each followed by its incremental chain."""
    fulls = list(
        BackupSet.objects.filter(cluster=cluster, kind=BackupSet.Kind.FULL).order_by("-id")[:limit]
    )
    if not fulls:
        return []
    children = _first_children(
        BackupSet.objects.filter(cluster=cluster, parent__isnull=False, id__gt=fulls[-1].pk)
    )
    return [[full, *_walk(full, children)] for full in fulls]


@dataclass
class RecoveryPoint:
    cluster: Cluster
    earliest: datetime | None
    latest: datetime | None

    @property
    def age_seconds(self) -> float | None:
        if self.latest is None:
            return None
        return max(0.0, (timezone.now() - self.latest).total_seconds())


def aligned_instant(*, full_set: BackupSet) -> datetime | None:
    """For a lockfree set: the instant every shard can be rolled forward to.

    The latest snapshot time among shards, rounded up to its whole second. Alignment is to
    the second and across independent server clocks (DESIGN.md); `locked` sets give the
    exact cut instead.
    """
    times = [sb.snapshot_at for sb in full_set.shard_backups.all() if sb.snapshot_at]
    if not times:
        return full_set.consistent_at
    latest = max(times)
    if latest.microsecond:
        latest = latest.replace(microsecond=0) + timedelta(seconds=1)
    return latest
