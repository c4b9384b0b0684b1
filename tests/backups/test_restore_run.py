"""Restore runs end to end: each target kind, inplace safety, resume after a crash."""

from __future__ import annotations

import os
import signal
import time

import django_rq
import psutil
import pytest
from django.core import mail

from backups.engine.checksum import table_checksum
from backups.engine.mysql import connect, quote_ident
from backups.models import BackupPolicy, LoadedChunk, RestoreRun
from backups.services import restore_runs as executor
from backups.services.connection_slots import ConnectionSlots, SlotNeed, slots_in_use
from backups.services.restore_plan import old_table
from backups.services.restore_requests import restore_request_approve
from backups.services.restore_run_states import restore_run_cancel, restore_run_start
from backups.services.restore_runs import restore_runs_resume_stale
from backups.storage import storage_from_url
from shards.models import Instance, LogicalTable
from tests.backups.test_restore_rules import file_request, make_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)
COLUMNS = ["id", "shard", "amount", "note", "created_at"]


def checksum_of(server, database: str, table: str) -> tuple[int, str]:
    conn = connect(server.endpoint, database)
    try:
        return table_checksum(conn, database, table, COLUMNS)
    finally:
        conn.close()


def tables_of(server, database: str) -> set[str]:
    return {
        row[0]
        for row in server.execute(
            f"SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{database}'"
        )
    }


def approve(request, count: int = 1):
    for _ in range(count):
        restore_request_approve(request=request, approver=make_user("approver"))
    request.refresh_from_db()
    assert request.state == "approved"


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    cluster = make_cluster(
        mariadb_servers[:2],
        name=f"rx{unique_name}",
        tables={"t_order_0": 30, "t_order_1": 25, "t_user": 10},
    )
    LogicalTable.objects.create(cluster=cluster, name="t_order", pattern=r"t_order_[0-9]+")
    for shard, server in shard_servers(cluster, mariadb_servers):
        server.execute(
            "CREATE TRIGGER trg_note BEFORE INSERT ON t_order_0 FOR EACH ROW"
            " SET NEW.note = IFNULL(NEW.note, 'from trigger')",
            database=shard.database,
        )
    return cluster


def triggers_of(server, database: str) -> set[tuple[str, str]]:
    return set(
        server.execute(
            "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS"
            f" WHERE TRIGGER_SCHEMA = '{database}'"
        )
    )


def shard_servers(cluster, servers):
    return [(s, server_for(servers, s.instance)) for s in cluster.shards.select_related("instance")]


def test_side_restore_of_a_logical_table_matches_the_backup(cluster, mariadb_servers, run_jobs):
    backup_set = make_backup(cluster, run_jobs)
    expected = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1")
    }
    request = file_request(cluster, backup_set, tables=["t_order"], target="side")
    approve(request)
    run = restore_run_start(request=request, actor=make_user("operator"))
    assert run.job_id == f"restore-{run.pk}"
    run_jobs("restores")
    run.refresh_from_db()
    request.refresh_from_db()
    assert (request.state, run.status) == ("succeeded", "succeeded"), run.error
    assert run.q == 1.0 and (run.t, run.d, run.a) == (1.0, 1.0, 1.0)
    for shard, server in shard_servers(cluster, mariadb_servers):
        side = f"{shard.database}__r{request.pk}"
        assert tables_of(server, side) == {"t_order_0", "t_order_1"}  # t_user not in scope
        assert triggers_of(server, side) == {("trg_note", "t_order_0")}
        for table in ("t_order_0", "t_order_1"):
            assert checksum_of(server, side, table) == expected[(shard.name, table)]
        server.execute(f"DROP DATABASE {quote_ident(side)}")
    results = list(run.results.all())
    assert len(results) == 4 and all(r.checksum_ok for r in results)
    assert sum(r.rows for r in results) == 2 * (30 + 25)


