"""Retention over a real history: fulls and incrementals taken by real backups on MariaDB, their
`created_at` moved back in time; objects really deleted from file storage and moto's S3."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from django.core.management import call_command
from django.utils import timezone

from backups import queue
from backups.models import BackupPolicy, BackupSet
from backups.services import retention as retention_module
from backups.services.errors import BackupRefused, RestoreError
from backups.services.full_backups import backup_start
from backups.services.holds import backup_set_hold, backup_set_release
from backups.services.restore_requests import restore_request_file, restore_request_reject
from backups.services.restore_run_states import restore_run_start
from backups.services.retention import retention_apply, retention_apply_all, retention_plan
from backups.services.sets import set_storage
from console.models import AuditEvent
from tests.backups.test_restore_rules import file_request, server_for
from tests.backups.test_restore_run import approve
from tests.backups.test_storage import s3_env  # noqa: F401 - fixture
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

# A fixed "now" (a Wednesday, ISO week 2026-W25) so the GFS periods are the same every day.
NOW = datetime(2026, 6, 17, 12, 0, tzinfo=UTC)


def day(text: str, hour: int = 3) -> datetime:
    return datetime.fromisoformat(text).replace(hour=hour, tzinfo=UTC)


def take(cluster, kind: str, run_jobs, servers) -> BackupSet:
    """A real backup of `kind` after a few new rows on every shard (so binlogs move)."""
    for shard in cluster.shards.select_related("instance"):
        server_for(servers, shard.instance).execute(
            "INSERT INTO t_order (id, shard, amount, note, created_at)"
            " SELECT COALESCE(MAX(id), 0) + 1, 'x', 1, 'retention', NOW(6) FROM t_order",
            database=shard.database,
        )
    backup_set = backup_start(cluster=cluster, actor=make_user("operator"), kind=kind)
    run_jobs("backups")
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def move(backup_set: BackupSet, when: datetime) -> None:
    BackupSet.objects.filter(pk=backup_set.pk).update(created_at=when)


def policy(cluster, **fields) -> None:
    defaults = dict(keep_full=1, keep_daily=0, keep_weekly=0, keep_monthly=0, keep_days=7)
    defaults.update(fields)
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults=defaults)


def objects_of(backup_set: BackupSet) -> list[str]:
    return [i.key for i in set_storage(backup_set).list(f"{backup_set.object_prefix}/")]


def decided(cluster, now=NOW) -> tuple[dict[int, str], dict[int, str]]:
    plan = retention_plan(cluster=cluster, now=now)
    return (
        {d.set_id: d.reason for d in plan.removed},
        {d.set_id: d.reason for d in plan.kept},
    )


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"ret{unique_name}", tables={"t_order": 40})


@pytest.fixture
def history(cluster, run_jobs, mariadb_servers):
    """F1 <- I1 (February), a refused full X (April), F2 <- I2 (4 May), F3 (20 May),
    F4 <- I4 (12 and 16 June): six real backups and one real failed set."""
    h = SimpleNamespace(cluster=cluster)
    h.f1 = take(cluster, "full", run_jobs, mariadb_servers)
    h.i1 = take(cluster, "incremental", run_jobs, mariadb_servers)
    h.f2 = backup_start(cluster=cluster, actor=make_user("operator"))
    with pytest.raises(BackupRefused) as refused:
        backup_start(cluster=cluster, actor=make_user("operator"))
    h.x = refused.value.backup_set
    run_jobs("backups")
    h.f2.refresh_from_db()
    assert h.f2.status == "succeeded" and h.x.status == "failed"
    h.i2 = take(cluster, "incremental", run_jobs, mariadb_servers)
    h.f3 = take(cluster, "full", run_jobs, mariadb_servers)
    h.f4 = take(cluster, "full", run_jobs, mariadb_servers)
    h.i4 = take(cluster, "incremental", run_jobs, mariadb_servers)
    assert (h.i1.parent_id, h.i2.parent_id, h.i4.parent_id) == (h.f1.pk, h.f2.pk, h.f4.pk)
    for backup_set, when in (
        (h.f1, day("2026-02-10")),
        (h.i1, day("2026-02-11")),
        (h.x, day("2026-04-01")),
        (h.f2, day("2026-05-04")),
        (h.i2, day("2026-05-05")),
        (h.f3, day("2026-05-20")),
        (h.f4, day("2026-06-12")),
        (h.i4, day("2026-06-16")),
    ):
        move(backup_set, when)
    h.succeeded = [h.f1, h.i1, h.f2, h.i2, h.f3, h.f4, h.i4]
    return h


def test_every_rule_decides_whole_chains_and_a_dry_run_deletes_nothing(history):
    h = history
    c = h.cluster
    before = {s.pk: objects_of(s) for s in h.succeeded}
    assert all(before.values())

    # keep_full 1, no GFS, keep_days 7: only the newest chain (F4 and its incremental) stays.
    policy(c)
    removed, kept = decided(c)
    assert set(kept) == {h.f4.pk, h.i4.pk}
    assert "newest succeeded chain" in kept[h.f4.pk] and "keep_full 1" in kept[h.f4.pk]
    assert kept[h.i4.pk].startswith(f"in the chain of set {h.f4.pk}: ")
    assert "younger than keep_days (7 days)" in kept[h.i4.pk]
    assert set(removed) == {h.f1.pk, h.i1.pk, h.x.pk, h.f2.pk, h.i2.pk, h.f3.pk}
    assert "not kept by keep_full 1" in removed[h.f3.pk]
    assert removed[h.i1.pk].startswith(f"in the chain of set {h.f1.pk}: ")
    assert "failed set older than keep_days" in removed[h.x.pk]

    # keep_full 3: the three newest full chains, each whole.
    policy(c, keep_full=3)
    removed, kept = decided(c)
    assert set(kept) == {h.f2.pk, h.i2.pk, h.f3.pk, h.f4.pk, h.i4.pk}

    # keep_monthly 3 (June, May, April): the newest full of May is F3, not F2; April has none.
    policy(c, keep_full=0, keep_monthly=3)
    removed, kept = decided(c)
    assert set(kept) == {h.f3.pk, h.f4.pk, h.i4.pk}
    assert "newest full of 2026-05 (keep_monthly 3)" in kept[h.f3.pk]
    plan = {d.set_id: d for d in retention_plan(cluster=c, now=NOW).decisions}
    assert plan[h.f3.pk].expires_on.isoformat() == "2026-08-01"  # only time keeps it
    assert plan[h.f4.pk].expires_on is None  # the newest chain is never removed
    assert plan[h.f3.pk].note.startswith("expires on 2026-08-01")

    # keep_weekly: ISO weeks back from this one (W25); F3 is in W21, the fifth week back.
    policy(c, keep_full=0, keep_weekly=4)
    assert h.f3.pk in decided(c)[0]
    policy(c, keep_full=0, keep_weekly=5)
    removed, kept = decided(c)
    assert "newest full of week 2026-W21 (keep_weekly 5)" in kept[h.f3.pk]
    assert h.f2.pk in removed  # W19

    # keep_daily: calendar days back from today; 36 days reach 13 May (F3), not 4 May (F2).
    policy(c, keep_full=0, keep_daily=36)
    removed, kept = decided(c)
    assert "newest full of 2026-05-20 (keep_daily 36)" in kept[h.f3.pk]
    assert {h.f2.pk, h.i2.pk, h.f1.pk, h.i1.pk} <= set(removed)

    # keep_days is a floor: 130 days reach February, and nothing younger goes, failed or not.
    policy(c, keep_full=0, keep_days=130)
    removed, kept = decided(c)
    assert removed == {}
    assert "a failed set younger than keep_days (130 days)" in kept[h.x.pk]
    policy(c, keep_full=0, keep_days=60)
    removed, kept = decided(c)
    assert set(removed) == {h.f1.pk, h.i1.pk, h.x.pk}

    # A hold on an incremental keeps its whole chain; a pending restore request keeps its set.
    policy(c)
    backup_set_hold(backup_set=h.i2, actor=make_user("operator"), reason="legal hold 7")
    request = file_request(c, h.f3)
    removed, kept = decided(c)
    assert set(kept) == {h.f2.pk, h.i2.pk, h.f3.pk, h.f4.pk, h.i4.pk}
    assert f"set {h.i2.pk} is on hold" in kept[h.f2.pk] and "legal hold 7" in kept[h.f2.pk]
    assert f"named by restore request {request.pk} (pending_approval)" in kept[h.f3.pk]
    # Without the hold, a point-in-time request into that chain keeps it just the same.
    backup_set_release(backup_set=h.i2, actor=make_user("admin"))
    assert h.f2.pk in decided(c)[0]
    h.i2.refresh_from_db()
    pitr = restore_request_file(
        cluster=c,
        requester=make_user("operator"),
        at=h.i2.consistent_at,
        target="side",
        reason="roll forward",
    )
    removed, kept = decided(c)
    assert f"set {h.f2.pk} is named by restore request {pitr.pk}" in kept[h.i2.pk]

    # A set still pending (and the chain it would extend) is never removed.
    pending = backup_start(cluster=c, actor=make_user("operator"))
    removed, kept = decided(c)
    assert kept[pending.pk].startswith(f"set {pending.pk} is pending")

    # Every decision above was a plan; a dry run of the command changes nothing either.
    result = retention_apply(cluster=c, dry_run=True, now=NOW)
    assert result.dry_run and {d.set_id for d in result.removed} == {h.f1.pk, h.i1.pk, h.x.pk}
    assert {s.pk: objects_of(s) for s in h.succeeded} == before
    assert set(BackupSet.objects.filter(cluster=c).values_list("status", flat=True)) == {
        "succeeded",
        "failed",
        "pending",
    }
    assert not AuditEvent.objects.filter(action="backup.expired").exists()


def test_apply_removes_whole_chains_from_file_storage_and_kept_chains_still_restore(
    history, mariadb_servers, run_jobs
):
    h = history
    c = h.cluster
    policy(c)
    backup_set_hold(backup_set=h.i2, actor=make_user("operator"), reason="audit")
    request = file_request(c, h.f3)
    store = set_storage(h.f1)
    stored_before = sum(i.size for i in store.list(f"{c.name}/"))

    result = retention_apply(cluster=c, now=NOW)

    assert {d.set_id for d in result.removed} == {h.f1.pk, h.i1.pk, h.x.pk}
    assert result.errors == []
    for gone in (h.f1, h.i1, h.x):
        gone.refresh_from_db()
        assert gone.status == "expired" and gone.expiring_since is not None
        assert objects_of(gone) == []
        assert not (store.root / gone.object_prefix).exists()
        events = AuditEvent.objects.filter(action="backup.expired", object_id=str(gone.pk))
        assert events.count() == 1
        assert events.get().details["reason"]
    for kept in (h.f2, h.i2, h.f3, h.f4, h.i4):
        kept.refresh_from_db()
        assert kept.status == "succeeded" and objects_of(kept)
    stored_after = sum(i.size for i in store.list(f"{c.name}/"))
    assert result.bytes_freed == stored_before - stored_after > 0
    print(f"\nstorage freed: {result.bytes_freed} of {stored_before} bytes")  # noqa: T201

    # A second run has nothing left to do (no second audit event, nothing reported removed).
    again = retention_apply(cluster=c, now=NOW)
    assert again.removed == [] and AuditEvent.objects.filter(action="backup.expired").count() == 3

    # The hold released and the request rejected, their chains go too; the newest stays.
    backup_set_release(backup_set=h.i2, actor=make_user("admin"))
    restore_request_reject(request=request, approver=make_user("approver"), comment="no")
    third = retention_apply(cluster=c, now=NOW)
    assert {d.set_id for d in third.removed} == {h.f2.pk, h.i2.pk, h.f3.pk}
    assert [s.pk for s in BackupSet.objects.filter(cluster=c, status="succeeded")] == [
        h.i4.pk,
        h.f4.pk,
    ]
    # An expired set can no longer be restored; the kept chain still restores, checksums and all.
    with pytest.raises(RestoreError, match="expired"):
        file_request(c, h.f2)
    restore = file_request(c, h.f4)
    approve(restore)
    run = restore_run_start(request=restore, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded" and run.q == 1.0, run.error
    for shard in c.shards.select_related("instance"):
        server_for(mariadb_servers, shard.instance).execute(
            f"DROP DATABASE IF EXISTS `{shard.database}__r{restore.pk}`"
        )


class _FailingOnce:
    """A real storage whose first prefix deletion dies after deleting one object (a worker
    killed mid-removal); everything else goes to the real storage."""

    def __init__(self, storage, state):
        self._storage, self._state = storage, state

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def delete_prefix(self, prefix):
        if not self._state["failed"]:
            self._state["failed"] = True
            first = next(iter(self._storage.list(prefix)))
            self._storage.delete(first.key)
            raise OSError("worker killed")
        return self._storage.delete_prefix(prefix)


def test_an_interrupted_removal_is_finished_by_the_next_run_and_never_reported_before(
    cluster, run_jobs, mariadb_servers, monkeypatch
):
    f1 = take(cluster, "full", run_jobs, mariadb_servers)
    i1 = take(cluster, "incremental", run_jobs, mariadb_servers)
    f2 = take(cluster, "full", run_jobs, mariadb_servers)
    move(f1, NOW - timedelta(days=30))
    move(i1, NOW - timedelta(days=29))
    move(f2, NOW - timedelta(days=1))
    policy(cluster)
    state = {"failed": False}
    real = retention_module.set_all_targets
    monkeypatch.setattr(
        retention_module,
        "set_all_targets",
        lambda s: [(name, _FailingOnce(store, state)) for name, store in real(s)],
    )

    first = retention_apply(cluster=cluster, now=NOW)

    # The incremental (removed first) broke half-way; its full waits for it. Neither is done.
    assert first.removed == []
    assert [e["set"] for e in first.errors] == [i1.pk, f1.pk]
    assert "worker killed" in first.errors[0]["error"]
    for s in (f1, i1):
        s.refresh_from_db()
        assert s.status == "succeeded" and s.expiring_since is not None
    assert objects_of(f1) and objects_of(i1)
    assert not AuditEvent.objects.filter(action="backup.expired").exists()
    # Whatever the rules say meanwhile (a hold is refused: it is being removed), it finishes.
    with pytest.raises(Exception, match="removed by retention"):
        backup_set_hold(backup_set=f1, actor=make_user("operator"))
    removed, kept = decided(cluster)
    assert "finishing a removal begun at" in removed[f1.pk]

    second = retention_apply(cluster=cluster, now=NOW)
    assert [d.set_id for d in second.removed] == [i1.pk, f1.pk] and second.errors == []
    for s in (f1, i1):
        s.refresh_from_db()
        assert s.status == "expired" and objects_of(s) == []
    assert AuditEvent.objects.filter(action="backup.expired").count() == 2
    f2.refresh_from_db()
    assert f2.status == "succeeded" and objects_of(f2)


def test_removal_deletes_every_object_from_s3(
    cluster,
    run_jobs,
    mariadb_servers,
    settings,
    s3_env,  # noqa: F811
):
    settings.STORAGE_URL = f"s3://{s3_env['bucket']}/backups"
    settings.S3_ENDPOINT_URL = s3_env["url"]
    f1 = take(cluster, "full", run_jobs, mariadb_servers)
    i1 = take(cluster, "incremental", run_jobs, mariadb_servers)
    f2 = take(cluster, "full", run_jobs, mariadb_servers)
    for s, days in ((f1, 20), (i1, 19), (f2, 1)):
        move(s, NOW - timedelta(days=days))
    policy(cluster)

    def keys(prefix):
        pages = s3_env["client"].get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in pages.paginate(Bucket=s3_env["bucket"], Prefix=f"backups/{prefix}/")
            for item in page.get("Contents", [])
        ]

    assert keys(f1.object_prefix) and keys(i1.object_prefix) and keys(f2.object_prefix)
    result = retention_apply(cluster=cluster, now=NOW)
    assert {d.set_id for d in result.removed} == {f1.pk, i1.pk}
    assert keys(f1.object_prefix) == [] and keys(i1.object_prefix) == []
    assert keys(f2.object_prefix)  # the kept set's objects are all there
    assert result.bytes_freed > 0 and result.objects_deleted >= 3


def test_retention_apply_command_prints_each_decision_with_its_reason(
    cluster, run_jobs, mariadb_servers, capsys
):
    now = timezone.now()
    f1 = take(cluster, "full", run_jobs, mariadb_servers)
    f2 = take(cluster, "full", run_jobs, mariadb_servers)
    move(f1, now - timedelta(days=10))
    policy(cluster)

    call_command("retention", "apply", cluster.name, "--dry-run", "--json")
    dry = json.loads(capsys.readouterr().out)
    assert dry["cluster"] == cluster.name and dry["dry_run"] is True
    assert [r["set"] for r in dry["removed"]] == [f1.pk]
    assert [k["set"] for k in dry["kept"]] == [f2.pk] and dry["kept"][0]["reason"]
    assert objects_of(f1)

    call_command("retention", "apply", cluster.name, "--json")
    done = json.loads(capsys.readouterr().out)
    assert done["dry_run"] is False and [r["set"] for r in done["removed"]] == [f1.pk]
    assert objects_of(f1) == []

    call_command("retention", "apply", cluster.name)
    assert "0 set(s) removed, 1 kept" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        call_command("retention", "apply", "no-such-cluster")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "no cluster named 'no-such-cluster'"


def test_housekeeping_applies_retention_daily_to_every_cluster_on_its_own(tmp_path, settings):
    assert queue.PERIODIC["retention"].every() == 24 * 3600
    assert queue.PERIODIC["retention"].path == "backups.services.retention.retention_apply_all"
    old = timezone.now() - timedelta(days=40)
    results = {}
    for name, url in (("a-broken", "file://relative/path"), ("b-fine", settings.STORAGE_URL)):
        c = make_cluster([], name=name)
        policy(c, keep_days=7)
        failed = BackupSet.objects.create(
            cluster=c, status="failed", storage_url=url, object_prefix=f"{name}/1"
        )
        move(failed, old)
        results[name] = failed
    store = set_storage(results["b-fine"])
    store.put_bytes("b-fine/1/s00/leftover.tsv.zst", b"partial")

    done = retention_apply_all()

    assert done["a-broken"]["errors"] and done["a-broken"]["removed"] == []
    assert done["b-fine"]["removed"] == [results["b-fine"].pk]
    assert list(store.list("b-fine/")) == []
    results["a-broken"].refresh_from_db()
    assert results["a-broken"].status == "failed" and results["a-broken"].expiring_since
