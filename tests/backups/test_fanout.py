"""Fan-out of full backups over several RQ workers with one exact cut (DESIGN.md "Scale-out").

Real MariaDB x3, real Redis, real `rqworker` processes. The owner of a set enqueues one
part per instance; parts on other workers take part in the Redis barrier of the cut, the
owner writes the manifest. What a user notices: every shard names the worker that dumped
it, a locked set holds a gap-free sequence read straight from its stored chunks, a killed
part fails the set within the heartbeat window leaving nothing locked and nothing stored,
a part nobody runs trips the barrier's timeout, and cancel stops every part.
"""

from __future__ import annotations

import json
import os
import signal
import time
from io import StringIO

import psutil
import pytest
import zstandard
from django.core.management import call_command
from django.urls import reverse
from rq import Worker

from backups import queue
from backups.engine.manifest import manifest_read
from backups.models import BackupSet
from backups.services.full_backups import (
    backup_cancel,
    backup_execute,
    backup_start,
    backups_reap_stale,
)
from backups.services.sets import set_storage
from console.keys import manifest_hmac_key
from tests.backups.conftest import no_backup_sessions
from tests.backups.test_cold import SequenceWriter, add_sequence_tables, wait_for
from tests.factories import drop_cluster_databases, make_cluster, make_user

STALE_SECONDS = 3


def add_innodb_sequence_tables(cluster, servers) -> list[tuple[object, str]]:
    """The round-robin writer's two tables on every shard, both InnoDB (a locked set)."""
    by_port = {s.endpoint.port: s for s in servers}
    targets = []
    for shard in cluster.shards.select_related("instance").order_by("name"):
        server = by_port[shard.instance.port]
        server.execute(
            "CREATE TABLE seq_m (n BIGINT PRIMARY KEY, pad VARCHAR(60)) ENGINE=InnoDB",
            "CREATE TABLE seq_i (n BIGINT PRIMARY KEY, pad VARCHAR(60)) ENGINE=InnoDB",
            database=shard.database,
        )
        targets.append((server, shard.database))
    return targets


@pytest.fixture
def fanout_env(settings, monkeypatch):
    """Short heartbeats and quick pick-up, in this process and in the worker processes."""
    settings.JOB_HEARTBEAT_STALE_SECONDS = STALE_SECONDS
    settings.PARTS_CLAIM_AFTER_SECONDS = 2.0
    monkeypatch.setenv("SHARDVAULT_HEARTBEAT_STALE_SECONDS", str(STALE_SECONDS))
    monkeypatch.setenv("SHARDVAULT_PARTS_CLAIM_AFTER_SECONDS", "2")
    monkeypatch.setenv("SHARDVAULT_BACKUP_FANOUT", "auto")


@pytest.fixture
def slow_parts(settings, monkeypatch):
    """Dumps that take several seconds (zstd 19, small chunks), on every worker."""
    settings.BACKUP_COMPRESSION_LEVEL = 19
    settings.BACKUP_CHUNK_ROWS = 500
    monkeypatch.setenv("SHARDVAULT_CHUNK_ROWS", "500")


def start_workers(rq_worker_process, count: int) -> list:
    workers = [rq_worker_process("backups") for _ in range(count)]
    wait_for(lambda: queue.idle_workers("backups") >= count, 60, f"{count} idle workers")
    return workers


def wait_ended(backup_set, timeout: float) -> BackupSet:
    def ended():
        backup_set.refresh_from_db()
        return not backup_set.is_active

    wait_for(ended, timeout, f"set {backup_set.pk} to end")
    return backup_set


