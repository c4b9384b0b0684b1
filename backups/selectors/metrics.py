"""What `GET /metrics` reports (DESIGN.md, command line: `GET /metrics`), read with a fixed
number of queries whatever the number of clusters and sets (grouped aggregates and
correlated subqueries, never one query per cluster or set).

Series (prometheus-client families, built fresh for every scrape by `metric_families`):

* shardvault_last_success_timestamp_seconds{cluster,kind}: end of the newest succeeded set;
* shardvault_rpo_age_seconds{cluster}: age of the newest recovery point (consistent_at, else
  the end, of the newest succeeded set of any kind); clusters without one are left out;
* shardvault_rpo_target_seconds{cluster}: the policy's RPO target (for alert rules);
* shardvault_quality{cluster}: Q of the newest set that has a verification (its latest one);
* shardvault_backups_total{cluster,kind,status}: sets ever recorded, by kind and status;
* shardvault_backup_duration_seconds{cluster,kind}: run time of the newest succeeded set;
* shardvault_queue_jobs{queue}: jobs waiting per RQ queue (left out when Redis is down);
* shardvault_copy_failing{cluster,target}: succeeded sets whose copy to a storage target
  failed after its last retry (0 once every copy is complete or pending).
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, F, Max, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from backups import queue
from backups.models import BackupPolicy, BackupSet, SetCopy, VerificationRun
from backups.status import CopyStatus, SetStatus
from shards.models import Cluster


def _ts(value) -> float:
    return value.timestamp()


def metric_families() -> Iterator[Metric]:
    """Every metric family of one scrape (7 queries, plus one Redis round trip per queue)."""
    now = timezone.now()
    succeeded = BackupSet.objects.filter(status=SetStatus.SUCCEEDED, finished_at__isnull=False)

    last = GaugeMetricFamily(
        "shardvault_last_success_timestamp_seconds",
        "Unix time the newest succeeded backup set of the cluster and kind ended.",
        labels=["cluster", "kind"],
    )
    for row in (
        succeeded.values("cluster__name", "kind")
        .annotate(end=Max("finished_at"))
        .order_by("cluster__name", "kind")
    ):
        last.add_metric([row["cluster__name"], row["kind"]], _ts(row["end"]))
    yield last

    duration = GaugeMetricFamily(
        "shardvault_backup_duration_seconds",
        "Run time (start to end) of the newest succeeded backup set of the cluster and kind.",
        labels=["cluster", "kind"],
    )
    newest = succeeded.filter(
        pk=Subquery(
            BackupSet.objects.filter(
                cluster=OuterRef("cluster"),
                kind=OuterRef("kind"),
                status=SetStatus.SUCCEEDED,
                finished_at__isnull=False,
            )
            .order_by("-finished_at", "-pk")
            .values("pk")[:1]
        )
    ).values_list("cluster__name", "kind", "started_at", "created_at", "finished_at")
    for cluster, kind, started, created, finished in sorted(newest):
        duration.add_metric([cluster, kind], (finished - (started or created)).total_seconds())
    yield duration

    rpo_age = GaugeMetricFamily(
        "shardvault_rpo_age_seconds",
        "Seconds since the cluster's newest recovery point (its newest succeeded set).",
        labels=["cluster"],
    )
    for row in (
        succeeded.values("cluster__name")
        .annotate(point=Max(Coalesce("consistent_at", "finished_at")))
        .order_by("cluster__name")
    ):
        rpo_age.add_metric([row["cluster__name"]], max(0.0, (now - row["point"]).total_seconds()))
    yield rpo_age

    rpo_target = GaugeMetricFamily(
        "shardvault_rpo_target_seconds",
        "The cluster's RPO target (policy rpo_target_minutes) in seconds.",
        labels=["cluster"],
    )
    default_minutes = BackupPolicy._meta.get_field("rpo_target_minutes").default
    for name, minutes in Cluster.objects.order_by("name").values_list(
        "name", "policy__rpo_target_minutes"
    ):
        rpo_target.add_metric([name], 60.0 * (minutes if minutes is not None else default_minutes))
    yield rpo_target

    quality = GaugeMetricFamily(
        "shardvault_quality",
        "Q (rows x tables x artifacts) of the cluster's newest verified backup set.",
        labels=["cluster"],
    )
    newest_q = VerificationRun.objects.filter(
        backup_set__cluster=OuterRef("pk"), q__isnull=False, target=""
    ).order_by("-backup_set__created_at", "-backup_set_id", "-finished_at", "-pk")
    for name, q in (
        Cluster.objects.annotate(q=Subquery(newest_q.values("q")[:1]))
        .filter(q__isnull=False)
        .order_by("name")
        .values_list("name", "q")
    ):
        quality.add_metric([name], float(q))
    yield quality

    totals = CounterMetricFamily(
        "shardvault_backups",
        "Backup sets recorded, by cluster, kind and status.",
        labels=["cluster", "kind", "status"],
    )
    for row in (
        BackupSet.objects.values("cluster__name", "kind", "status")
        .annotate(n=Count("pk"))
        .order_by("cluster__name", "kind", "status")
    ):
        totals.add_metric([row["cluster__name"], row["kind"], row["status"]], row["n"])
    yield totals

    failing = GaugeMetricFamily(
        "shardvault_copy_failing",
        "Succeeded backup sets whose copy to the storage target failed after its last retry.",
        labels=["cluster", "target"],
    )
    for row in (
        SetCopy.objects.filter(backup_set__status=SetStatus.SUCCEEDED)
        .values(cluster=F("backup_set__cluster__name"), copy_target=F("target"))
        .annotate(n=Count("pk", filter=Q(state=CopyStatus.FAILED)))
        .order_by("cluster", "copy_target")
    ):
        failing.add_metric([row["cluster"], row["copy_target"]], row["n"])
    yield failing

    jobs = GaugeMetricFamily(
        "shardvault_queue_jobs", "Jobs waiting on the RQ queue.", labels=["queue"]
    )
    try:
        lengths = queue.queue_lengths()
    except Exception:  # noqa: BLE001 - Redis down: the database series still scrape
        lengths = {}
    for name, count in sorted(lengths.items()):
        jobs.add_metric([name], count)
    yield jobs
