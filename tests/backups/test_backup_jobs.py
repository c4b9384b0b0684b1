"""Backups on a real RQ worker process: killed worker, cancel, concurrent refusal, dead shard."""

import os
import signal
import time

import psutil
import pytest

from backups.models import BackupSet
from backups.services.errors import BackupRefused
from backups.services.full_backups import backup_cancel, backup_start, backups_reap_stale
from backups.storage import storage_from_url
from shards.models import Instance, Shard
from tests.factories import make_cluster, make_user
from tests.servers import free_port

STALE_SECONDS = 3


@pytest.fixture
def slow_worker(rq_worker_process, monkeypatch, settings):
    """A real worker whose backups take several seconds: many small chunks, fast heartbeats."""
    settings.JOB_HEARTBEAT_STALE_SECONDS = STALE_SECONDS
    # zstd level 19 (chosen when the set is filed) keeps the dump busy for several seconds
    # however fast reading has become, so kills and cancels land mid-run.
    settings.BACKUP_COMPRESSION_LEVEL = 19
    monkeypatch.setenv("SHARDVAULT_CHUNK_ROWS", "1000")
    monkeypatch.setenv("SHARDVAULT_HEARTBEAT_STALE_SECONDS", str(STALE_SECONDS))
    return lambda: rq_worker_process("backups")


@pytest.fixture
def big_cluster(mariadb_servers, unique_name):
    return make_cluster(
        mariadb_servers,
        name=f"job{unique_name}",
        tables={"t_order": 150_000, "t_user": 50_000},
        max_connections=2,
    )


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def running_with_progress(backup_set):
    def check():
        backup_set.refresh_from_db()
        assert backup_set.status in ("pending", "running"), backup_set.error
        return backup_set.status == "running" and backup_set.rows_done > 0

    return check


def stored_files(settings, backup_set) -> list[str]:
    """Objects left under the set's prefix, as storage lists them."""
    storage = storage_from_url(settings.STORAGE_URL)
    return [info.key for info in storage.list(backup_set.object_prefix + "/")]


@pytest.mark.django_db(transaction=True)
def test_killed_worker_leaves_the_set_failed_never_running_or_succeeded(
    big_cluster, slow_worker, settings
):
    worker = slow_worker()
    backup_set = backup_start(cluster=big_cluster, actor="cli")
    wait_for(running_with_progress(backup_set), 60, "the backup to make progress")
    # SIGKILL the worker and its work horse (RQ puts the horse in a process group of its own).
    processes = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    assert len(processes) >= 2, "the worker should be running the job in a work horse"
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
    worker.wait()
    psutil.wait_procs(processes, timeout=5)

    backup_set.refresh_from_db()
    assert backup_set.status == "running"  # nobody is left to say otherwise...

    def reaped():
        backups_reap_stale()  # what `backups list`, the pages and housekeeping call
        backup_set.refresh_from_db()
        return backup_set.status != "running"

    wait_for(reaped, 5 * STALE_SECONDS, "the reaper to notice the dead worker")
    assert backup_set.status == "failed"
    assert "worker running this backup stopped (killed or crashed)" in backup_set.error
    assert stored_files(settings, backup_set) == []  # partial chunks deleted
    assert set(backup_set.shard_backups.values_list("status", flat=True)) == {"failed"}
    # The cluster is free again.
    assert backup_start(cluster=big_cluster, actor="cli").status == "pending"


@pytest.mark.django_db(transaction=True)
def test_killed_work_horse_under_a_live_worker_fails_the_set_at_once(
    big_cluster, slow_worker, settings
):
    worker = slow_worker()
    settings.JOB_HEARTBEAT_STALE_SECONDS = 600  # so only RQ's own verdict can fail it quickly
    backup_set = backup_start(cluster=big_cluster, actor="cli")
    wait_for(running_with_progress(backup_set), 60, "the backup to make progress")
    horses = psutil.Process(worker.pid).children(recursive=True)
    assert horses, "the worker should be running the job in a work horse"
    for horse in horses:
        os.kill(horse.pid, signal.SIGKILL)

    def reaped():
        backups_reap_stale()
        backup_set.refresh_from_db()
        return backup_set.status != "running"

    wait_for(reaped, 20, "the set to be failed after its work horse died")
    assert backup_set.status == "failed"
    assert "worker running this backup stopped (killed or crashed)" in backup_set.error
    assert worker.poll() is None  # the worker itself lives on