def numbers_in_chunks(backup_set) -> list[int]:
    """The sequence numbers the set's stored chunks hold, read straight from the objects
    (zstd-decompressed LOAD DATA text: the first field of each line), not by a restore."""
    storage = set_storage(backup_set)
    manifest = manifest_read(storage, backup_set.object_prefix, manifest_hmac_key())
    numbers = []
    for shard in manifest["shards"]:
        for table in shard["tables"]:
            if table["name"] not in ("seq_m", "seq_i"):
                continue
            for chunk in table["chunks"]:
                stored = storage.get_bytes(chunk["key"], expect_sha256=chunk["sha256"])
                text = zstandard.ZstdDecompressor().decompressobj().decompress(stored)
                numbers += [int(line.split(b"\t", 1)[0]) for line in text.splitlines()]
    return numbers


def assert_writable_everywhere(cluster, servers) -> None:
    """Every shard takes a write within a second (no global read lock left anywhere): a
    lock still held fails the insert with a lock wait timeout."""
    by_port = {s.endpoint.port: s for s in servers}
    for shard in cluster.shards.select_related("instance"):
        conn = by_port[shard.instance.port].connect(shard.database)
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION lock_wait_timeout = 1")
                cur.execute(
                    "INSERT INTO t_order (id, shard, amount, created_at) VALUES (999999999, 'probe', 0, NOW())"
                )
                cur.execute("DELETE FROM t_order WHERE id = 999999999")
        finally:
            conn.close()


def horse_pid_of(worker_pid: int) -> int | None:
    children = psutil.Process(worker_pid).children(recursive=True)
    return children[0].pid if children else None


def owner_and_remote_part(backup_set, workers):
    """(the owner's worker, a worker dumping a part for it) once a part dumps rows on a
    worker other than the owner's; None before."""
    backup_set.refresh_from_db()
    assert backup_set.is_active, backup_set.error
    owner_pid = next(
        (
            w.pid
            for w in Worker.all(queue=queue._rq_queue("backups"))
            if w.get_current_job_id() == backup_set.job_id
        ),
        None,
    )
    owner = next((w for w in workers if w.pid == owner_pid), None)
    dumping = [sb.worker for sb in backup_set.shard_backups.all() if sb.rows_done > 0]
    for worker in workers:
        horse = horse_pid_of(worker.pid)
        if owner and worker is not owner and horse:
            if any(name.endswith(f":{horse}") for name in dumping):
                return owner, worker
    return None


def kill_worker(worker) -> None:
    """SIGKILL a worker and its work horse."""
    processes = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(True)]
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
    psutil.wait_procs(processes, timeout=5)


@pytest.mark.django_db(transaction=True)
def test_three_workers_share_a_locked_backup_at_one_gap_free_cut(
    mariadb_servers, unique_name, rq_worker_process, fanout_env, client
):
    cluster = make_cluster(mariadb_servers, name=f"fo{unique_name}", tables={"t_order": 3000})
    targets = add_innodb_sequence_tables(cluster, mariadb_servers)
    try:
        start_workers(rq_worker_process, 3)
        writer = SequenceWriter(targets).start()
        try:
            backup_set = backup_start(cluster=cluster, actor="cli", consistency="locked")
            wait_ended(backup_set, 90)
        finally:
            writer.stop()
        assert backup_set.status == "succeeded", backup_set.error
        # A few milliseconds of lock, however many workers held the snapshots.
        assert 0 < backup_set.lock_window_ms < 1000, backup_set.lock_window_ms

        workers = {sb.shard_name: sb.worker for sb in backup_set.shard_backups.all()}
        assert len(workers) == 3 and all(workers.values()), workers
        assert len(set(workers.values())) >= 2, f"one worker did everything: {workers}"
        out = StringIO()
        call_command("backups", "show", str(backup_set.pk), "--json", stdout=out)
        shown = {s["name"]: s["worker"] for s in json.loads(out.getvalue())["shards"]}
        assert shown == workers
        client.force_login(make_user("auditor"))
        page = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
        assert all(name in page for name in workers.values()), "the set page hides a worker"

        numbers = numbers_in_chunks(backup_set)
        k = len(numbers)
        assert k > 60 and sorted(numbers) == list(range(1, k + 1)), "not a gap-free cut"

        out = StringIO()
        call_command("verify", str(backup_set.pk), "--json", stdout=out)
        verified = json.loads(out.getvalue())
        assert verified["q"] == 1.0, verified
    finally:
        drop_cluster_databases(cluster, mariadb_servers)


