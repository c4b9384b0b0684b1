"""Live per-shard progress: the set page's shard table (one HTMX poll for every shard,
286 once the set ended) during a real backup on a real worker process, and the restore
run page's per-shard rows."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
from django.urls import reverse

from backups.models import BackupSet
from backups.services.full_backups import backup_start
from backups.services.restore_run_states import restore_run_start
from tests.backups.test_backup_jobs import (  # noqa: F401 - fixtures
    big_cluster,
    running_with_progress,
    slow_worker,
    wait_for,
)
from tests.backups.test_backup_pages import assert_every_hx_get_has_an_href, login
from tests.backups.test_restore_rules import file_request, make_backup
from tests.backups.test_restore_run import approve
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

HTMX = {"HX-Request": "true"}


def _rows(html: str) -> dict[str, dict]:
    found = {}
    for match in re.finditer(r'<tr data-shard="([^"]+)"(.*?)</tr>', html, re.S):
        body = match.group(2)
        found[match.group(1)] = {
            "rows": int(re.search(r'data-rows="(\d+)"', body).group(1)),
            "table": re.search(r"data-current-table>([^<]*)<", body).group(1),
            "worker": re.search(r"data-worker>([^<]*)<", body).group(1),
        }
    return found


def test_set_page_updates_every_shard_with_one_poll_while_the_backup_runs(
    client,
    big_cluster,  # noqa: F811 - the fixture imported above
    slow_worker,  # noqa: F811
    settings,
):
    login(client, "auditor")
    slow_worker()
    backup_set = backup_start(cluster=big_cluster, actor=make_user("operator"))
    wait_for(running_with_progress(backup_set), 60, "the backup to make progress")

    page = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
    url = reverse("backups:set_shards", args=[backup_set.pk])
    assert page.count(f'hx-get="{url}"') == 1  # one poll for the whole table
    assert_every_hx_get_has_an_href(page)

    seen_running = False
    seen_rows: dict[str, int] = {}
    while True:
        response = client.get(url, headers=HTMX)
        html = response.content.decode()
        rows = _rows(html)
        assert set(rows) == {"s00", "s01", "s02"}
        if response.status_code == 286:
            break
        assert response.status_code == 200 and f'hx-get="{url}"' in html
        for name, row in rows.items():
            assert row["rows"] >= seen_rows.get(name, 0)  # never goes backwards
            seen_rows[name] = row["rows"]
            if row["table"] not in ("", "—") and row["rows"] > 0:
                seen_running = True
                host, _, pid = row["worker"].rpartition(":")
                assert host == socket.gethostname() and pid.isdigit()
        time.sleep(0.3)
    assert seen_running, "no poll saw a shard part-way through a table"
    backup_set = BackupSet.objects.get(pk=backup_set.pk)
    assert backup_set.status == "succeeded", backup_set.error
    assert "hx-trigger" not in html
    final = _rows(html)
    for sb in backup_set.shard_backups.all():
        assert final[sb.shard_name]["rows"] == sb.rows > 0
        assert final[sb.shard_name]["worker"] == sb.worker != ""


def test_restore_run_page_shows_each_shard_with_its_rows_and_worker(
    client, mariadb_servers, unique_name, run_jobs
):
    cluster = make_cluster(
        mariadb_servers[:2], name=f"lv{unique_name}", tables={"t_order": 300, "t_user": 20}
    )
    backup_set = make_backup(cluster, run_jobs)
    request = file_request(cluster, backup_set, target="side")
    approve(request)
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    login(client, "auditor")
    response = client.get(reverse("restores:run_progress", args=[request.pk]), headers=HTMX)
    assert response.status_code == 286
    rows = _rows(response.content.decode())
    assert set(rows) == {"s00", "s01"}
    for row in rows.values():
        assert row["rows"] == 320
        assert row["worker"] == f"{socket.gethostname()}:{os.getpid()}"
    for sb in cluster.shards.select_related("instance"):
        server = next(s for s in mariadb_servers if s.endpoint.port == sb.instance.port)
        server.execute(f"DROP DATABASE IF EXISTS `{sb.database}__r{request.pk}`")