def test_instance_target_restores_a_shard_onto_a_replacement_server(
    cluster, mariadb_servers, run_jobs
):
    spare = mariadb_servers[2]
    Instance.objects.create(
        cluster=cluster, name="spare", host="127.0.0.1", port=spare.endpoint.port, user="root"
    )
    backup_set = make_backup(cluster, run_jobs)
    shard = cluster.shards.select_related("instance").get(name="s01")
    source = server_for(mariadb_servers, shard.instance)
    expected = {
        t: checksum_of(source, shard.database, t) for t in ("t_order_0", "t_order_1", "t_user")
    }
    spare.execute(f"DROP DATABASE IF EXISTS {quote_ident(shard.database)}")
    try:
        request = file_request(cluster, backup_set, shards=["s01"], target="instance:spare")
        approve(request)
        run = restore_run_start(request=request, actor=make_user("operator"))
        run_jobs("restores")
        run.refresh_from_db()
        assert run.status == "succeeded", run.error
        assert {t: checksum_of(spare, shard.database, t) for t in expected} == expected
        assert {r.target_instance_name for r in run.results.all()} == {"spare"}
    finally:
        spare.execute(f"DROP DATABASE IF EXISTS {quote_ident(shard.database)}")


def _damage_live_data(cluster, servers):
    for shard, server in shard_servers(cluster, servers):
        server.execute(
            "DELETE FROM t_order_0 WHERE id > 20",
            "UPDATE t_order_1 SET note = 'oops'",
            database=shard.database,
        )


def test_inplace_restore_replaces_live_tables_with_the_backup(cluster, mariadb_servers, run_jobs):
    backup_set = make_backup(cluster, run_jobs)
    expected = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1", "t_user")
    }
    _damage_live_data(cluster, mariadb_servers)
    request = file_request(cluster, backup_set, tables=["t_order"], target="inplace")
    assert any("inplace replaces it" in c["message"] for c in request.plan["conflicts"])
    approve(request, count=2)
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    for shard, server in shard_servers(cluster, mariadb_servers):
        for table in ("t_order_0", "t_order_1", "t_user"):
            assert checksum_of(server, shard.database, table) == expected[(shard.name, table)]
        assert tables_of(server, shard.database) == {
            "t_order_0",
            "t_order_1",
            "t_user",
        }  # no shadows left
        # The old tables took their triggers along; the backup's trigger is back on the live table.
        assert triggers_of(server, shard.database) == {("trg_note", "t_order_0")}


def test_inplace_verification_failure_leaves_live_tables_exactly_as_they_were(
    cluster, mariadb_servers, run_jobs
):

    backup_set = make_backup(cluster, run_jobs)
    _damage_live_data(cluster, mariadb_servers)
    before = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1")
    }
    request = file_request(cluster, backup_set, tables=["t_order"], target="inplace")
    approve(request, count=2)
    # Corrupt one chunk after approval, keeping its size: only its sha256 can tell.
    storage = storage_from_url(backup_set.storage_url)
    victim = request.plan["tables"][-1]
    key = next(
        info.key
        for info in storage.list(backup_set.object_prefix)
        if f"/{victim['table']}/chunk-" in info.key and f"/{victim['shard']}/" in info.key
    )
    data = bytearray(b"".join(storage.get_stream(key)))
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    request.refresh_from_db()
    assert (request.state, run.status) == ("failed", "failed")
    assert "live tables were left untouched" in run.error
    assert run.q < 1 and run.a < 1
    after = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1")
    }
    assert after == before
    for shard, server in shard_servers(cluster, mariadb_servers):
        assert tables_of(server, shard.database) == {
            "t_order_0",
            "t_order_1",
            "t_user",
        }  # shadows dropped
    bad = [r for r in run.results.all() if not r.checksum_ok]
    assert bad and any(key in r.error for r in bad)


