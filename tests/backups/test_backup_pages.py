"""Backup pages: list, Back up now, detail, live progress (HTMX), cancel."""

import re

import pytest
from django.urls import reverse
from django.utils import timezone

from backups.models import BackupSet
from console.models import AuditEvent
from tests.factories import make_cluster, make_user


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"pg{unique_name}", tables={"t_order": 40})


def login(client, role):
    user = make_user(role)
    client.force_login(user)
    return user


def assert_every_hx_get_has_an_href(html: str) -> None:
    hx_gets = set(re.findall(r'hx-get="([^"]+)"', html))
    hrefs = set(re.findall(r'href="([^"]+)"', html))
    for url in hx_gets:
        assert url.split("?")[0] in {h.split("?")[0] for h in hrefs}, url


@pytest.mark.django_db
def test_list_shows_sets_with_their_figures_without_a_query_per_row(
    client, cluster, django_assert_max_num_queries
):
    login(client, "auditor")
    now = timezone.now()
    for i in range(12):
        BackupSet.objects.create(
            cluster=cluster,
            status="succeeded",
            consistency="locked" if i % 2 else "lockfree",
            storage_url="file:///x",
            object_prefix=f"{cluster.name}/{i}",
            started_at=now - timezone.timedelta(seconds=90),
            finished_at=now,
            rows=1000 + i,
            raw_bytes=4_000_000,
            stored_bytes=1_000_000,
            lock_window_ms=3.25,
            q=1.0,
            triggered_by=make_user("operator"),
        )
    with django_assert_max_num_queries(12):
        response = client.get(reverse("backups:set_list"))
    html = response.content.decode()
    assert response.status_code == 200
    assert html.count('data-set="') == 12
    assert "1,011" in html  # rows
    assert "4.00×" in html  # compression ratio
    assert "3.2 ms" in html or "3.3 ms" in html  # lock window
    assert "90.0 s" in html  # duration
    assert "Back up now" not in html  # auditors only read


@pytest.mark.django_db
def test_list_filters_by_cluster_kind_and_status(client, cluster, mariadb_servers, unique_name):
    other = make_cluster(mariadb_servers[:1], name=f"po{unique_name}", tables={})
    login(client, "operator")
    a = BackupSet.objects.create(cluster=cluster, status="failed", storage_url="file:///x")
    b = BackupSet.objects.create(cluster=other, status="succeeded", storage_url="file:///x")
    url = reverse("backups:set_list")
    html = client.get(url, {"cluster": cluster.name}).content.decode()
    assert f'data-set="{a.pk}"' in html and f'data-set="{b.pk}"' not in html
    html = client.get(url, {"status": "succeeded"}).content.decode()
    assert f'data-set="{b.pk}"' in html and f'data-set="{a.pk}"' not in html
    html = client.get(url, {"kind": "incremental"}).content.decode()
    assert "No backup sets yet." in html


@pytest.mark.django_db(transaction=True)
def test_operator_backs_up_from_the_page_and_a_second_click_is_refused(client, cluster):
    operator = login(client, "operator")
    assert "Back up now" in client.get(reverse("backups:set_list")).content.decode()
    form = {"cluster": cluster.name, "kind": "full", "consistency": "lockfree", "encrypt": "yes"}
    response = client.post(reverse("backups:set_start"), form)
    backup_set = BackupSet.objects.get(cluster=cluster)
    assert response.status_code == 302
    assert response["Location"] == reverse("backups:set_detail", args=[backup_set.pk])
    assert backup_set.status == "pending" and backup_set.triggered_by == operator
    assert backup_set.consistency == "lockfree" and backup_set.encrypted and backup_set.wrapped_key

    response = client.post(reverse("backups:set_start"), form, follow=True)
    html = response.content.decode()
    assert "already being backed up" in html
    refused = BackupSet.objects.filter(cluster=cluster).order_by("-id").first()
    assert refused.status == "failed"


@pytest.mark.django_db
def test_only_operators_and_admins_may_start_or_cancel(client, cluster):
    login(client, "auditor")
    response = client.post(reverse("backups:set_start"), {"cluster": cluster.name})
    assert response.status_code == 403
    assert not BackupSet.objects.exists()
    pending = BackupSet.objects.create(cluster=cluster, storage_url="file:///x")
    assert client.post(reverse("backups:set_cancel", args=[pending.pk])).status_code == 403
    pending.refresh_from_db()
    assert pending.status == "pending"
    assert client.get(reverse("backups:set_start")).status_code == 405