@pytest.mark.django_db(transaction=True)
def test_a_cold_set_over_three_workers_holds_the_lock_until_every_part_is_done(
    mariadb_servers, unique_name, rq_worker_process, fanout_env
):
    cluster = make_cluster(mariadb_servers, name=f"fo{unique_name}", tables={"t_order": 3000})
    targets = add_sequence_tables(cluster, mariadb_servers)  # MyISAM and InnoDB
    try:
        start_workers(rq_worker_process, 3)
        writer = SequenceWriter(targets).start()
        try:
            backup_set = backup_start(cluster=cluster, actor="cli", consistency="cold")
            wait_ended(backup_set, 90)
        finally:
            writer.stop()
        assert backup_set.status == "succeeded", backup_set.error
        assert len({sb.worker for sb in backup_set.shard_backups.all()}) >= 2
        numbers = numbers_in_chunks(backup_set)
        k = len(numbers)
        assert k > 60 and sorted(numbers) == list(range(1, k + 1)), "not a gap-free cut"
        # No insert completed between the cut and the end of the last part's dump.
        cut_at = backup_set.consistent_at.timestamp()
        released = cut_at + backup_set.lock_window_ms / 1000.0
        later = [returned for n, _, returned in writer.commits if n > k]
        assert later and min(later) >= released - 0.25
        assert backup_set.lock_sessions == {}
        assert_writable_everywhere(cluster, mariadb_servers)
    finally:
        drop_cluster_databases(cluster, mariadb_servers)


@pytest.mark.django_db(transaction=True)
def test_a_part_whose_worker_is_killed_fails_the_set_and_leaves_nothing(
    mariadb_servers, unique_name, rq_worker_process, fanout_env, slow_parts
):
    cluster = make_cluster(mariadb_servers, name=f"fk{unique_name}", tables={"t_order": 30_000})
    try:
        workers = start_workers(rq_worker_process, 3)
        backup_set = backup_start(cluster=cluster, actor="cli", consistency="locked")
        _, victim = wait_for(
            lambda: owner_and_remote_part(backup_set, workers),
            60,
            "a part dumping on another worker",
        )
        killed_at = time.monotonic()
        kill_worker(victim)
        wait_ended(backup_set, 6 * STALE_SECONDS + 10)
        took = time.monotonic() - killed_at
        assert backup_set.status == "failed"
        assert "part m" in backup_set.error and "stopped beating" in backup_set.error, (
            backup_set.error
        )
        assert took < 3 * STALE_SECONDS + 6, took
        assert list(set_storage(backup_set).list(backup_set.object_prefix + "/")) == []
        assert_writable_everywhere(cluster, mariadb_servers)
        wait_for(
            lambda: not any(no_backup_sessions(s) for s in mariadb_servers),
            10,
            "the parts' sessions to end",
        )
        time.sleep(1.5)  # a part that stopped late must not have written after the failure
        assert list(set_storage(backup_set).list(backup_set.object_prefix + "/")) == []

        again = backup_start(
            cluster=cluster, actor="cli", consistency="locked", compression_level=1
        )
        assert wait_ended(again, 90).status == "succeeded", again.error
    finally:
        drop_cluster_databases(cluster, mariadb_servers)


