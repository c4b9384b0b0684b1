"""The dashboard: each cluster's health at a glance, in a bounded number of queries."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from backups.models import BackupPolicy, BackupSet, RestoreRequest, RestoreRun, VerificationRun
from shards.models import Cluster
from tests.factories import make_user

pytestmark = pytest.mark.django_db


def _cluster(name, *, newest_age, rpo_minutes=60, drill_q=None, damaged=False):
    cluster = Cluster.objects.create(name=name)
    BackupPolicy.objects.create(cluster=cluster, rpo_target_minutes=rpo_minutes)
    now = timezone.now()
    s = BackupSet.objects.create(
        cluster=cluster, status="succeeded", storage_url="file:///x",
        consistent_at=now - newest_age, q=1.0, verified_at=now,
    )  # fmt: skip
    if drill_q is not None:
        VerificationRun.objects.create(
            backup_set=s, drill=True, status="succeeded", q=drill_q, t=1, d=1, a=drill_q,
            rto_seconds=12.0, finished_at=now - timedelta(hours=1),
        )  # fmt: skip
    if damaged:
        bad = BackupSet.objects.create(
            cluster=cluster, status="succeeded", storage_url="file:///x",
            consistent_at=now - newest_age - timedelta(hours=1), q=0.4, verified_at=now,
        )  # fmt: skip
        return cluster, bad
    return cluster, s


def _row(page: str, name: str) -> str:
    start = page.index(f'data-cluster="{name}"')
    return page[start : page.index("</tr>", start)]


def test_dashboard_shows_rpo_age_drill_q_and_flags_damaged_sets(client):
    _cluster("fresh", newest_age=timedelta(minutes=10), drill_q=1.0)
    _, bad = _cluster("stale", newest_age=timedelta(hours=5), damaged=True)
    client.force_login(make_user("auditor"))
    page = client.get(reverse("dashboard")).content.decode()
    fresh = _row(page, "fresh")
    assert 'data-rpo="ok"' in fresh and "Q 1.0000" in fresh and "health-good" in fresh
    stale = _row(page, "stale")
    assert 'data-rpo="breached"' in stale and "RPO breached" in stale and "never drilled" in stale
    assert "1 with Q &lt; 1" in stale and "health-bad" in stale
    assert f'data-set="{bad.pk}"' in page  # listed among sets that failed verification


def test_dashboard_lists_running_jobs_with_progress_and_polls(client):
    cluster, good = _cluster("busy", newest_age=timedelta(minutes=1))
    running = BackupSet.objects.create(
        cluster=cluster, status="running", storage_url="file:///x", rows_estimate=200, rows_done=50,
        progress_text="dumping t_order",
    )  # fmt: skip
    verification = VerificationRun.objects.create(
        backup_set=good, drill=True, status="running", progress_text="loading"
    )
    request = RestoreRequest.objects.create(
        cluster=cluster, source_set=good, target_kind="side", reason="r",
        requested_by=make_user("operator"), state="running", expires_at=timezone.now() + timedelta(days=1),
    )  # fmt: skip
    run = RestoreRun.objects.create(
        request=request, status="running", rows_estimate=10, rows_done=10
    )
    client.force_login(make_user("auditor"))
    page = client.get(reverse("dashboard")).content.decode()
    assert f'data-job="backup-{running.pk}"' in page and "25%" in page and "dumping t_order" in page
    assert f'data-job="drill-{verification.pk}"' in page
    assert f'data-job="restore-{run.pk}"' in page and "100%" in page
    assert 'hx-trigger="every 3s"' in page
    fragment = client.get(
        reverse("dashboard"), {"part": "jobs"}, HTTP_HX_REQUEST="true"
    ).content.decode()
    assert fragment.lstrip().startswith('<div id="running-jobs"') and "<h1>" not in fragment
    assert f'data-job="backup-{running.pk}"' in fragment


def test_dashboard_query_count_does_not_grow_with_clusters(client, django_assert_max_num_queries):
    user = make_user("auditor")
    client.force_login(user)
    for n in range(3):
        _cluster(f"c{n}", newest_age=timedelta(minutes=5), drill_q=1.0, damaged=True)
    with django_assert_max_num_queries(12) as few:
        client.get(reverse("dashboard"))
    for n in range(3, 15):
        _cluster(f"c{n}", newest_age=timedelta(minutes=5), drill_q=1.0, damaged=True)
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = client.get(reverse("dashboard"))
    assert response.content.decode().count('data-cluster="') == 15


def test_a_cluster_without_a_policy_is_held_to_the_default_one_day_rpo(client):
    cluster = Cluster.objects.create(name="nopolicy")
    BackupSet.objects.create(
        cluster=cluster, status="succeeded", storage_url="file:///x",
        consistent_at=timezone.now() - timedelta(hours=23),
    )  # fmt: skip
    client.force_login(make_user("auditor"))
    row = _row(client.get(reverse("dashboard")).content.decode(), "nopolicy")
    assert 'data-rpo="ok"' in row and "/ 1 day, 0:00:00" in row


def test_running_jobs_poll_does_not_recompute_cluster_health(client):
    """The 3-second poll renders the running-jobs table only; cluster health is not queried."""
    _cluster("polled", newest_age=timedelta(minutes=5), drill_q=1.0, damaged=True)
    client.force_login(make_user("auditor"))
    with CaptureQueriesContext(connection) as poll:
        fragment = client.get(
            reverse("dashboard"), {"part": "jobs"}, HTTP_HX_REQUEST="true"
        ).content.decode()
    assert 'id="running-jobs"' in fragment
    assert not [q for q in poll.captured_queries if "backuppolicy" in q["sql"]]


def test_dashboard_needs_a_role(client):
    client.force_login(make_user(None))
    assert client.get(reverse("dashboard")).status_code == 403


def test_dashboard_shows_each_clusters_next_scheduled_run(client):
    from datetime import UTC, datetime

    from backups.selectors.policies import next_run

    nightly, _ = _cluster("nightly", newest_age=timedelta(minutes=5))
    BackupPolicy.objects.filter(cluster=nightly).update(full_cron="15 3 * * *")
    _cluster("manual", newest_age=timedelta(minutes=5))
    client.force_login(make_user("auditor"))
    page = client.get(reverse("dashboard")).content.decode()
    expected = next_run(BackupPolicy.objects.get(cluster=nightly))
    assert expected["at"].astimezone(UTC).strftime("%H:%M") == "03:15"
    assert expected["at"] > datetime.now(UTC)
    row = _row(page, "nightly")
    assert f"{expected['at']:%Y-%m-%d} 03:15 UTC" in row and "(full)" in row
    assert "not scheduled" in _row(page, "manual")