@pytest.mark.django_db
def test_progress_fragment_polls_while_active_and_stops_with_286(client, cluster):
    login(client, "operator")
    running = BackupSet.objects.create(
        cluster=cluster,
        status="running",
        storage_url="file:///x",
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
        rows_estimate=1000,
        rows_done=250,
        progress_text="dump s00.t_order",
    )
    url = reverse("backups:set_progress", args=[running.pk])
    response = client.get(url, headers={"HX-Request": "true"})
    html = response.content.decode()
    assert response.status_code == 200
    assert 'hx-get="' + url in html and 'hx-trigger="every 1s"' in html
    assert 'aria-valuenow="25"' in html and "dump s00.t_order" in html
    assert_every_hx_get_has_an_href(html)

    detail = client.get(reverse("backups:set_detail", args=[running.pk])).content.decode()
    assert "Cancel backup" in detail
    assert_every_hx_get_has_an_href(detail)
    assert_every_hx_get_has_an_href(client.get(reverse("backups:set_list")).content.decode())

    BackupSet.objects.filter(pk=running.pk).update(status="succeeded", finished_at=timezone.now())
    response = client.get(url, headers={"HX-Request": "true"})
    assert response.status_code == 286
    assert "hx-trigger" not in response.content.decode()

    # Without HTMX the link leads to the set's page.
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == reverse("backups:set_detail", args=[running.pk])


@pytest.mark.django_db(transaction=True)
def test_cancel_button_cancels_a_pending_set(client, cluster):
    operator = login(client, "operator")
    client.post(
        reverse("backups:set_start"),
        {"cluster": cluster.name, "kind": "full", "consistency": "locked"},
    )
    backup_set = BackupSet.objects.get(cluster=cluster)
    response = client.post(reverse("backups:set_cancel", args=[backup_set.pk]), follow=True)
    assert "cancelled" in response.content.decode()
    backup_set.refresh_from_db()
    assert backup_set.status == "cancelled"
    assert AuditEvent.objects.filter(action="backup.cancel", actor=operator).exists()


@pytest.mark.django_db(transaction=True)
def test_detail_shows_every_shard_and_table_with_checksum_after_a_real_backup(
    client, cluster, run_jobs
):
    login(client, "operator")
    client.post(
        reverse("backups:set_start"),
        {"cluster": cluster.name, "kind": "full", "consistency": "locked"},
    )
    run_jobs("backups")
    backup_set = BackupSet.objects.get(cluster=cluster)
    assert backup_set.status == "succeeded", backup_set.error
    html = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
    for shard in ("s00", "s01"):
        assert f'id="shard-{shard}"' in html
    checksums = re.findall(r'data-testid="checksum">([^<]+)<', html)
    assert len(checksums) == 2 and all(c.strip() not in ("", "—") for c in checksums)
    tables = list(
        backup_set.shard_backups.values_list("tables__name", "tables__rows", "tables__chunk_count")
    )
    assert sorted(tables) == [("t_order", 40, 1), ("t_order", 40, 1)]
    for sb in backup_set.shard_backups.all():
        assert sb.binlog_file and sb.binlog_pos and sb.status == "succeeded"
        assert sb.binlog_file in html
    assert "lock window" in html.lower()
    # Finished: the progress bar no longer polls (the automatic verification it queued may).
    assert reverse("backups:set_progress", args=[backup_set.pk]) not in html
    run_jobs("verify")
    html = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
    assert "hx-trigger" not in html  # verified too: nothing polls any more
    assert 'data-q-level="good"' in html


@pytest.mark.django_db(transaction=True)
def test_cluster_backups_and_restore_wizard_show_the_chain_and_recoverable_window(
    client, cluster, run_jobs
):
    login(client, "operator")
    listing = client.get(reverse("backups:set_list"), {"cluster": cluster.name}).content.decode()
    assert "Not recoverable to a point in time yet" in listing
    client.post(
        reverse("backups:set_start"),
        {"cluster": cluster.name, "kind": "full", "consistency": "locked"},
    )
    run_jobs("backups")
    backup_set = BackupSet.objects.get(cluster=cluster, status="succeeded")
    listing = client.get(reverse("backups:set_list"), {"cluster": cluster.name}).content.decode()
    assert f'data-full-set="{backup_set.pk}"' in listing
    assert "Recoverable from" in listing
    wizard = client.get(reverse("restores:request_new"), {"cluster": cluster.name}).content.decode()
    assert f'id="recoverable-{cluster.pk}"' in wizard and "Recoverable from" in wizard
