import time
from datetime import timedelta

import django_rq
import pytest
from django.utils import timezone
from rq.job import Job

from backups.models import BackupSet
from backups.services.connection_slots import (
    ConnectionSlots,
    SlotNeed,
    SlotsUnavailable,
    slots_in_use,
)
from backups.services.errors import BackupError, BackupRefused
from backups.services.full_backups import (
    backup_cancel,
    backup_execute,
    backup_start,
    backups_reap_stale,
)
from console.models import AuditEvent
from console.roles import RoleDenied
from tests.factories import make_cluster, make_user


@pytest.mark.django_db
def test_factory_cluster_has_real_rows_on_every_server(mariadb_servers, unique_name):
    cluster = make_cluster(mariadb_servers, name=f"f{unique_name}", shards_per_instance=2)
    shards = list(cluster.shards.select_related("instance"))
    assert len(shards) == 6
    by_port = {s.endpoint.port: s for s in mariadb_servers}
    for shard in shards:
        server = by_port[shard.instance.port]
        assert server.execute("SELECT COUNT(*) FROM t_order", database=shard.database)[0][0] == 20
    assert make_user("operator").groups.filter(name="operator").exists()


# --------------------------------------------------------------------------- start / refuse


@pytest.fixture
def cluster(db, mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"svc{unique_name}")


@pytest.mark.django_db(transaction=True)
def test_backup_start_records_a_pending_set_and_queues_its_job(cluster):
    operator = make_user("operator")
    backup_set = backup_start(cluster=cluster, actor=operator, consistency="lockfree")
    assert backup_set.status == "pending"
    assert backup_set.object_prefix == f"{cluster.name}/{backup_set.pk}"
    assert backup_set.job_id == f"backup-{backup_set.pk}"
    assert sorted(backup_set.shard_backups.values_list("shard_name", flat=True)) == ["s00", "s01"]
    job = Job.fetch(backup_set.job_id, connection=django_rq.get_connection("backups"))
    assert job.origin == "backups" and job.args == (backup_set.pk,)
    assert AuditEvent.objects.filter(action="backup.start", object_id=str(backup_set.pk)).exists()


@pytest.mark.django_db
def test_auditor_and_approver_cannot_start_a_backup(cluster):
    for role in ("auditor", "approver", None):
        with pytest.raises(RoleDenied):
            backup_start(cluster=cluster, actor=make_user(role))
    assert not BackupSet.objects.exists()


@pytest.mark.django_db
def test_bad_options_are_refused_with_one_sentence(cluster):
    with pytest.raises(BackupError, match="consistency"):
        backup_start(cluster=cluster, actor="cli", consistency="sloppy")
    with pytest.raises(BackupError, match="compression level"):
        backup_start(cluster=cluster, actor="cli", compression_level=40)
    assert not BackupSet.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_second_backup_of_a_busy_cluster_is_recorded_failed_and_names_the_first(cluster):
    first = backup_start(cluster=cluster, actor="cli")
    with pytest.raises(BackupRefused, match="already being backed up") as refused:
        backup_start(cluster=cluster, actor="cli")
    second = refused.value.backup_set
    second.refresh_from_db()
    assert second.status == "failed"
    assert f"set {first.pk}" in second.error
    first.refresh_from_db()
    assert first.status == "pending"
    assert AuditEvent.objects.filter(action="backup.refused", object_id=str(second.pk)).exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_starts_let_exactly_one_through(cluster):
    import threading

    from django.db import connection

    outcomes = []

    def start():
        try:
            outcomes.append(backup_start(cluster=cluster, actor="cli").status)
        except BackupRefused as exc:
            outcomes.append(exc.backup_set.status)
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["failed", "failed", "failed", "pending"]
    assert BackupSet.objects.filter(cluster=cluster, status="pending").count() == 1


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_pending_set_cancels_it_at_once_and_drops_its_job(cluster):
    operator = make_user("operator")
    backup_set = backup_start(cluster=cluster, actor=operator)
    backup_set = backup_cancel(backup_set=backup_set, actor=operator)
    assert backup_set.status == "cancelled"
    job = Job.fetch(backup_set.job_id, connection=django_rq.get_connection("backups"))
    assert job.get_status() == "canceled"
    with pytest.raises(BackupError, match="already ended"):
        backup_cancel(backup_set=backup_set, actor=operator)
    with pytest.raises(RoleDenied):
        backup_cancel(backup_set=backup_set, actor=make_user("auditor"))


@pytest.mark.django_db
def test_reaper_fails_a_running_set_without_heartbeat_and_leaves_live_ones(cluster, settings):
    settings.JOB_HEARTBEAT_STALE_SECONDS = 5
    now = timezone.now()
    dead = BackupSet.objects.create(
        cluster=cluster,
        status="running",
        storage_url=settings.STORAGE_URL,
        object_prefix=f"{cluster.name}/dead",
        started_at=now - timedelta(minutes=5),
        heartbeat_at=now - timedelta(seconds=30),
    )
    alive = BackupSet.objects.create(
        cluster=cluster,
        status="running",
        storage_url=settings.STORAGE_URL,
        object_prefix=f"{cluster.name}/alive",
        started_at=now - timedelta(minutes=5),
        heartbeat_at=now - timedelta(seconds=1),
    )
    reaped = backups_reap_stale(now=now)
    assert [s.pk for s in reaped] == [dead.pk]
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert dead.status == "failed"
    assert "worker running this backup stopped (killed or crashed)" in dead.error
    assert alive.status == "running"


