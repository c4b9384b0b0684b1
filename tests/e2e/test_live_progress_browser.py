"""In the browser: the set page's shard table updates each shard's rows, current table and
worker while a real backup runs, without reloading the page, and stops when it ends."""

from __future__ import annotations

import socket

import pytest
from playwright.sync_api import expect

from backups.models import BackupSet
from backups.services.full_backups import backup_start
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slow_worker(rq_worker_process, monkeypatch, settings):
    """A real worker whose backups take several seconds (small chunks, zstd level 19)."""
    settings.BACKUP_COMPRESSION_LEVEL = 19
    monkeypatch.setenv("SHARDVAULT_CHUNK_ROWS", "1000")
    return lambda: rq_worker_process("backups")


def test_shard_rows_update_live_while_the_backup_runs(
    logged_in_page, mariadb_servers, unique_name, slow_worker
):
    cluster = make_cluster(
        mariadb_servers,
        name=f"lp{unique_name}",
        tables={"t_order": 80_000, "t_user": 500},
        max_connections=2,
    )
    slow_worker()
    backup_set = backup_start(cluster=cluster, actor=make_user("operator"))
    page = logged_in_page("auditor")
    page.goto(f"/backups/{backup_set.pk}/")
    page.evaluate("window.__notReloaded = true")
    row = page.locator('#shard-live-table tr[data-shard="s00"]')
    # A shard part-way: its current table and its worker (host:pid) show, then its rows grow.
    expect(row.locator("[data-current-table]")).to_contain_text("t_", timeout=60_000)
    expect(row.locator("[data-worker]")).to_contain_text(f"{socket.gethostname()}:")
    first = int(row.locator("[data-rows]").get_attribute("data-rows"))
    page.wait_for_function(
        """(first) => {
            const cell = document.querySelector('#shard-live-table tr[data-shard="s00"] [data-rows]');
            return cell && Number(cell.dataset.rows) > first;
        }""",
        arg=first,
        timeout=60_000,
    )
    assert page.evaluate("window.__notReloaded === true")  # updated in place by the poll
    # When the set ends the table holds the final figures and polls no more.
    expect(page.locator("[data-testid=set-status]")).to_have_text("succeeded", timeout=120_000)
    backup_set = BackupSet.objects.get(pk=backup_set.pk)
    for sb in backup_set.shard_backups.all():
        cell = page.locator(f'#shard-live-table tr[data-shard="{sb.shard_name}"] [data-rows]')
        expect(cell).to_have_attribute("data-rows", str(sb.rows))
    expect(page.locator("#shard-live[hx-get]")).to_have_count(0)
