"""Read-side queries for the dashboard: each cluster's health and the running jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Max, OuterRef, Q, Subquery
from django.utils import timezone

from backups.models import BackupPolicy, BackupSet, RestoreRun, VerificationRun
from backups.selectors.policies import next_run
from backups.selectors.verification import cluster_rpo_target, quality_level
from backups.status import RunStatus, SetStatus, VerificationStatus
from shards.models import Cluster


@dataclass
class ClusterHealth:
    cluster: Cluster
    newest_point: datetime | None
    newest_set_id: int | None
    rpo_target: timedelta
    last_drill_at: datetime | None
    last_drill_q: float | None
    last_drill_set_id: int | None
    flagged_sets: int
    last_failed_at: datetime | None
    next_run: dict | None = None  # {"at", "kind"}: the policy's next scheduled backup

    @property
    def age(self) -> timedelta | None:
        return timezone.now() - self.newest_point if self.newest_point else None

    @property
    def rpo_ok(self) -> bool:
        return self.age is not None and self.age <= self.rpo_target

    @property
    def drill_level(self) -> str:
        return quality_level(self.last_drill_q)

    @property
    def level(self) -> str:
        if not self.rpo_ok or self.flagged_sets:
            return "bad"
        if self.last_drill_q is None or self.last_drill_q < 1:
            return "warn"
        return "good"


def dashboard_clusters() -> list[ClusterHealth]:
    """Every cluster with its health, in a constant number of queries."""
    succeeded = BackupSet.objects.filter(cluster=OuterRef("pk"), status=SetStatus.SUCCEEDED)
    newest = succeeded.exclude(consistent_at__isnull=True).order_by("-consistent_at", "-id")
    drills = VerificationRun.objects.filter(
        backup_set__cluster=OuterRef("pk"), drill=True, q__isnull=False
    ).order_by("-finished_at", "-id")
    clusters = (
        Cluster.objects.select_related("policy")
        .annotate(
            newest_point=Subquery(newest.values("consistent_at")[:1]),
            newest_set_id=Subquery(newest.values("id")[:1]),
            last_drill_at=Subquery(drills.values("finished_at")[:1]),
            last_drill_q=Subquery(drills.values("q")[:1]),
            last_drill_set_id=Subquery(drills.values("backup_set_id")[:1]),
            flagged=Count(
                "backup_sets",
                filter=Q(backup_sets__status=SetStatus.SUCCEEDED, backup_sets__q__lt=1.0),
                distinct=True,
            ),
            last_failed_at=Max(
                "backup_sets__finished_at", filter=Q(backup_sets__status=SetStatus.FAILED)
            ),
        )
        .order_by("name")
    )
    rows = []
    for c in clusters:
        rows.append(
            ClusterHealth(
                cluster=c,
                newest_point=c.newest_point,
                newest_set_id=c.newest_set_id,
                rpo_target=cluster_rpo_target(c),
                last_drill_at=c.last_drill_at,
                last_drill_q=c.last_drill_q,
                last_drill_set_id=c.last_drill_set_id,
                flagged_sets=c.flagged,
                last_failed_at=c.last_failed_at,
                next_run=next_run(_policy_of(c)),
            )
        )
    return rows


def _policy_of(cluster: Cluster) -> BackupPolicy | None:
    try:
        return cluster.policy  # joined by select_related
    except BackupPolicy.DoesNotExist:
        return None


def flagged_sets(*, limit: int = 20):
    """Succeeded sets whose last verification gave Q < 1 (shown in red on the dashboard)."""
    return (
        BackupSet.objects.filter(status=SetStatus.SUCCEEDED, q__lt=1.0)
        .select_related("cluster")
        .order_by("-id")[:limit]
    )


@dataclass
class RunningJob:
    kind: str  # "backup", "restore", "verification", "drill"
    id: int
    cluster: str
    label: str
    status: str
    percent: int | None
    progress_text: str
    started_at: datetime | None
    url: str = ""


def _percent(done: int, total: int) -> int | None:
    if not total:
        return None
    return max(0, min(100, int(done * 100 / total)))


def running_jobs() -> list[RunningJob]:
    """Backups, restores and verifications that are pending or running (three queries)."""
    jobs = []
    for s in (
        BackupSet.objects.filter(status__in=SetStatus.ACTIVE)
        .select_related("cluster")
        .order_by("id")
    ):
        jobs.append(
            RunningJob(
                "backup",
                s.pk,
                s.cluster.name,
                f"{s.kind} backup, set {s.pk}",
                s.status,
                _percent(s.rows_done, s.rows_estimate),
                s.progress_text,
                s.started_at,
            )
        )
    for r in (
        RestoreRun.objects.filter(status__in=RunStatus.ACTIVE)
        .select_related("request__cluster")
        .order_by("id")
    ):
        jobs.append(
            RunningJob(
                "restore",
                r.pk,
                r.request.cluster.name,
                f"restore run {r.pk} of request {r.request_id}",
                r.status,
                _percent(r.rows_done, r.rows_estimate),
                r.progress_text,
                r.started_at,
            )
        )
    for v in (
        VerificationRun.objects.filter(status__in=VerificationStatus.ACTIVE)
        .select_related("backup_set__cluster")
        .order_by("id")
    ):
        jobs.append(
            RunningJob(
                "drill" if v.drill else "verification",
                v.pk,
                v.backup_set.cluster.name,
                f"{'drill' if v.drill else 'storage check'} {v.pk} of set {v.backup_set_id}",
                v.status,
                None,
                v.progress_text,
                v.started_at,
            )
        )
    return jobs
