"""The approval rules of restores (DESIGN.md "Restores and approvals"), on real servers.

Every request here is filed against a real backup set (made by the backup service and
run by a real RQ worker), so plans are computed from real manifests and storage.
"""

from __future__ import annotations

from datetime import timedelta

import django_rq
import pytest
from django.core import mail
from django.core.management import CommandError, call_command
from django.utils import timezone

from backups.engine.mysql import quote_ident
from backups.models import Approval, BackupSet, RestoreRequest, RestoreRun
from backups.services.errors import RestoreError
from backups.services.full_backups import backup_start
from backups.services.restore_requests import (
    restore_request_approve,
    restore_request_file,
    restore_request_reject,
    restore_requests_expire,
)
from backups.services.restore_run_states import (
    restore_run_cancel,
    restore_run_enqueue,
    restore_run_start,
)
from backups.storage import storage_from_url
from console.models import AuditEvent
from shards.models import Instance
from tests.factories import make_cluster, make_user
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)


# -- helpers shared with the other restore test modules ---------------------------------


def make_backup(cluster, run_jobs) -> BackupSet:
    """A real full backup of `cluster`, run to its end by a real RQ worker."""

    backup_set = backup_start(cluster=cluster, actor=make_user("operator"))
    run_jobs("backups")
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def server_for(servers, instance: Instance):
    return next(s for s in servers if s.endpoint.port == instance.port)


def file_request(cluster, backup_set, *, requester=None, target="side", **kw) -> RestoreRequest:
    return restore_request_file(
        cluster=cluster,
        requester=requester or make_user("operator"),
        source_set=backup_set,
        target=target,
        reason=kw.pop("reason", "test restore"),
        **kw,
    )


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"rr{unique_name}")


@pytest.fixture
def backup_set(cluster, run_jobs):
    return make_backup(cluster, run_jobs)


# -- self-approval ------------------------------------------------------------------------


def test_requester_cannot_approve_own_request_even_as_admin(cluster, backup_set):
    admin = make_user("admin")
    admin.is_superuser = True
    admin.save()
    request = file_request(cluster, backup_set, requester=admin)
    with pytest.raises(RestoreError, match="someone else must approve"):
        restore_request_approve(request=request, approver=admin)
    request.refresh_from_db()
    assert request.state == "pending_approval"
    assert not Approval.objects.filter(request=request).exists()


def test_requester_cannot_approve_own_request_on_the_page(client, cluster, backup_set):
    admin = make_user("admin")
    request = file_request(cluster, backup_set, requester=admin)
    client.force_login(admin)
    page = client.get(f"/restores/{request.pk}/")
    assert b'id="approve"' not in page.content  # no button offered...
    response = client.post(f"/restores/{request.pk}/approve/", {"comment": "lgtm"})
    assert response.status_code == 403  # ...and the server refuses the POST anyway
    assert "someone else must approve" in response.content.decode()
    request.refresh_from_db()
    assert request.state == "pending_approval"
    assert not Approval.objects.filter(request=request).exists()


def test_requester_cannot_approve_own_request_by_command(cluster, backup_set):
    admin = make_user("admin")
    request = file_request(cluster, backup_set, requester=admin)
    with pytest.raises(CommandError, match="someone else must approve"):
        call_command("restore", "approve", str(request.pk), "--as", admin.username)
    request.refresh_from_db()
    assert request.state == "pending_approval"


def test_only_approvers_decide(client, cluster, backup_set):
    request = file_request(cluster, backup_set)
    for role in ("operator", "auditor"):
        with pytest.raises(RestoreError, match="approvers only"):
            restore_request_approve(request=request, approver=make_user(role))
    auditor = make_user("auditor")
    client.force_login(auditor)
    assert client.post(f"/restores/{request.pk}/approve/").status_code == 403
    assert client.get(f"/restores/{request.pk}/").status_code == 200  # auditors read
    assert client.get("/restores/new/").status_code == 403  # but do not file
    request.refresh_from_db()
    assert request.state == "pending_approval"


# -- approvals required -------------------------------------------------------------------


def test_side_needs_one_approval(cluster, backup_set):
    request = file_request(cluster, backup_set, target="side")
    assert request.approvals_required == 1
    restore_request_approve(request=request, approver=make_user("approver"), comment="ok")
    request.refresh_from_db()
    assert request.state == "approved"


