"""In the browser: a cold backup is announced before it starts, its lock is shown live, and
the operator's cancel frees the cluster's writers."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from backups.models import BackupSet
from tests.factories import drop_cluster_databases, make_cluster

pytestmark = pytest.mark.django_db(transaction=True)


def test_operator_is_warned_watches_the_cold_lock_live_and_cancels_it(
    logged_in_page, mariadb_servers, unique_name, rq_worker_process, monkeypatch, settings
):
    settings.BACKUP_COMPRESSION_LEVEL = 19  # a dump of several seconds
    monkeypatch.setenv("SHARDVAULT_CHUNK_ROWS", "1000")
    cluster = make_cluster(
        mariadb_servers, name=f"wcold{unique_name}", tables={"t_order": 150_000}, max_connections=2
    )
    rq_worker_process("backups")
    page = logged_in_page("operator")
    page.goto("/backups/")
    # Before anything starts, the form says what each method costs and what cold blocks.
    expect(page.locator("#method-costs")).to_contain_text("costs production nothing")
    expect(page.locator("[data-testid=cold-warning]")).to_contain_text("every write waits")
    page.select_option("#backup-now select[name=cluster]", cluster.name)
    page.select_option("#backup-now select[name=consistency]", "cold")
    page.click("#backup-now button[type=submit]")

    backup_set = BackupSet.objects.get(cluster=cluster)
    expect(page.locator("h1")).to_contain_text("cold, logical")
    expect(page.locator("#cold-lock-warning")).to_contain_text("writes on every instance")
    # Live, without reloading: how long the lock has been held, on how many instances.
    expect(page.locator("[data-testid=progress-text]")).to_have_text(
        re.compile(r"global read lock held for \d+ s on 3 instances"), timeout=30_000
    )
    page.click("text=Cancel backup")
    expect(page.locator("[data-testid=set-status]")).to_have_text("cancelled", timeout=20_000)
    backup_set.refresh_from_db()
    assert backup_set.status == "cancelled"
    # Writes go through again on every instance (nothing is left holding the lock).
    for server in mariadb_servers:
        server.execute(
            "SET SESSION lock_wait_timeout = 2",
            "CREATE TABLE after_cancel (id INT PRIMARY KEY) ENGINE=InnoDB",
            "DROP TABLE after_cancel",
            database=cluster.shards.get(instance__port=server.endpoint.port).database,
        )
    drop_cluster_databases(cluster, mariadb_servers)
