"""Issue 12, console side of restores: approvals expire on time, bind the server they were
given for, and a run restores only the manifest of its own set. Real servers and storage."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from backups.models import RestoreRequest, RestoreRun
from backups.services.restore_requests import restore_request_approve, restore_requests_expire
from backups.services.restore_run_states import restore_run_start
from console.models import AuditEvent
from tests.backups.test_restore_rules import file_request, make_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"tc{unique_name}")


@pytest.fixture
def backup_set(cluster, run_jobs):
    return make_backup(cluster, run_jobs)


def _side_databases(cluster, request, servers) -> list[str]:
    found = []
    for shard in cluster.shards.select_related("instance"):
        side = f"{shard.database}__r{request.pk}"
        server = server_for(servers, shard.instance)
        if server.execute(
            f"SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{side}'"
        ):
            found.append(side)
    return found


# ---- 6: an approval lapses 24 h after it was given unless a run has begun -------------------


def test_approval_with_only_a_queued_run_expires_in_housekeeping(cluster, backup_set, settings):
    request = file_request(cluster, backup_set)
    restore_request_approve(request=request, approver=make_user("approver"))
    run = restore_run_start(request=request, actor=make_user("operator"))
    later = timezone.now() + timedelta(hours=settings.RESTORE_APPROVAL_TTL_HOURS + 1)
    assert restore_requests_expire(now=later) == 1
    request.refresh_from_db()
    run.refresh_from_db()
    assert request.state == "expired" and run.started_at is None


def test_run_queued_in_time_but_begun_after_the_approval_lapsed_is_refused(
    cluster, backup_set, run_jobs, mariadb_servers
):
    request = file_request(cluster, backup_set)
    restore_request_approve(request=request, approver=make_user("approver"))
    run = restore_run_start(request=request, actor=make_user("operator"))
    # The run was queued 25 h ago, and the approval lapsed an hour ago; the worker only now
    # picks the job up.
    now = timezone.now()
    RestoreRun.objects.filter(pk=run.pk).update(created_at=now - timedelta(hours=25))
    RestoreRequest.objects.filter(pk=request.pk).update(expires_at=now - timedelta(hours=1))
    run_jobs("restores")
    request.refresh_from_db()
    run.refresh_from_db()
    assert request.state == "expired"
    assert run.started_at is None and run.status == "pending"
    assert AuditEvent.objects.filter(action="restore.expired", object_id=str(request.pk)).exists()
    assert _side_databases(cluster, request, mariadb_servers) == []
