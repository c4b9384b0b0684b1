"""Orphan sweep: old orphans deleted, fresh ones kept, objects of sets still in progress (and
of every set the console knows) never touched; on file storage and on moto's S3."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from backups.models import BackupSet
from backups.services.full_backups import backup_start
from backups.services.sets import default_storage
from backups.services.sweep import storage_sweep
from backups.storage.s3 import S3Storage
from console.models import AuditEvent
from tests.backups.test_retention import take
from tests.backups.test_storage import s3_env  # noqa: F401 - fixture
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def age(storage, key: str, hours: float) -> None:
    """Backdate a local object's modification time by `hours`."""
    when = time.time() - hours * 3600
    os.utime(storage._path(key), (when, when))


def keys(storage, prefix: str) -> set[str]:
    return {info.key for info in storage.list(prefix)}


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"sw{unique_name}", tables={"t_order": 30})


def test_sweep_deletes_old_orphans_keeps_fresh_ones_and_never_touches_sets_in_progress(
    cluster, run_jobs, mariadb_servers, capsys
):
    done = take(cluster, "full", run_jobs, mariadb_servers)
    # A backup that has started (its set row says where it writes) and written one chunk.
    running = backup_start(cluster=cluster, actor=make_user("operator"))
    assert running.status == "pending"
    store = default_storage()
    c = cluster.name
    running_key = f"{running.object_prefix}/s00/{c}_00/t_order/chunk-000001.tsv.zst"
    store.put_bytes(running_key, b"rows being written")
    old_orphans = [f"{c}/99999/s00/{c}_00/t_order/chunk-000001.tsv.zst", f"{c}/stray.tmp"]
    fresh_orphan = f"{c}/99998/manifest.json"
    other_cluster = "not-a-cluster/1/manifest.json"  # not under any registered cluster
    for key in [*old_orphans, fresh_orphan, other_cluster]:
        store.put_bytes(key, b"left behind")
    for key in [*old_orphans, running_key, other_cluster, *keys(store, f"{done.object_prefix}/")]:
        age(store, key, 48)
    age(store, fresh_orphan, 2)
    done_keys = keys(store, f"{done.object_prefix}/")

    call_command("storage", "sweep", "--dry-run", "--json")
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and dry["deleted"] == 0
    assert sorted(o["key"] for o in dry["orphans"]) == sorted(old_orphans)
    assert all(o["target"] == "default" and o["age_hours"] >= 47.9 for o in dry["orphans"])
    assert all(store.exists(k) for k in old_orphans)

    call_command("storage", "sweep", "--cluster", c, "--json")
    swept = json.loads(capsys.readouterr().out)
    assert swept["dry_run"] is False and swept["deleted"] == 2
    assert not any(store.exists(k) for k in old_orphans)
    assert store.exists(fresh_orphan)  # younger than the 24 h grace
    assert store.exists(running_key)  # a set in progress: never touched
    assert keys(store, f"{done.object_prefix}/") == done_keys  # a set's objects: never orphans
    assert store.exists(other_cluster)  # outside every cluster's prefix
    event = AuditEvent.objects.get(action="storage.sweep")
    assert event.details["deleted"] == 2

    # A shorter grace takes the fresh orphan too; the referenced objects still stay.
    call_command("storage", "sweep", "--grace-hours", "1")
    assert "1 orphan(s) found, 1 deleted" in capsys.readouterr().out
    assert not store.exists(fresh_orphan) and store.exists(running_key)


def test_sweep_of_s3_deletes_only_unreferenced_objects_past_the_grace(
    settings,
    s3_env,  # noqa: F811
):
    settings.STORAGE_URL = f"s3://{s3_env['bucket']}/backups"
    settings.S3_ENDPOINT_URL = s3_env["url"]
    cluster = make_cluster([], name="s3sweep")
    kept = BackupSet.objects.create(
        cluster=cluster, status="running", storage_url=settings.STORAGE_URL
    )
    kept.object_prefix = f"s3sweep/{kept.pk}"
    kept.save()
    store = S3Storage(s3_env["bucket"], "backups", endpoint_url=s3_env["url"])
    store.put_bytes(f"{kept.object_prefix}/s00/db/t/chunk-000001.tsv.zst", b"x" * 10)
    store.put_bytes("s3sweep/777/manifest.json", b"{}")
    store.put_bytes("s3sweep/777/s00/db/t/chunk-000001.tsv.zst", b"y" * 100)
    later = timezone.now() + timedelta(hours=30)  # moto cannot backdate; look from later on

    assert storage_sweep(grace_hours=48, now=later).orphans == []
    result = storage_sweep(now=later)
    assert sorted(o.key for o in result.orphans) == [
        "s3sweep/777/manifest.json",
        "s3sweep/777/s00/db/t/chunk-000001.tsv.zst",
    ]
    assert result.deleted == 2 and result.bytes_freed == 102
    listed = s3_env["client"].list_objects_v2(Bucket=s3_env["bucket"], Prefix="backups/")
    assert [o["Key"] for o in listed["Contents"]] == [
        f"backups/{kept.object_prefix}/s00/db/t/chunk-000001.tsv.zst"
    ]


def test_sweep_refuses_bad_arguments_in_one_line(capsys):
    make_cluster([], name="args")
    for argv, message in (
        (["--target", "offsite"], "no storage target named 'offsite' (known: default)"),
        (["--cluster", "nope"], "no cluster named 'nope'"),
        (["--grace-hours", "-1"], "--grace-hours must be zero or more"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            call_command("storage", "sweep", *argv)
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip() == message
