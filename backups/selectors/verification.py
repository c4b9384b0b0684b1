"""Read-side queries for verification runs and the quality score (DESIGN.md, "Quality")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from backups.models import BackupPolicy, BackupSet, VerificationRun
from backups.status import SetStatus, VerificationStatus
from shards.models import Cluster

# Q at or above this is "amber" rather than "red" (a readable colour at a glance).
Q_AMBER_FLOOR = 0.99


def quality_level(q: float | None) -> str:
    """'good' (green, Q = 1), 'warn' (amber: 0.99 <= Q < 1, or never verified), 'bad' (red)."""
    if q is None:
        return "warn"
    if q >= 1.0:
        return "good"
    if q >= Q_AMBER_FLOOR:
        return "warn"
    return "bad"


@dataclass
class SetQuality:
    """What a page shows about one set's quality."""

    backup_set: BackupSet
    q: float | None
    t: float | None
    d: float | None
    a: float | None
    verified_at: datetime | None
    drilled_at: datetime | None
    drill_q: float | None
    rto_seconds: float | None
    running: VerificationRun | None
    latest: VerificationRun | None
    needs_drill: bool

    @property
    def level(self) -> str:
        return quality_level(self.q)

    @property
    def problems(self) -> list[dict]:
        return list(self.latest.problems) if self.latest else []


def verification_latest(*, backup_set: BackupSet) -> VerificationRun | None:
    """The newest finished verification (storage check or drill) of a set, read with
    fallback across its targets (a `verify --target` run checks one copy: see selectors.copies)."""
    return (
        VerificationRun.objects.filter(backup_set=backup_set, q__isnull=False, target="")
        .order_by("-finished_at", "-id")
        .first()
    )


def verification_active(*, backup_set: BackupSet) -> VerificationRun | None:
    return (
        VerificationRun.objects.filter(
            backup_set=backup_set,
            status__in=VerificationStatus.ACTIVE,
        )
        .order_by("-id")
        .first()
    )


def cluster_rpo_target(cluster: Cluster) -> timedelta:
    """The cluster's RPO target: its policy's, or the policy default when it has none."""
    try:
        minutes = cluster.policy.rpo_target_minutes
    except Cluster.policy.RelatedObjectDoesNotExist:
        minutes = BackupPolicy._meta.get_field("rpo_target_minutes").default
    return timedelta(minutes=minutes)


def set_quality(*, backup_set: BackupSet) -> SetQuality:
    latest = verification_latest(backup_set=backup_set)
    drill = (
        VerificationRun.objects.filter(
            backup_set=backup_set, drill=True, q__isnull=False, target=""
        )
        .order_by("-finished_at", "-id")
        .first()
    )
    return SetQuality(
        backup_set=backup_set,
        q=backup_set.q,
        t=latest.t if latest else None,
        d=latest.d if latest else None,
        a=latest.a if latest else None,
        verified_at=backup_set.verified_at,
        drilled_at=drill.finished_at if drill else None,
        drill_q=drill.q if drill else None,
        rto_seconds=drill.rto_seconds if drill else None,
        running=verification_active(backup_set=backup_set),
        latest=latest,
        needs_drill=set_needs_drill(
            backup_set=backup_set, has_passing_drill=bool(drill and drill.q == 1.0)
        ),
    )


def set_needs_drill(*, backup_set: BackupSet, has_passing_drill: bool) -> bool:
    """A succeeded set older than its cluster's retention window without a passing drill."""
    if has_passing_drill or backup_set.status != SetStatus.SUCCEEDED:
        return False
    policy = getattr(backup_set.cluster, "policy", None)
    retention_days = policy.retention_days if policy else 30
    return backup_set.created_at < timezone.now() - timedelta(days=retention_days)


def sets_with_quality(queryset=None):
    """Sets annotated with their latest verification's factors and last drill (one query)."""
    queryset = queryset if queryset is not None else BackupSet.objects.all()
    latest = VerificationRun.objects.filter(
        backup_set=OuterRef("pk"), q__isnull=False, target=""
    ).order_by("-finished_at", "-id")
    drill = latest.filter(drill=True)
    passing = drill.filter(q__gte=1.0)
    return queryset.annotate(
        v_t=Subquery(latest.values("t")[:1]),
        v_d=Subquery(latest.values("d")[:1]),
        v_a=Subquery(latest.values("a")[:1]),
        v_problems=Subquery(latest.values("problems")[:1]),
        drill_at=Subquery(drill.values("finished_at")[:1]),
        drill_q=Subquery(drill.values("q")[:1]),
        drill_rto=Subquery(drill.values("rto_seconds")[:1]),
        passing_drill_at=Subquery(passing.values("finished_at")[:1]),
    )


def sets_flagged_unverified_drill(*, cluster=None):
    """Succeeded sets older than their retention window without a passing drill."""
    qs = sets_with_quality(BackupSet.objects.filter(status=SetStatus.SUCCEEDED))
    if cluster is not None:
        qs = qs.filter(cluster=cluster)
    flagged = []
    now = timezone.now()
    for s in qs.select_related("cluster__policy").filter(passing_drill_at__isnull=True):
        policy = getattr(s.cluster, "policy", None)
        days = policy.retention_days if policy else 30
        if s.created_at < now - timedelta(days=days):
            flagged.append(s)
    return flagged


def drills_due(*, now: datetime | None = None) -> list[BackupSet]:
    """Per cluster with `drill_every_days`, its newest succeeded set (full, or incremental with
    its chain) when no drill ran recently."""
    now = now or timezone.now()
    due = []
    for cluster in Cluster.objects.filter(policy__drill_every_days__gt=0).select_related("policy"):
        newest = (
            BackupSet.objects.filter(cluster=cluster, status=SetStatus.SUCCEEDED)
            .order_by("-id")
            .first()
        )
        if newest is None:
            continue
        since = now - timedelta(days=cluster.policy.drill_every_days)
        recent = VerificationRun.objects.filter(
            Q(finished_at__gte=since) | Q(status__in=VerificationStatus.ACTIVE),
            backup_set__cluster=cluster,
            drill=True,
        ).exists()
        if not recent:
            due.append(newest)
    return due
