"""In Chromium: find the bad DELETE on the Transactions page, undo it with two sign-offs."""

from __future__ import annotations

import hashlib

import pytest
from playwright.sync_api import expect

from backups.models import RestoreRequest
from tests.backups.test_binlog_browser import three_in_one_second
from tests.backups.test_pitr import run_backup, server_for
from tests.factories import make_cluster

pytestmark = pytest.mark.django_db(transaction=True)


def test_operator_finds_the_bad_delete_and_two_approvers_sign_off_its_flashback(
    logged_in_page, mariadb_servers, unique_name, run_jobs, rq_worker_process
):
    cluster = make_cluster(mariadb_servers[:1], name=f"fbw{unique_name}", tables={"t_order": 20})
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    run_backup("full", cluster, run_jobs)
    deleted = server.execute(
        "SELECT * FROM t_order WHERE id BETWEEN 3 AND 7 ORDER BY id", database=shard.database
    )
    three_in_one_second(server, shard.database)
    run_backup("incremental", cluster, run_jobs)
    rq_worker_process("restores")

    # The operator finds the bad DELETE among the cluster's stored transactions.
    operator = logged_in_page("operator")
    operator.goto(f"/topology/clusters/{cluster.name}/")
    operator.click("#cluster-transactions")
    operator.fill("#f-tables", "t_order")
    operator.click("#filter-transactions")
    rows = operator.locator("#transactions tr.transaction")
    expect(rows).to_have_count(3)
    bad = rows.filter(has_text="DELETE FROM t_order WHERE id BETWEEN 3 AND 7")
    expect(bad).to_contain_text("5 deleted")
    assert "before_gtid=" in bad.locator("a.restore-before").get_attribute("href")
    gtid = bad.get_attribute("data-gtid")
    bad.locator("a.flashback-this").click()

    # The flashback form arrives prefilled; the operator gives a reason and files it.
    expect(operator.locator("#fb-gtid")).to_have_value(gtid)
    operator.click("#preview-flashback")  # see what undoing it changes before filing
    expect(operator.locator("#flashback-plan #plan-rows")).to_have_text("5")
    expect(operator.locator("#plan-conflicts")).to_contain_text("No conflicts")
    assert not RestoreRequest.objects.filter(cluster=cluster).exists()
    operator.fill("#fb-reason", "a DELETE without the right WHERE")
    operator.click("#file-flashback")
    request = RestoreRequest.objects.get(cluster=cluster)
    expect(operator.locator("h1")).to_contain_text(f"Restore request #{request.pk}")
    plan = operator.locator("#flashback-plan")
    expect(plan.locator("#plan-rows")).to_have_text("5")
    expect(plan).to_contain_text(gtid)
    expect(plan.locator("#plan-sample")).to_contain_text("INSERT INTO")
    with operator.expect_download() as download:
        operator.click("#download-sql")
    body = open(download.value.path(), "rb").read()
    assert hashlib.sha256(body).hexdigest() == request.artifact_sha256
    expect(operator.locator("#approve")).to_have_count(0)  # never their own

    # Two approvers sign off, each in their own browser session.
    for comment in ("checked the rows", "agreed"):
        approver = logged_in_page("approver")
        approver.goto(f"/restores/{request.pk}/")
        expect(approver.locator("#flashback-plan")).to_contain_text("t_order")
        approver.fill("#approve-comment", comment)
        approver.click("#approve")
        expect(approver.locator("#approvals")).to_contain_text(comment)
    expect(approver.locator("#request-state")).to_have_text("approved")

    # The operator runs it: the deleted rows are back, the later good writes kept.
    operator.reload()
    operator.click("#run-restore")
    expect(operator.locator("#run-status")).to_have_text("succeeded", timeout=60_000)
    expect(operator.locator("#timeline")).to_contain_text("restore.flashback_applied")
    now = server.execute(
        "SELECT * FROM t_order WHERE id BETWEEN 3 AND 7 ORDER BY id", database=shard.database
    )
    assert [tuple(row) for row in now] == [tuple(row) for row in deleted]
    kept = server.execute(
        "SELECT note FROM t_order WHERE id IN (10, 100) ORDER BY id", database=shard.database
    )
    assert [tuple(row) for row in kept] == [("good after",), ("good before",)]