def test_inplace_swap_failing_on_a_later_database_says_which_were_already_swapped(
    cluster, mariadb_servers, run_jobs
):
    backup_set = make_backup(cluster, run_jobs)
    expected = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1")
    }
    _damage_live_data(cluster, mariadb_servers)
    damaged = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1")
    }
    request = file_request(cluster, backup_set, tables=["t_order"], target="inplace")
    approve(request, count=2)
    # Databases are swapped in (instance, database) order. A table already holding the name
    # the second database's live table would be renamed to makes that RENAME TABLE fail.
    order = sorted(
        {(e["target_instance_id"], e["target_database"]) for e in request.plan["tables"]}
    )
    assert len(order) == 2
    (_, first_db), (_, second_db) = order
    by_db = {s.database: (s, server) for s, server in shard_servers(cluster, mariadb_servers)}
    blocker = old_table("t_order_0", request.pk)
    second_server = by_db[second_db][1]
    second_server.execute(f"CREATE TABLE {quote_ident(blocker)} (id INT)", database=second_db)
    try:
        run = restore_run_start(request=request, actor=make_user("operator"))
        run_jobs("restores")
        run.refresh_from_db()
        request.refresh_from_db()
        assert (request.state, run.status) == ("failed", "failed")
        assert f"swapping the restored tables into {second_db} failed" in run.error
        assert f"{first_db} had already been swapped and hold the restored data" in run.error
        assert "left untouched" not in run.error
        first_shard, first_server = by_db[first_db]
        second_shard = by_db[second_db][0]
        for table in ("t_order_0", "t_order_1"):
            assert checksum_of(first_server, first_db, table) == expected[(first_shard.name, table)]
            assert (
                checksum_of(second_server, second_db, table) == damaged[(second_shard.name, table)]
            )
        assert tables_of(first_server, first_db) == {"t_order_0", "t_order_1", "t_user"}
    finally:
        second_server.execute(f"DROP TABLE IF EXISTS {quote_ident(blocker)}", database=second_db)


class SimulatedCrash(BaseException):
    """Not an Exception: like a killed worker, nothing in the executor gets to clean up."""


def test_crashed_run_resumes_and_skips_the_chunks_it_finished(
    cluster, mariadb_servers, run_jobs, settings, monkeypatch
):
    settings.BACKUP_CHUNK_ROWS = 4  # several chunks per table
    backup_set = make_backup(cluster, run_jobs)
    expected = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1", "t_user")
    }
    request = file_request(cluster, backup_set, target="side")
    approve(request)
    run = restore_run_start(request=request, actor=make_user("operator"))
    # The enqueued job is not run by a worker here: the first attempt runs in this process
    # and dies after ten chunks were committed and recorded (the first table, 8 chunks,
    # complete; the second partly loaded, perhaps with a chunk committed but not recorded).
    original = executor.ChunkLedger.chunk_done
    calls = {"n": 0}

    def dying_chunk_done(self, key, rows):
        original(self, key, rows)
        calls["n"] += 1
        if calls["n"] == 10:
            raise SimulatedCrash()

    monkeypatch.setattr(executor.ChunkLedger, "chunk_done", dying_chunk_done)
    monkeypatch.setattr(executor, "SHARD_THREADS", 1)
    with pytest.raises(SimulatedCrash):
        executor.restore_run_execute(run=RestoreRun.objects.get(pk=run.pk))
    monkeypatch.setattr(executor.ChunkLedger, "chunk_done", original)
    run.refresh_from_db()
    request.refresh_from_db()
    assert (request.state, run.status) == ("running", "running")
    first_attempt = {c.key: c.pk for c in LoadedChunk.objects.filter(run=run)}
    assert len(first_attempt) >= 10

    # Still beating: `restore run` again refuses to start a second copy.
    settings.JOB_HEARTBEAT_STALE_SECONDS = 3600
    with pytest.raises(Exception, match="already running"):
        restore_run_start(request=request, actor=make_user("operator"))
    # Its heartbeat is stale now: `restore run` resumes the same run.
    settings.JOB_HEARTBEAT_STALE_SECONDS = 0
    resumed = restore_run_start(request=request, actor=make_user("operator"))
    assert resumed.pk == run.pk
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    keys = list(LoadedChunk.objects.filter(run=run).values_list("key", flat=True))
    assert len(keys) == len(set(keys)) == sum(t["chunks"] for t in request.plan["tables"])
    # The first attempt's records of the finished table survive: those chunks were skipped.
    kept = [key for key, pk in first_attempt.items() if LoadedChunk.objects.filter(pk=pk).exists()]
    assert len(kept) >= 8
    for shard, server in shard_servers(cluster, mariadb_servers):
        side = f"{shard.database}__r{request.pk}"
        for table in ("t_order_0", "t_order_1", "t_user"):
            assert checksum_of(server, side, table) == expected[(shard.name, table)]
        server.execute(f"DROP DATABASE {quote_ident(side)}")