@pytest.mark.django_db(transaction=True)
def test_cancel_stops_a_running_backup_within_seconds_and_refuses_a_second_meanwhile(
    big_cluster, slow_worker, settings
):
    slow_worker()
    operator = make_user("operator")
    backup_set = backup_start(cluster=big_cluster, actor=operator)
    wait_for(running_with_progress(backup_set), 60, "the backup to make progress")

    with pytest.raises(BackupRefused, match="already being backed up"):
        backup_start(cluster=big_cluster, actor=operator)

    backup_cancel(backup_set=backup_set, actor=operator)
    asked = time.monotonic()

    def ended():
        backup_set.refresh_from_db()
        return not backup_set.is_active

    wait_for(ended, 15, "the job to stop after cancel")
    assert backup_set.status == "cancelled", backup_set.error
    assert time.monotonic() - asked < 15
    assert stored_files(settings, backup_set) == []
    assert backup_set.rows == 0  # never reported as a usable backup


@pytest.mark.django_db(transaction=True)
def test_unreachable_shard_fails_the_set_before_locking_and_names_the_shard(
    mariadb_servers, unique_name, run_jobs
):
    cluster = make_cluster(mariadb_servers[:2], name=f"dead{unique_name}")
    ghost = Instance.objects.create(
        cluster=cluster, name="ghost", host="127.0.0.1", port=free_port(), user="root"
    )
    Shard.objects.create(cluster=cluster, name="s99", instance=ghost, database="nothing_here")
    backup_set = backup_start(cluster=cluster, actor="cli")
    run_jobs("backups")
    backup_set.refresh_from_db()
    assert backup_set.status == "failed"
    assert "s99" in backup_set.error and "ghost" in backup_set.error
    assert "unreachable" in backup_set.error
    assert backup_set.shard_backups.get(shard_name="s99").error
    # Nothing was locked: the live shards still take writes at once.
    server = mariadb_servers[0]
    database = cluster.shards.get(name="s00").database
    server.execute(
        "INSERT INTO t_user (id, shard, amount, created_at) VALUES (999999, 'x', 1, NOW())",
        database=database,
    )


@pytest.mark.django_db(transaction=True)
def test_job_is_idempotent_a_finished_set_is_left_alone(mariadb_servers, unique_name, run_jobs):
    cluster = make_cluster(mariadb_servers[:1], name=f"idem{unique_name}")
    operator = make_user("operator")
    backup_set = backup_start(cluster=cluster, actor=operator)
    backup_cancel(backup_set=backup_set, actor=operator)
    from backups.jobs.backups import run_backup_job

    assert run_backup_job(backup_set.pk) == "cancelled"
    backup_set.refresh_from_db()
    assert backup_set.status == "cancelled" and backup_set.started_at is None
    assert BackupSet.objects.filter(cluster=cluster).count() == 1


@pytest.mark.django_db(transaction=True)
def test_reap_job_fails_dead_sets_leaves_live_ones_alone_and_rearms_itself(
    mariadb_servers, unique_name, settings
):
    import django_rq
    from django.utils import timezone

    from backups import queue as job_queue
    from backups.jobs.housekeeping import periodic_job

    settings.JOB_HEARTBEAT_STALE_SECONDS = 15
    cluster = make_cluster(mariadb_servers[:1], name=f"hk{unique_name}", tables={})
    other = make_cluster(mariadb_servers[1:2], name=f"hl{unique_name}", tables={})
    dead = backup_start(cluster=cluster, actor="cli")
    live = backup_start(cluster=other, actor="cli")  # pending and healthy: never reaped
    BackupSet.objects.filter(pk=dead.pk).update(
        status="running", heartbeat_at=timezone.now() - timezone.timedelta(minutes=5)
    )
    queue = django_rq.get_queue(job_queue.DEFAULT)
    queue.connection.delete(job_queue.PERIODIC["reap"].gate_key)
    for job_id in queue.scheduled_job_registry.get_job_ids():
        queue.scheduled_job_registry.remove(job_id)
    assert periodic_job("reap")["backups_failed"] == [dead.pk]
    dead.refresh_from_db()
    live.refresh_from_db()
    assert dead.status == "failed" and "stopped (killed or crashed)" in dead.error
    assert live.status == "pending"
    assert queue.scheduled_job_registry.get_job_ids()  # next round scheduled on `default`