def test_inplace_needs_two_distinct_approvers(cluster, backup_set):
    request = file_request(cluster, backup_set, target="inplace")
    assert request.approvals_required == 2
    first = make_user("approver")
    restore_request_approve(request=request, approver=first)
    request.refresh_from_db()
    assert request.state == "pending_approval"
    with pytest.raises(RestoreError, match="already decided"):
        restore_request_approve(request=request, approver=first)
    with pytest.raises(RestoreError, match="only approved requests can run"):
        restore_run_start(request=request, actor=make_user("operator"))
    restore_request_approve(request=request, approver=make_user("approver"))
    request.refresh_from_db()
    assert request.state == "approved"
    assert request.approvals.count() == 2


def test_cluster_setting_raises_required_approvals_at_filing_time(cluster, backup_set):
    cluster.approvals_required_side = 2
    cluster.save()
    request = file_request(cluster, backup_set, target="side")
    cluster.approvals_required_side = 1  # later changes do not touch a filed request
    cluster.save()
    restore_request_approve(request=request, approver=make_user("approver"))
    request.refresh_from_db()
    assert request.state == "pending_approval"
    restore_request_approve(request=request, approver=make_user("approver"))
    request.refresh_from_db()
    assert request.state == "approved"


# -- expiry -------------------------------------------------------------------------------


def test_pending_request_expires_and_cannot_be_approved(cluster, backup_set, settings):
    request = file_request(cluster, backup_set)
    assert request.expires_at - request.created_at >= timedelta(
        hours=settings.RESTORE_REQUEST_TTL_HOURS - 1
    )
    assert restore_requests_expire(now=timezone.now() + timedelta(hours=1)) == 0
    later = timezone.now() + timedelta(hours=settings.RESTORE_REQUEST_TTL_HOURS + 1)
    assert restore_requests_expire(now=later) == 1
    request.refresh_from_db()
    assert request.state == "expired"
    with pytest.raises(RestoreError, match="expired"):
        restore_request_approve(request=request, approver=make_user("approver"))


def test_past_deadline_request_expires_when_someone_tries_to_approve(cluster, backup_set, settings):
    settings.RESTORE_REQUEST_TTL_HOURS = 0  # the deadline is already past at filing
    request = file_request(cluster, backup_set)
    with pytest.raises(RestoreError, match="expired"):
        restore_request_approve(request=request, approver=make_user("approver"))
    request.refresh_from_db()
    assert request.state == "expired"
    assert not request.approvals.exists()


def test_approval_expires_without_a_run(cluster, backup_set, settings):
    request = file_request(cluster, backup_set)
    restore_request_approve(request=request, approver=make_user("approver"))
    later = timezone.now() + timedelta(hours=settings.RESTORE_APPROVAL_TTL_HOURS + 1)
    assert restore_requests_expire(now=later) == 1
    request.refresh_from_db()
    assert request.state == "expired"
    with pytest.raises(RestoreError, match="only approved requests can run"):
        restore_run_start(request=request, actor=make_user("operator"))
    assert not RestoreRun.objects.filter(request=request).exists()


# -- rejection ----------------------------------------------------------------------------


def test_rejection_needs_a_comment_and_is_final(cluster, backup_set):
    request = file_request(cluster, backup_set)
    approver = make_user("approver")
    with pytest.raises(RestoreError, match="needs a comment"):
        restore_request_reject(request=request, approver=approver, comment="  ")
    restore_request_reject(request=request, approver=approver, comment="wrong set")
    request.refresh_from_db()
    assert request.state == "rejected"
    with pytest.raises(RestoreError, match="rejected; it cannot be approved"):
        restore_request_approve(request=request, approver=make_user("approver"))
    with pytest.raises(RestoreError, match="only approved requests can run"):
        restore_run_start(request=request, actor=make_user("operator"))
    with pytest.raises(CommandError, match="only approved requests can run"):
        call_command("restore", "run", str(request.pk))
    assert Approval.objects.get(request=request).comment == "wrong set"


# -- the job re-checks ----------------------------------------------------------------------