@pytest.mark.django_db(transaction=True)
def test_parts_stop_when_their_owner_dies_and_the_reaper_fails_the_set(
    mariadb_servers, unique_name, rq_worker_process, fanout_env, slow_parts
):
    cluster = make_cluster(mariadb_servers, name=f"fd{unique_name}", tables={"t_order": 30_000})
    try:
        workers = start_workers(rq_worker_process, 3)
        backup_set = backup_start(cluster=cluster, actor="cli", consistency="lockfree")
        owner, _ = wait_for(
            lambda: owner_and_remote_part(backup_set, workers), 60, "a part on another worker"
        )
        kill_worker(owner)
        # The parts see the owner's heartbeat stop and end their sessions on their own.
        wait_for(
            lambda: not any(no_backup_sessions(s) for s in mariadb_servers),
            3 * STALE_SECONDS + 5,
            "the parts to stop",
        )

        def reaped():
            backups_reap_stale()
            backup_set.refresh_from_db()
            return not backup_set.is_active

        wait_for(reaped, 4 * STALE_SECONDS + 5, "the reaper to fail the set")
        assert backup_set.status == "failed", backup_set.error
        time.sleep(1.5)  # no part writes after the failure deleted the set's objects
        assert list(set_storage(backup_set).list(backup_set.object_prefix + "/")) == []
    finally:
        drop_cluster_databases(cluster, mariadb_servers)


@pytest.mark.django_db(transaction=True)
def test_parts_nobody_runs_trip_the_barrier_timeout_cleanly(
    mariadb_servers, unique_name, settings, fanout_env
):
    settings.BACKUP_FANOUT = "always"
    settings.BACKUP_FANOUT_LOCAL_PARTS = False  # the owner is busy: it may not run parts
    settings.PARTS_CLAIM_AFTER_SECONDS = 0.5
    settings.BACKUP_FANOUT_READY_SECONDS = 2.0
    cluster = make_cluster(mariadb_servers, name=f"fn{unique_name}", tables={"t_order": 100})
    try:
        backup_set = backup_start(cluster=cluster, actor="cli", consistency="locked")
        began = time.monotonic()
        backup_execute(backup_set=backup_set)  # the owner, with no worker for its parts
        backup_set.refresh_from_db()
        assert backup_set.status == "failed"
        names = sorted(cluster.instances.values_list("name", flat=True))
        assert f"part {', '.join(names)} did not report ready" in backup_set.error, backup_set.error
        assert time.monotonic() - began < 2.5 + 2 * STALE_SECONDS + 5
        assert backup_set.lock_window_ms is None
        assert_writable_everywhere(cluster, mariadb_servers)
        assert list(set_storage(backup_set).list(backup_set.object_prefix + "/")) == []
    finally:
        drop_cluster_databases(cluster, mariadb_servers)


@pytest.mark.django_db(transaction=True)
def test_cancel_reaches_every_part_on_other_workers(
    mariadb_servers, unique_name, rq_worker_process, fanout_env, slow_parts
):
    cluster = make_cluster(mariadb_servers, name=f"fc{unique_name}", tables={"t_order": 80_000})
    try:
        start_workers(rq_worker_process, 3)
        backup_set = backup_start(cluster=cluster, actor="operator-cli", consistency="lockfree")

        def every_part_dumping():
            backup_set.refresh_from_db()
            assert backup_set.is_active, backup_set.error
            shards = list(backup_set.shard_backups.all())
            workers = {sb.worker for sb in shards}
            # The set's progress bar sums every part's rows, against every part's estimate.
            summed = backup_set.rows_done > 0 and backup_set.rows_estimate > 60_000
            return all(sb.rows_done > 0 for sb in shards) and len(workers) >= 2 and summed

        wait_for(every_part_dumping, 60, "every part to dump, on two workers, on the set's bar")
        asked = time.monotonic()
        backup_cancel(backup_set=backup_set, actor="cli")
        wait_ended(backup_set, 20)
        assert backup_set.status == "cancelled", backup_set.error
        assert time.monotonic() - asked < 15  # SQLite (the tests' console database) under load
        wait_for(
            lambda: not any(no_backup_sessions(s) for s in mariadb_servers),
            10,
            "every part's sessions to end",
        )
        time.sleep(1.5)
        assert list(set_storage(backup_set).list(backup_set.object_prefix + "/")) == []
    finally:
        drop_cluster_databases(cluster, mariadb_servers)
