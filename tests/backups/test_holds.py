"""Holds (who may hold, who may release), `backups show`, and the sets page's retention notes."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from backups.models import BackupSet
from backups.services.holds import backup_set_hold, backup_set_release
from console.models import AuditEvent
from console.roles import RoleDenied
from tests.backups.test_retention import move, policy, take
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"hd{unique_name}", tables={"t_order": 25})


def run(capsys, *argv) -> tuple[int, str, str]:
    code = 0
    try:
        call_command(*argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_operators_hold_only_admins_release_and_both_are_audited(
    cluster, run_jobs, mariadb_servers, capsys
):
    backup_set = take(cluster, "full", run_jobs, mariadb_servers)
    operator, admin = make_user("operator"), make_user("admin")
    auditor, approver = make_user("auditor"), make_user("approver")
    with pytest.raises(RoleDenied):
        backup_set_hold(backup_set=backup_set, actor=auditor, reason="x")
    with pytest.raises(RoleDenied):
        backup_set_hold(backup_set=backup_set, actor=approver, reason="x")

    code, out, err = run(
        capsys, "backups", "hold", str(backup_set.pk), "--as", operator.username,
        "--reason", "legal hold 2026-11", "--json",
    )  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert shown["hold"]["reason"] == "legal hold 2026-11"
    assert shown["hold"]["by"] == operator.username and shown["hold"]["at"]

    code, out, err = run(capsys, "backups", "hold", str(backup_set.pk), "--as", admin.username)
    assert code == 1 and err.strip() == f"backup set {backup_set.pk} is already on hold"

    # The operator who placed it may not lift it: only an admin may.
    code, out, err = run(
        capsys, "backups", "release", str(backup_set.pk), "--as", operator.username
    )
    assert code == 1
    assert err.strip() == f"{operator.username} may not release held backup sets (admins only)"
    with pytest.raises(RoleDenied):
        backup_set_release(backup_set=backup_set, actor=operator)
    backup_set.refresh_from_db()
    assert backup_set.held_at is not None

    code, out, err = run(
        capsys, "backups", "release", str(backup_set.pk), "--as", admin.username, "--json"
    )
    assert code == 0 and json.loads(out)["hold"] is None
    events = AuditEvent.objects.filter(object_id=str(backup_set.pk), action__startswith="backup.")
    assert [e.action for e in events.filter(action__in=["backup.hold", "backup.release"])] == [
        "backup.hold",
        "backup.release",
    ]
    release = events.get(action="backup.release")
    assert release.actor_name == admin.username
    assert release.details["hold_reason"] == "legal hold 2026-11"

    code, out, err = run(capsys, "backups", "release", str(backup_set.pk), "--as", admin.username)
    assert code == 1 and err.strip() == f"backup set {backup_set.pk} is not on hold"
    code, out, err = run(capsys, "backups", "hold", "999999", "--as", admin.username)
    assert code == 1 and err.strip() == "no backup set 999999"


def test_backups_show_gives_the_set_its_shards_hold_and_copies(
    cluster, run_jobs, mariadb_servers, capsys
):
    full = take(cluster, "full", run_jobs, mariadb_servers)
    incremental = take(cluster, "incremental", run_jobs, mariadb_servers)
    backup_set_hold(backup_set=incremental, actor=make_user("operator"), reason="keep")

    code, out, err = run(capsys, "backups", "show", str(incremental.pk), "--json")
    assert code == 0, err
    shown = json.loads(out)
    for key in (
        "id", "cluster", "kind", "consistency", "method", "status", "rows", "raw_bytes",
        "stored_bytes", "lock_window_ms", "error", "parent", "triggered_by", "consistent_at",
        "hold", "copies", "shards",
    ):  # fmt: skip
        assert key in shown, key
    assert shown["id"] == incremental.pk and shown["parent"] == full.pk
    assert shown["kind"] == "incremental" and shown["status"] == "succeeded"
    assert shown["hold"]["reason"] == "keep" and shown["copies"] == []
    assert shown["triggered_by"].startswith("operator-")

    code, out, err = run(capsys, "backups", "show", str(full.pk), "--json")
    shards = json.loads(out)["shards"]
    assert [s["name"] for s in shards] == ["s00", "s01"]
    for shard in shards:
        assert shard["status"] == "succeeded" and shard["rows"] >= 25
        assert shard["binlog_file"] and shard["binlog_pos"] > 0
        assert shard["instance"] and shard["database"].endswith(shard["name"][1:])
        assert set(shard) >= {"worker", "gtid"}

    code, out, err = run(capsys, "backups", "show", str(full.pk))
    assert code == 0 and f"set {full.pk}" in out and "s00" in out and "hold: none" in out

    code, out, err = run(capsys, "backups", "show", "424242")
    assert code == 1 and err.strip() == "no backup set 424242" and out == ""


def _sets(cluster, count: int, *, start: int) -> list[BackupSet]:
    made = []
    for i in range(count):
        made.append(
            BackupSet.objects.create(
                cluster=cluster,
                status="succeeded",
                storage_url="file:///x",
                object_prefix=f"{cluster.name}/{start + i}",
                rows=10,
                triggered_by=make_user("operator"),
            )
        )
    return made


def test_sets_page_says_why_each_set_is_kept_or_when_it_expires_without_a_query_per_set(
    client, django_assert_max_num_queries
):
    now = timezone.now()
    one, two = make_cluster([], name="pagea"), make_cluster([], name="pageb")
    policy(one, keep_full=1, keep_days=7)
    old, newest = _sets(one, 2, start=1)
    move(old, now - timedelta(days=30))
    move(newest, now - timedelta(days=2))
    backup_set_hold(backup_set=old, actor=make_user("operator"), reason="audit 42")
    client.force_login(make_user("auditor"))

    with django_assert_max_num_queries(14) as few:
        html = client.get(reverse("backups:set_list")).content.decode()
    baseline = len(few.captured_queries)
    assert "held" in html and "audit 42" in html
    assert f"set {old.pk} is on hold" in html
    # The newest chain is kept for good; keep_days alone would let it go on a known day.
    assert "kept because newest succeeded chain" in html

    # Twenty more sets in another cluster: the page asks the database no more often.
    policy(two, keep_full=0, keep_days=7)
    for backup_set in _sets(two, 20, start=100):
        move(backup_set, now - timedelta(days=3))
    with django_assert_max_num_queries(baseline):
        html = client.get(reverse("backups:set_list")).content.decode()
    assert html.count('data-set="') == 22
    expires = (now - timedelta(days=3) + timedelta(days=7)).date().isoformat()
    assert f"expires on {expires}" in html

    # The set page: its note and hold, a release button only for admins.
    page = client.get(reverse("backups:set_detail", args=[old.pk])).content.decode()
    assert 'id="retention-note"' in page and "release-form" not in page
    client.force_login(make_user("operator"))
    assert client.post(reverse("backups:set_release", args=[old.pk])).status_code == 403
    client.force_login(make_user("admin"))
    assert (
        "release-form" in client.get(reverse("backups:set_detail", args=[old.pk])).content.decode()
    )
    response = client.post(reverse("backups:set_release", args=[old.pk]))
    assert response.status_code == 302
    old.refresh_from_db()
    assert old.held_at is None
    client.force_login(make_user("operator"))
    client.post(reverse("backups:set_hold", args=[old.pk]), {"reason": "again"})
    old.refresh_from_db()
    assert old.hold_reason == "again" and old.held_at is not None