def test_plan_estimate_uses_measured_throughput_after_a_run(cluster, mariadb_servers, run_jobs):
    backup_set = make_backup(cluster, run_jobs)
    request = file_request(cluster, backup_set, tables=["t_user"], target="side")
    assert "no history yet" in request.plan["estimate"]
    approve(request)
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    second = file_request(cluster, backup_set, tables=["t_user"], target="side")
    assert "rows/s measured on earlier restores" in second.plan["estimate"]
    assert second.plan["estimate_seconds"] is not None
    for shard, server in shard_servers(cluster, mariadb_servers):
        server.execute(
            f"DROP DATABASE IF EXISTS {quote_ident(shard.database + f'__r{request.pk}')}"
        )


def test_cancelled_inplace_run_leaves_live_tables_and_drops_shadows(
    cluster, mariadb_servers, run_jobs, settings, monkeypatch
):

    settings.BACKUP_CHUNK_ROWS = 4
    backup_set = make_backup(cluster, run_jobs)
    _damage_live_data(cluster, mariadb_servers)
    before = {
        (s.name, t): checksum_of(server, s.database, t)
        for s, server in shard_servers(cluster, mariadb_servers)
        for t in ("t_order_0", "t_order_1", "t_user")
    }
    request = file_request(cluster, backup_set, target="inplace")
    approve(request, count=2)
    operator = make_user("operator")
    run = restore_run_start(request=request, actor=operator)
    original = executor.ChunkLedger.chunk_done
    calls = {"n": 0}

    def cancel_after_three(self, key, rows):
        original(self, key, rows)
        calls["n"] += 1
        if calls["n"] == 3:
            restore_run_cancel(run=RestoreRun.objects.get(pk=run.pk), actor=operator)

    monkeypatch.setattr(executor.ChunkLedger, "chunk_done", cancel_after_three)
    monkeypatch.setattr(executor, "PROGRESS_EVERY_SECONDS", 0.05)  # see the cancel at once
    run_jobs("restores")
    run.refresh_from_db()
    request.refresh_from_db()
    assert (request.state, run.status) == ("cancelled", "cancelled")
    assert "live tables were left untouched" in run.error
    for shard, server in shard_servers(cluster, mariadb_servers):
        assert tables_of(server, shard.database) == {"t_order_0", "t_order_1", "t_user"}
        for table in ("t_order_0", "t_order_1", "t_user"):
            assert checksum_of(server, shard.database, table) == before[(shard.name, table)]


