"""In Chromium: an operator files a restore, an approver signs it off, a real worker runs it."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from backups.engine.mysql import quote_ident
from backups.models import RestoreRequest
from shards.models import LogicalTable
from tests.backups.test_restore_rules import make_backup, server_for
from tests.factories import make_cluster

pytestmark = pytest.mark.django_db(transaction=True)


def test_operator_files_approver_signs_off_and_the_worker_restores_it(
    logged_in_page, mariadb_servers, unique_name, run_jobs, rq_worker_process
):
    cluster = make_cluster(
        mariadb_servers[:2],
        name=f"wr{unique_name}",
        tables={"t_order_0": 40, "t_order_1": 30, "t_user": 10},
    )
    LogicalTable.objects.create(cluster=cluster, name="t_order", pattern=r"t_order_[0-9]+")
    backup_set = make_backup(cluster, run_jobs)
    rq_worker_process("restores")

    # The operator walks the wizard: cluster, set, scope, target, plan, reason.
    operator = logged_in_page("operator")
    operator.click("nav >> text=Restores")
    operator.click("text=New restore request")
    operator.select_option("#id_pick_cluster", cluster.name)
    operator.click("text=Choose cluster")
    operator.select_option("#restore-wizard select[name=source_set]", str(backup_set.pk))
    operator.fill("#restore-wizard input[name=tables]", "t_order")
    operator.select_option("#restore-wizard select[name=target]", "side")
    operator.click("#preview-plan")
    plan = operator.locator("#restore-plan")
    expect(plan).to_contain_text("140")  # rows: (40 + 30) of t_order_* on each of two shards
    expect(plan).to_contain_text("no history yet")
    expect(plan).to_contain_text("t_order_0")
    expect(plan).not_to_contain_text("t_user")
    operator.fill("#restore-wizard textarea[name=reason]", "rows deleted by a bad deploy")
    operator.click("#file-request")
    request = RestoreRequest.objects.get(cluster=cluster)
    expect(operator.locator("h1")).to_contain_text(f"Restore request #{request.pk}")
    expect(operator.locator("#request-state")).to_have_text("pending_approval")
    expect(operator.locator("#approve")).to_have_count(0)  # never their own

    # The approver sees it in the inbox (badge), reads the plan and approves with a comment.
    approver = logged_in_page("approver")
    expect(approver.locator("#approval-badge")).to_have_text("1")
    approver.click("text=Awaiting my approval")
    approver.click(f"text=#{request.pk}")
    expect(approver.locator("main")).to_contain_text("rows deleted by a bad deploy")
    expect(approver.locator("#restore-plan")).to_contain_text("t_order_1")
    approver.fill("#approve-comment", "checked the plan")
    approver.click("#approve")
    expect(approver.locator("#request-state")).to_have_text("approved")
    expect(approver.locator("#approvals")).to_contain_text("checked the plan")
    expect(approver.locator("#approval-badge")).to_have_count(0)

    # The operator runs it and watches it end, every checksum matching.
    operator.reload()
    operator.click("#run-restore")
    expect(operator.locator("#run-status")).to_have_text("succeeded", timeout=60_000)
    expect(operator.locator("#verification tbody tr")).to_have_count(4)
    expect(operator.locator("#verification")).not_to_contain_text("mismatch")
    expect(operator.locator("#run-quality")).to_contain_text("Q = 1.0000")
    expect(operator.locator("#timeline")).to_contain_text("restore.run_succeeded")

    request.refresh_from_db()
    assert request.state == "succeeded"
    for shard in cluster.shards.select_related("instance"):
        server = server_for(mariadb_servers, shard.instance)
        side = f"{shard.database}__r{request.pk}"
        counts = server.execute(
            "SELECT (SELECT COUNT(*) FROM t_order_0), (SELECT COUNT(*) FROM t_order_1)",
            database=side,
        )
        assert counts[0] == (40, 30)
        server.execute(f"DROP DATABASE {quote_ident(side)}")
