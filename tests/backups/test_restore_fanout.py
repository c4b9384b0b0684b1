"""Restores fan out per target instance (DESIGN.md "Scale-out"): real rqworker processes,
a cluster on three MariaDB instances, real Redis."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack, contextmanager

import psutil
import pytest
import redis as redis_lib
from rq import Worker
from rq.job import Job

from backups import queue
from backups.engine.mysql import quote_ident
from backups.engine.verify import DRILL_PREFIX
from backups.models import BackupPolicy, RestoreTableResult
from backups.selectors.restores import restore_request_as_dict
from backups.services.progress import worker_name
from backups.services.restore_run_states import restore_run_cancel, restore_run_start
from backups.services.verification import verification_start
from console.models import AuditEvent
from tests.backups.test_restore_rules import file_request, make_backup
from tests.backups.test_restore_run import approve, checksum_of, shard_servers
from tests.backups.test_throttle import Sleepers
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)
TABLES = ("t_order_0", "t_user")
STALE_SECONDS = 4


@pytest.fixture
def cluster(mariadb_servers, unique_name, settings):
    settings.BACKUP_CHUNK_ROWS = 4000  # a few chunks per table: the loads take a moment
    cluster = make_cluster(
        mariadb_servers,
        name=f"rf{unique_name}",
        shards_per_instance=2,
        tables={"t_order_0": 20000, "t_user": 6000},
    )
    yield cluster
    for shard, server in shard_servers(cluster, mariadb_servers):
        server.execute(
            *[
                f"DROP DATABASE IF EXISTS {quote_ident(name)}"
                for (name,) in server.execute(
                    "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA"
                    f" WHERE SCHEMA_NAME LIKE '{shard.database}%'"
                )
            ]
        )


@pytest.fixture
def workers(rq_worker_process, redis_url, settings, monkeypatch):
    """Start `count` rqworker processes on `restores` and `verify`; wait until each listens."""
    monkeypatch.setenv("SHARDVAULT_HEARTBEAT_STALE_SECONDS", str(STALE_SECONDS))
    settings.JOB_HEARTBEAT_STALE_SECONDS = STALE_SECONDS

    def start(count: int) -> list:
        procs = [rq_worker_process("restores", "verify") for _ in range(count)]
        conn = redis_lib.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while sum(w.get_state() == "idle" for w in Worker.all(connection=conn)) < count:
            assert time.monotonic() < deadline, "the rqworker processes did not start"
            time.sleep(0.2)
        return procs

    return start


def _start_restore(cluster, run_jobs, backup_set=None):
    backup_set = backup_set or make_backup(cluster, run_jobs)
    request = file_request(cluster, backup_set, target="side", tables=list(TABLES))
    approve(request)
    return request, restore_run_start(request=request, actor=make_user("operator"))


@contextmanager
def _targets_held(cluster, mariadb_servers):
    """Every target server busier than the cluster's max_threads_running, so the restore's
    parts are claimed and then wait at their throttle: a test can cancel or kill them
    mid-run however fast the machine is. The sleeps end when the block does."""
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"max_threads_running": 2})
    with ExitStack() as stack:
        for server in mariadb_servers:
            stack.enter_context(Sleepers(server, 4, 60))
        yield


def _wait_until_final(run, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        run.refresh_from_db()
        if run.status in ("succeeded", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, f"run still {run.status}: {run.progress_text}"
        time.sleep(0.2)


def _assert_side_tables_match(cluster, mariadb_servers, request) -> None:
    for shard, server in shard_servers(cluster, mariadb_servers):
        side = f"{shard.database}__r{request.pk}"
        for table in TABLES:
            assert checksum_of(server, side, table) == checksum_of(server, shard.database, table)


def test_restore_and_drill_spread_over_workers_per_target_instance(
    cluster, mariadb_servers, run_jobs, workers
):
    workers(3)
    request, run = _start_restore(cluster, run_jobs)
    run = _wait_until_final(run)
    assert run.status == "succeeded", run.error

    results = RestoreTableResult.objects.filter(run=run)
    assert results.count() == 6 * len(TABLES)
    assert all(r.status == "succeeded" and r.checksum_ok for r in results)
    # One part per target instance: the shards of one instance share a worker.
    by_instance: dict[str, set[str]] = {}
    for result in results:
        by_instance.setdefault(result.target_instance_name, set()).add(result.worker)
    assert all(len(w) == 1 and "" not in w for w in by_instance.values()), by_instance
    assert len(set().union(*by_instance.values())) >= 2, by_instance
    assert run.rows_done == sum(r.rows for r in results)  # remote parts' rows counted
    shown = restore_request_as_dict(request=request)["results"]  # `restore show --json`
    assert {r["worker"] for r in shown} == set().union(*by_instance.values())
    _assert_side_tables_match(cluster, mariadb_servers, request)

    # A drill of the same set fans out too: one part per target server (no drill instance).
    drill = _wait_until_final(verification_start(backup_set=request.source_set, drill=True))
    assert drill.status == "succeeded", drill.error
    assert drill.q == 1.0 and drill.t == 1.0 and not drill.problems
    finished = AuditEvent.objects.get(action="verification.finish", object_id=str(drill.pk))
    assert len(finished.details["workers"]) >= 2, finished.details
    for server in mariadb_servers:  # every scratch database was dropped
        assert not server.execute(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA"
            f" WHERE SCHEMA_NAME LIKE '{DRILL_PREFIX}{drill.pk}%'"
        )


def test_one_worker_alone_completes_the_restore(cluster, mariadb_servers, run_jobs):
    request, run = _start_restore(cluster, run_jobs)
    started = time.monotonic()
    run_jobs("restores")  # one worker, this process: it runs every part itself, at once
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert time.monotonic() - started < 30
    assert set(RestoreTableResult.objects.filter(run=run).values_list("worker", flat=True)) == {
        worker_name()
    }
    _assert_side_tables_match(cluster, mariadb_servers, request)


def _horse_of_a_remote_part(redis_url, run) -> int | None:
    """The pid of a work horse running a part of `run` for another worker than the owner's."""
    conn = redis_lib.Redis.from_url(redis_url)
    job = Job.fetch(f"restore-{run.pk}", connection=conn)
    if not job.worker_name:
        return None
    owner = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, conn)
    for key in conn.scan_iter(f"shardvault:parts:restore-{run.pk}:*:claim"):
        holder = conn.get(key)
        if holder is None:
            continue
        pid = int(holder.decode().rsplit(":", 1)[1])
        try:
            if psutil.Process(pid).ppid() != owner.pid:
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_killed_part_worker_fails_the_run_within_the_heartbeat_window(
    cluster, mariadb_servers, run_jobs, workers, redis_url
):
    procs = workers(3)
    backup_set = make_backup(cluster, run_jobs)
    with _targets_held(cluster, mariadb_servers):
        request, run = _start_restore(cluster, run_jobs, backup_set)
        deadline = time.monotonic() + 30
        while (horse := _horse_of_a_remote_part(redis_url, run)) is None:
            assert time.monotonic() < deadline, "no other worker took a part"
            time.sleep(0.05)
        worker = psutil.Process(horse).ppid()
        os.kill(horse, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        assert worker in {p.pid for p in procs}

        run = _wait_until_final(run, timeout=STALE_SECONDS + 20)
        assert time.monotonic() - killed < STALE_SECONDS + 5
    request.refresh_from_db()
    assert (run.status, request.state) == ("failed", "failed")
    assert "stopped beating" in run.error and str(horse) in run.error
    # Nothing of it looks complete: no table is reported restored.
    assert not RestoreTableResult.objects.filter(run=run, status="succeeded").exists()


def test_cancel_reaches_the_parts_on_other_workers(
    cluster, mariadb_servers, run_jobs, workers, redis_url
):
    workers(3)
    backup_set = make_backup(cluster, run_jobs)
    with _targets_held(cluster, mariadb_servers):
        request, run = _start_restore(cluster, run_jobs, backup_set)
        deadline = time.monotonic() + 30
        while _horse_of_a_remote_part(redis_url, run) is None:
            assert time.monotonic() < deadline, "no other worker took a part"
            time.sleep(0.05)
        restore_run_cancel(run=run, actor=make_user("operator"))
        asked = time.monotonic()

        run = _wait_until_final(run, timeout=30)
        assert time.monotonic() - asked < 10
    request.refresh_from_db()
    assert (run.status, request.state) == ("cancelled", "cancelled"), run.error
    # Every part stopped: none of their jobs still runs, and none reports a table restored.
    part_jobs = [
        f"restore-{run.pk}-part-i{pk}" for pk in {s.instance_id for s in cluster.shards.all()}
    ]
    assert not [j for j in part_jobs if queue.job_status(j, queue=queue.RESTORES) == "started"]
    assert not RestoreTableResult.objects.filter(run=run, status="succeeded").exists()
