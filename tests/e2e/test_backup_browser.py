"""In the browser: back up a cluster from the page, watch it progress, see its tables; cancel."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from backups.models import BackupSet
from tests.factories import make_cluster

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slow_worker(rq_worker_process, monkeypatch, settings):
    """A real worker whose backups take a few seconds (small chunks, one connection each)."""
    monkeypatch.setenv("SHARDVAULT_CHUNK_ROWS", "1000")
    monkeypatch.setenv("SHARDVAULT_HEARTBEAT_STALE_SECONDS", "4")
    return lambda: rq_worker_process("backups")


def test_operator_backs_up_watches_progress_and_sees_every_table_checksum(
    logged_in_page, mariadb_servers, unique_name, slow_worker, settings
):
    # zstd level 19 keeps the backup running long enough to watch it progress.
    settings.BACKUP_COMPRESSION_LEVEL = 19
    cluster = make_cluster(
        mariadb_servers,
        name=f"web{unique_name}",
        tables={"t_order": 60_000, "t_user": 500},
        max_connections=2,
    )
    slow_worker()
    page = logged_in_page("operator")
    page.click("text=Backups")
    page.select_option("#backup-now select[name=cluster]", cluster.name)
    page.select_option("#backup-now select[name=consistency]", "locked")
    page.click("#backup-now button[type=submit]")

    backup_set = BackupSet.objects.get(cluster=cluster)
    expect(page.locator("h1")).to_contain_text(f"Backup set #{backup_set.pk}")
    # Live: the status changes without reloading, first to running with a progress bar...
    expect(page.locator("[data-testid=set-status]")).to_have_text("running", timeout=30_000)
    expect(page.locator("#summary .progress")).to_be_visible()
    # ...then to succeeded, and the page reloads once with the final per-table figures.
    expect(page.locator("[data-testid=set-status]")).to_have_text("succeeded", timeout=60_000)
    expect(page.locator("#shard-s02 [data-table=t_order] [data-testid=checksum]")).not_to_have_text(
        "—", timeout=10_000
    )
    for shard in ("s00", "s01", "s02"):
        for table in ("t_order", "t_user"):
            cell = page.locator(f"#shard-{shard} [data-table={table}] [data-testid=checksum]")
            expect(cell).to_have_text(
                backup_set.shard_backups.get(shard_name=shard).tables.get(name=table).checksum
            )
    expect(page.locator("#cancel-form")).to_have_count(0)

    page.click("text=Backups")
    expect(page.locator(f'tr[data-set="{backup_set.pk}"]')).to_contain_text("succeeded")
    expect(page.locator(f'tr[data-set="{backup_set.pk}"]')).to_contain_text("181,500")


def test_operator_cancels_a_running_backup_from_its_page(
    logged_in_page, mariadb_servers, unique_name, slow_worker, settings
):
    # zstd at level 19 keeps this backup running for several seconds, so the cancel lands
    # mid-run however fast the dump itself has become.
    settings.BACKUP_COMPRESSION_LEVEL = 19
    cluster = make_cluster(
        mariadb_servers,
        name=f"wc{unique_name}",
        tables={"t_order": 300_000},
        max_connections=2,
    )
    slow_worker()
    page = logged_in_page("operator")
    page.goto("/backups/")
    page.select_option("#backup-now select[name=cluster]", cluster.name)
    page.click("#backup-now button[type=submit]")
    expect(page.locator("[data-testid=set-status]")).to_have_text("running", timeout=30_000)
    page.click("text=Cancel backup")
    expect(page.locator(".messages")).to_contain_text("Cancelling")
    expect(page.locator("[data-testid=set-status]")).to_have_text("cancelled", timeout=20_000)
    assert BackupSet.objects.get(cluster=cluster).status == "cancelled"