def test_encrypted_set_restores_and_requester_hears_how_it_ended(
    cluster, mariadb_servers, run_jobs
):

    BackupPolicy.objects.create(cluster=cluster, encrypt=True)
    backup_set = make_backup(cluster, run_jobs)
    assert backup_set.encrypted
    requester = make_user("operator")
    requester.email = "requester@example.test"
    requester.save()
    shard = cluster.shards.select_related("instance").get(name="s00")
    server = server_for(mariadb_servers, shard.instance)
    expected = checksum_of(server, shard.database, "t_order_1")
    request = file_request(
        cluster, backup_set, requester=requester, shards=["s00"], tables=["t_order_1"]
    )
    approve(request)
    restore_run_start(request=request, actor=requester)
    run_jobs("restores")
    request.refresh_from_db()
    assert request.state == "succeeded", request.error
    side = f"{shard.database}__r{request.pk}"
    assert checksum_of(server, side, "t_order_1") == expected
    server.execute(f"DROP DATABASE {quote_ident(side)}")
    final = [m for m in mail.outbox if m.to == ["requester@example.test"]][-1]
    assert f"restore {request.pk} succeeded" in final.subject and "Q = 1.000" in final.subject


def test_run_whose_worker_is_killed_is_resumed_by_housekeeping(
    mariadb_servers, unique_name, run_jobs, rq_worker_process, settings
):

    settings.BACKUP_CHUNK_ROWS = 2000
    cluster = make_cluster(mariadb_servers[:2], name=f"rk{unique_name}", tables={"t_big": 200_000})
    backup_set = make_backup(cluster, run_jobs)
    expected = {
        s.name: checksum_of(server, s.database, "t_big")
        for s, server in shard_servers(cluster, mariadb_servers)
    }
    request = file_request(cluster, backup_set, target="side")
    approve(request)
    worker = rq_worker_process("restores")
    run = restore_run_start(request=request, actor=make_user("operator"))
    deadline = time.monotonic() + 60
    while LoadedChunk.objects.filter(run=run).count() < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    # The worker and its work horse (RQ forks it into a session of its own) die mid-run.
    doomed = [worker.pid] + [p.pid for p in psutil.Process(worker.pid).children(recursive=True)]
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    run.refresh_from_db()
    assert run.status == "running"
    done_before = LoadedChunk.objects.filter(run=run).count()
    assert 5 <= done_before < 200

    settings.JOB_HEARTBEAT_STALE_SECONDS = 0
    assert restore_runs_resume_stale() == [run.pk]
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    keys = list(LoadedChunk.objects.filter(run=run).values_list("key", flat=True))
    assert len(keys) == len(set(keys)) == sum(t["chunks"] for t in request.plan["tables"])
    for shard, server in shard_servers(cluster, mariadb_servers):
        side = f"{shard.database}__r{request.pk}"
        conn = connect(server.endpoint, side)
        try:
            assert table_checksum(conn, side, "t_big", COLUMNS) == expected[shard.name]
        finally:
            conn.close()
        server.execute(f"DROP DATABASE {quote_ident(side)}")


def test_run_respects_the_target_servers_connection_slots(
    cluster, mariadb_servers, run_jobs, monkeypatch
):

    backup_set = make_backup(cluster, run_jobs)
    request = file_request(cluster, backup_set, tables=["t_user"], target="side")
    approve(request)
    shard = cluster.shards.select_related("instance").get(name="s00")
    address = f"{shard.instance.host}:{shard.instance.port}"
    redis = django_rq.get_connection("restores")
    other_job = ConnectionSlots(
        redis, {address: SlotNeed(cap=4, minimum=4, wanted=4)}, holder="backup-x"
    )
    assert other_job.try_acquire() == {address: 4}  # another job holds every slot of s00's server
    monkeypatch.setattr(executor, "SLOT_WAIT_SECONDS", 1)
    try:
        run = restore_run_start(request=request, actor=make_user("operator"))
        run_jobs("restores")
        run.refresh_from_db()
        assert (
            run.status == "failed" and f"connection slots of {address} stayed in use" in run.error
        )
        server = server_for(mariadb_servers, shard.instance)
        assert not tables_of(server, f"{shard.database}__r{request.pk}")  # nothing written anywhere
    finally:
        other_job.release()
    assert slots_in_use(redis, address) == 0  # the run released what it held on the other server
