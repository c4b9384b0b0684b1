"""GET /metrics: Prometheus text parsed with prometheus-client's own parser, the token
rules (404 when unset, 401 on a wrong token) and a query count that does not grow with the
number of clusters and sets."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from backups.models import BackupPolicy, BackupSet, SetCopy, VerificationRun
from shards.models import Cluster
from tests.backups.test_restore_rules import make_backup
from tests.factories import make_cluster

TOKEN = "scrape-token-0123456789"


def _scrape(client, token=TOKEN):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    return client.get("/metrics", **headers)


def _samples(response) -> dict:
    """{(sample name, sorted label items): value} of the whole page."""
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _fill(clusters: int, sets_per_cluster: int, prefix: str) -> None:
    now = timezone.now()
    for c in range(clusters):
        cluster = Cluster.objects.create(name=f"{prefix}{c}")
        BackupPolicy.objects.create(cluster=cluster, rpo_target_minutes=30)
        for i in range(sets_per_cluster):
            backup_set = BackupSet.objects.create(
                cluster=cluster,
                kind="full" if i % 3 == 0 else "incremental",
                status="failed" if i % 5 == 4 else "succeeded",
                storage_url="file:///nowhere",
            )
            end = now - timedelta(hours=sets_per_cluster - i)
            BackupSet.objects.filter(pk=backup_set.pk).update(
                started_at=end - timedelta(seconds=40 + i),
                finished_at=end,
                consistent_at=end - timedelta(seconds=30),
            )
            VerificationRun.objects.create(backup_set=backup_set, status="succeeded", q=1.0)
            SetCopy.objects.create(
                backup_set=backup_set, target="offsite", state="failed" if i == 1 else "complete"
            )


@pytest.mark.django_db
def test_metrics_are_404_without_a_token_setting_and_401_with_a_wrong_token(client, settings):
    settings.SHARDVAULT_METRICS_TOKEN = ""
    assert _scrape(client).status_code == 404
    settings.SHARDVAULT_METRICS_TOKEN = TOKEN
    assert _scrape(client, token=None).status_code == 401
    response = _scrape(client, token="wrong")
    assert response.status_code == 401
    assert b"shardvault_" not in response.content
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    assert _scrape(client).status_code == 200


@pytest.mark.django_db
def test_metrics_describe_every_cluster_with_a_bounded_number_of_queries(
    client, settings, django_assert_max_num_queries
):
    settings.SHARDVAULT_METRICS_TOKEN = TOKEN
    _fill(2, 5, "small")
    with CaptureQueriesContext(connection) as few:
        assert _scrape(client).status_code == 200
    # The fill's own "now" lies between these two: the times below are bounded by them, not
    # by a tolerance that a slow machine's fill of 1,200 sets can outlast.
    before = timezone.now().timestamp()
    _fill(30, 40, "many")
    with django_assert_max_num_queries(10), CaptureQueriesContext(connection) as many:
        response = _scrape(client)
    after = timezone.now().timestamp()
    assert len(many) == len(few) <= 10
    samples = _samples(response)
    # many7: sets 0..39 ending 40h..1h ago; sets 4, 9, ..., 39 failed, so set 38 (2h ago)
    # is the newest succeeded incremental and set 36 (4h ago) the newest full; the copy of
    # set 1 failed.
    end_38 = samples[
        (
            "shardvault_last_success_timestamp_seconds",
            (("cluster", "many7"), ("kind", "incremental")),
        )
    ]
    assert before - 7200 - 0.01 <= end_38 <= after - 7200 + 0.01
    end_36 = samples[
        ("shardvault_last_success_timestamp_seconds", (("cluster", "many7"), ("kind", "full")))
    ]
    assert end_38 - end_36 == pytest.approx(2 * 3600, abs=1)
    assert samples[
        ("shardvault_backup_duration_seconds", (("cluster", "many7"), ("kind", "incremental")))
    ] == pytest.approx(40 + 38, abs=0.01)
    rpo_age = samples[("shardvault_rpo_age_seconds", (("cluster", "many7"),))]
    assert 2 * 3600 + 30 - 1 <= rpo_age <= 2 * 3600 + 30 + (after - before) + 1
    assert samples[("shardvault_rpo_target_seconds", (("cluster", "many7"),))] == 1800
    assert samples[("shardvault_quality", (("cluster", "many7"),))] == 1.0
    failed = samples[
        (
            "shardvault_backups_total",
            (("cluster", "many7"), ("kind", "incremental"), ("status", "failed")),
        )
    ]
    assert failed == len([i for i in range(40) if i % 5 == 4 and i % 3 != 0])
    assert samples[("shardvault_copy_failing", (("cluster", "many7"), ("target", "offsite")))] == 1
    for queue in ("backups", "restores", "verify", "default"):
        assert samples[("shardvault_queue_jobs", (("queue", queue),))] == 0


@pytest.mark.django_db(transaction=True)
def test_metrics_show_a_real_backup_and_a_quality_drop(
    client, settings, mariadb_servers, unique_name, run_jobs
):
    settings.SHARDVAULT_METRICS_TOKEN = TOKEN
    cluster = make_cluster(mariadb_servers[:1], name=f"mt{unique_name}", tables={"t_user": 20})
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"verify_automatically": False})
    backup_set = make_backup(cluster, run_jobs)
    samples = _samples(_scrape(client))
    labels = (("cluster", cluster.name), ("kind", "full"))
    assert samples[("shardvault_last_success_timestamp_seconds", labels)] == pytest.approx(
        backup_set.finished_at.timestamp(), abs=0.01
    )
    assert samples[("shardvault_backups_total", (*labels, ("status", "succeeded")))] == 1
    assert ("shardvault_quality", (("cluster", cluster.name),)) not in samples
    VerificationRun.objects.create(backup_set=backup_set, status="succeeded", q=0.5)
    samples = _samples(_scrape(client))
    assert samples[("shardvault_quality", (("cluster", cluster.name),))] == 0.5