def test_job_enqueued_by_hand_refuses_an_unapproved_request(
    cluster, backup_set, run_jobs, mariadb_servers
):

    request = file_request(cluster, backup_set)
    run = RestoreRun.objects.create(request=request)  # bypassing restore_run_start on purpose
    restore_run_enqueue(run_id=run.pk)
    run_jobs("restores")
    run.refresh_from_db()
    request.refresh_from_db()
    assert (request.state, run.status, run.started_at) == ("pending_approval", "pending", None)
    for shard in cluster.shards.select_related("instance"):
        server = server_for(mariadb_servers, shard.instance)
        side = f"{shard.database}__r{request.pk}"
        assert not server.execute(
            f"SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{side}'"
        )


# -- the request itself ---------------------------------------------------------------------


def test_filing_records_plan_audit_and_tells_approvers(cluster, backup_set):
    approver = make_user("approver")
    approver.email = "approver@example.test"
    approver.save()
    requester = make_user("operator")
    requester.email = "op@example.test"
    requester.save()
    request = file_request(cluster, backup_set, requester=requester, tables=["t_order"])
    plan = request.plan
    assert plan["rows"] == 40  # t_order, 20 rows on each of two shards
    assert {t["table"] for t in plan["tables"]} == {"t_order"}
    assert plan["objects"] >= 2 and plan["bytes"] > 0
    assert sorted(plan["target_databases"]) == sorted(
        f"{s.instance.name}:{s.database}__r{request.pk}"
        for s in cluster.shards.select_related("instance")
    )
    assert "no history yet" in plan["estimate"]
    assert AuditEvent.objects.filter(action="restore.requested", object_id=str(request.pk)).exists()
    assert [m.to for m in mail.outbox] == [["approver@example.test"]]
    assert f"restore {request.pk}" in mail.outbox[0].subject
    restore_request_approve(request=request, approver=approver, comment="go")
    assert mail.outbox[-1].to == ["op@example.test"]
    assert "approved" in mail.outbox[-1].subject and "go" in mail.outbox[-1].body


def test_unknown_scope_and_bad_targets_are_refused_clearly(cluster, backup_set, mariadb_servers):
    with pytest.raises(RestoreError, match="unknown shard 'nope'"):
        file_request(cluster, backup_set, shards=["nope"])
    with pytest.raises(RestoreError, match="unknown table 't_missing'"):
        file_request(cluster, backup_set, tables=["t_missing"])
    with pytest.raises(RestoreError, match="no registered instance named 'ghost'"):
        file_request(cluster, backup_set, target="instance:ghost")
    with pytest.raises(RestoreError, match="unknown target"):
        file_request(cluster, backup_set, target="elsewhere")
    source_instance = cluster.shards.get(name="s00").instance
    with pytest.raises(RestoreError, match="holds the source database"):
        file_request(cluster, backup_set, shards=["s00"], target=f"instance:{source_instance.name}")
    assert not RestoreRequest.objects.exists()  # nothing half-filed


def test_non_empty_instance_target_is_refused(cluster, backup_set, mariadb_servers):
    spare = mariadb_servers[2]
    Instance.objects.create(
        cluster=cluster, name="spare", host="127.0.0.1", port=spare.endpoint.port, user="root"
    )
    database = cluster.shards.get(name="s00").database
    spare.execute(
        f"DROP DATABASE IF EXISTS {quote_ident(database)}",
        f"CREATE DATABASE {quote_ident(database)}",
        f"CREATE TABLE {quote_ident(database)}.t_order (id INT PRIMARY KEY)",
        f"INSERT INTO {quote_ident(database)}.t_order VALUES (1)",
    )
    try:
        with pytest.raises(RestoreError, match=r"not empty.*t_order"):
            file_request(cluster, backup_set, shards=["s00"], target="instance:spare")
    finally:
        spare.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")


def test_unreachable_target_instance_is_refused(cluster, backup_set):

    Instance.objects.create(
        cluster=cluster, name="down", host="127.0.0.1", port=free_port(), user="root"
    )
    with pytest.raises(RestoreError, match="target instance down is unreachable"):
        file_request(cluster, backup_set, shards=["s00"], target="instance:down")


def test_sets_that_cannot_restore_are_refused(cluster, backup_set, settings):

    failed = BackupSet.objects.create(
        cluster=cluster, status="failed", storage_url=settings.STORAGE_URL
    )
    with pytest.raises(RestoreError, match="is failed; only succeeded sets"):
        file_request(cluster, failed)
    storage = storage_from_url(backup_set.storage_url)
    victim = next(
        info.key for info in storage.list(backup_set.object_prefix) if "chunk-" in info.key
    )
    storage.delete(victim)
    with pytest.raises(
        RestoreError, match=f"objects not in storage as recorded: {victim} \\(missing\\)"
    ):
        file_request(cluster, backup_set)
    assert not RestoreRequest.objects.exists()