# --------------------------------------------------------------------------- connection caps


def test_connection_slots_never_exceed_an_instance_cap(redis_url):
    import redis

    conn = redis.Redis.from_url(redis_url)
    a, b = "127.0.0.1:59999", "127.0.0.1:59998"

    def slots(holder, wanted, ttl=60):
        needs = {a: SlotNeed(cap=4, minimum=2, wanted=wanted), b: SlotNeed(6, 2, wanted)}
        return ConnectionSlots(conn, needs, holder=holder, ttl=ttl)

    first, second, third = slots("job-a", 3), slots("job-b", 3), slots("job-c", 2, ttl=1)
    assert first.try_acquire() == {a: 3, b: 3}
    assert second.try_acquire() == {}  # only one slot left on a: below the minimum of 2
    assert slots_in_use(conn, b) == 3  # all or nothing: nothing taken on b either
    first.release()
    assert second.try_acquire() == {a: 3, b: 3}
    assert third.try_acquire() == {}
    second.release()
    assert third.try_acquire() == {a: 2, b: 2}
    time.sleep(1.2)  # a holder that stops refreshing (a killed worker) loses its slots
    assert slots_in_use(conn, a) == 0
    with pytest.raises(SlotsUnavailable, match="allows 1 connection"):
        ConnectionSlots(conn, {a: SlotNeed(cap=1, minimum=2, wanted=2)}, holder="x")


@pytest.mark.django_db(transaction=True)
def test_a_running_backup_holds_slots_within_each_instance_cap(
    mariadb_servers, unique_name, run_jobs, settings
):
    import threading

    cluster = make_cluster(
        mariadb_servers[:2], name=f"cap{unique_name}", tables={"t": 30_000}, max_connections=3
    )
    settings.BACKUP_CHUNK_ROWS = 500
    conn = django_rq.get_connection("backups")
    addresses = [f"{s.endpoint.host}:{s.endpoint.port}" for s in mariadb_servers[:2]]
    observers = [s.connect() for s in mariadb_servers[:2]]
    slots_seen, connections_seen = [], []
    done = threading.Event()

    def watch():
        while not done.is_set():
            slots_seen.append(max(slots_in_use(conn, a) for a in addresses))
            for observer in observers:
                with observer.cursor() as cur:
                    cur.execute(
                        "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                        " WHERE USER = 'root' AND ID <> CONNECTION_ID()"
                    )
                    connections_seen.append(cur.fetchone()[0])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    backup_set = backup_start(cluster=cluster, actor="cli")
    try:
        run_jobs("backups")
    finally:
        done.set()
        watcher.join()
        for observer in observers:
            observer.close()
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded", backup_set.error
    assert max(slots_seen) == 3  # it took every slot allowed, and never more
    assert 2 <= max(connections_seen) <= 3  # the servers never saw more than the cap
    assert all(slots_in_use(conn, a) == 0 for a in addresses)  # released at the end


@pytest.mark.django_db(transaction=True)
def test_a_backup_that_cannot_be_queued_is_failed_with_the_reason_not_left_pending(
    cluster, settings
):
    from tests.servers import free_port

    for queue in settings.RQ_QUEUES.values():
        queue["URL"] = f"redis://127.0.0.1:{free_port()}/0"
    backup_set = backup_start(cluster=cluster, actor="cli")
    backup_set.refresh_from_db()
    assert backup_set.status == "failed"
    assert "could not be queued" in backup_set.error


@pytest.mark.django_db(transaction=True)
def test_reaper_fails_a_pending_set_only_when_its_queued_job_is_gone(cluster, settings):
    settings.JOB_HEARTBEAT_STALE_SECONDS = 5
    queued = backup_start(cluster=cluster, actor="cli")
    later = timezone.now() + timedelta(minutes=10)
    assert backups_reap_stale(now=later) == []  # still queued: a worker may take it any time
    queued.refresh_from_db()
    assert queued.status == "pending"
    django_rq.get_connection("backups").flushdb()  # Redis lost its queue
    assert [s.pk for s in backups_reap_stale(now=later)] == [queued.pk]
    queued.refresh_from_db()
    assert queued.status == "failed" and "queued job was lost" in queued.error


@pytest.mark.django_db(transaction=True)
def test_a_master_key_that_went_bad_after_start_fails_the_set_with_one_sentence(cluster, settings):
    backup_set = backup_start(cluster=cluster, actor="cli", enqueue=False)
    settings.SHARDVAULT_DATA_KEY = "c2hvcnQ"  # not 32 bytes: cannot sign the manifest
    finished = backup_execute(backup_set=backup_set)  # no traceback out of the worker
    assert finished.status == "failed"
    assert finished.error == ("backup could not start: SHARDVAULT_DATA_KEY must decode to 32 bytes")
