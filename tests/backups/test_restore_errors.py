"""A restore run never hides an error: whatever state its tables are in, it fails naming the
shard and the cause, and it succeeds only when every shard reached its stop point."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import call_command

from backups.models import RestoreRequest
from backups.services.restore_requests import restore_request_approve, restore_request_file
from backups.services.restore_run_states import restore_run_start
from tests.backups.test_pitr import next_second, run_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_apply_error_after_every_table_verified_fails_the_run_naming_shard_and_cause(
    mariadb_servers, unique_name, run_jobs
):
    cluster = make_cluster(mariadb_servers[:2], name=f"err{unique_name}", tables={"t_order": 20})
    shards = list(cluster.shards.select_related("instance").order_by("name"))
    run_backup("full", cluster, run_jobs)
    bad, good = shards
    server = server_for(mariadb_servers, bad)
    server.execute("UPDATE t_order SET note = 'before' WHERE id = 1", database=bad.database)
    # A trigger created in the window cannot be replayed into a restore: the apply refuses
    # it, after every table of the shard already loaded and matched its checksum.
    server.execute(
        "CREATE TRIGGER t_order_note BEFORE UPDATE ON t_order FOR EACH ROW SET NEW.amount = 0",
        database=bad.database,
    )
    server.execute("UPDATE t_order SET note = 'after' WHERE id = 2", database=bad.database)
    server_for(mariadb_servers, good).execute(
        "UPDATE t_order SET note = 'fine' WHERE id = 3", database=good.database
    )
    next_second()
    at = datetime.now(UTC).replace(microsecond=0)
    next_second()
    run_backup("incremental", cluster, run_jobs)

    request = restore_request_file(
        cluster=cluster, requester=make_user("operator"), at=at, target="side", reason="drill"
    )
    restore_request_approve(request=request, approver=make_user("approver"), comment="ok")
    run = restore_run_start(request=RestoreRequest.objects.get(pk=request.pk), actor=None)
    run_jobs("restores")
    run.refresh_from_db()

    assert run.status == "failed"
    assert f"shard {bad.name}" in run.error
    assert "TRIGGER t_order_note" in run.error and "--before-gtid" in run.error
    assert run.restored_to is None
    results = {(r.shard_name, r.table): r for r in run.results.all()}
    # The tables of the failed shard did load and verify, and still count as failed.
    bad_result = results[(bad.name, "t_order")]
    assert bad_result.checksum_ok is True
    assert bad_result.status == "failed" and f"shard {bad.name}" in bad_result.error
    assert results[(good.name, "t_order")].status == "succeeded"
    assert run.q is not None and run.q < 1
    # The shard that did reach its stop point says where it stopped.
    points = {p["shard"]: p for p in run.stop_points}
    assert bad.name not in points
    assert points[good.name]["reached"] is True and points[good.name]["gtid"]

    out = StringIO()
    call_command("restore", "show", str(request.pk), "--json", stdout=out)
    shown = json.loads(out.getvalue())
    assert shown["run"]["status"] == "failed"
    assert f"shard {bad.name}" in shown["error"]
    assert [p["shard"] for p in shown["stop_points"]] == [good.name]