# -- pages ----------------------------------------------------------------------------------


def test_wizard_previews_the_plan_and_names_what_it_refuses(client, cluster, backup_set):
    operator = make_user("operator")
    client.force_login(operator)
    base = {"cluster": cluster.name, "preview": "1", "source_set": backup_set.pk, "target": "side"}
    page = client.get("/restores/new/", {**base, "tables": "t_order"})
    assert page.status_code == 200
    text = page.content.decode()
    assert 'id="restore-plan"' in text and "no history yet" in text and "__r&lt;id&gt;" in text
    refused = client.get("/restores/new/", {**base, "tables": "t_nope"})
    assert refused.status_code == 400
    assert "unknown table &#x27;t_nope&#x27;" in refused.content.decode()
    filed = client.post("/restores/new/", {**base, "tables": "t_order", "reason": "needed"})
    request = RestoreRequest.objects.get()
    assert filed.status_code == 302 and filed["Location"] == f"/restores/{request.pk}/"
    assert (request.requested_by, request.scope["tables"]) == (operator, ["t_order"])
    assert (
        client.post("/restores/new/", {**base, "reason": ""}).status_code == 400
    )  # a reason is required
    assert RestoreRequest.objects.count() == 1


def test_reject_on_the_page_needs_a_comment_and_shows_it(client, cluster, backup_set):
    request = file_request(cluster, backup_set)
    approver = make_user("approver")
    client.force_login(approver)
    inbox = client.get("/restores/inbox/").content.decode()
    assert f"#{request.pk}" in inbox and 'id="approval-badge">1<' in inbox
    refused = client.post(f"/restores/{request.pk}/reject/", {"comment": ""})
    assert refused.status_code == 409 and "needs a comment" in refused.content.decode()
    client.post(f"/restores/{request.pk}/reject/", {"comment": "wrong cluster"})
    request.refresh_from_db()
    assert request.state == "rejected"
    detail = client.get(f"/restores/{request.pk}/").content.decode()
    assert "wrong cluster" in detail and "restore.rejected" in detail
    assert f"#{request.pk}" not in client.get("/restores/inbox/").content.decode()


def test_progress_fragment_stops_polling_when_the_run_has_ended(client, cluster, backup_set):
    request = file_request(cluster, backup_set)
    client.force_login(make_user("auditor"))
    RestoreRun.objects.create(request=request, status="running", rows_estimate=10)
    live = client.get(f"/restores/{request.pk}/progress/", HTTP_HX_REQUEST="true")
    assert live.status_code == 200 and "hx-get" in live.content.decode()
    RestoreRun.objects.filter(request=request).update(status="succeeded")
    done = client.get(f"/restores/{request.pk}/progress/", HTTP_HX_REQUEST="true")
    assert done.status_code == 286 and "hx-get" not in done.content.decode()
    plain = client.get(f"/restores/{request.pk}/progress/")  # the href works without JavaScript
    assert plain.status_code == 200 and "<h1>" in plain.content.decode()


def test_cancelling_a_queued_run_ends_it_before_it_touches_anything(
    cluster, backup_set, run_jobs, mariadb_servers
):

    request = file_request(cluster, backup_set)
    restore_request_approve(request=request, approver=make_user("approver"))
    operator = make_user("operator")
    run = restore_run_start(request=request, actor=operator)
    with pytest.raises(RestoreError, match="operators only"):
        restore_run_cancel(run=run, actor=make_user("auditor"))
    restore_run_cancel(run=run, actor=operator)
    run.refresh_from_db()
    request.refresh_from_db()
    assert (request.state, run.status) == ("cancelled", "cancelled")
    assert run.job_id not in django_rq.get_queue("restores").job_ids
    run_jobs("restores")
    for shard in cluster.shards.select_related("instance"):
        server = server_for(mariadb_servers, shard.instance)
        assert not server.execute(
            f"SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{shard.database}__r{request.pk}'"
        )
    with pytest.raises(RestoreError, match="nothing to cancel"):
        restore_run_cancel(run=run, actor=operator)
