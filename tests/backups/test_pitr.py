"""Incremental sets, chains and point-in-time restores through the real services and workers."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from backups.engine.checksum import table_checksum
from backups.engine.mysql import quote_ident
from backups.models import BackupSet, BinlogSegment, RestoreRequest
from backups.selectors.incrementals import aligned_instant, chain_after, recoverable_window
from backups.services.errors import ChainError
from backups.services.full_backups import backup_start
from backups.services.incrementals import incremental_start
from backups.services.pitr import pitr_resolve
from backups.services.sets import backup_set_delete_check, backup_set_expire
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

HOSTILE_DDL = (
    "CREATE TABLE hostile (id INT PRIMARY KEY, s VARCHAR(100) CHARACTER SET utf8mb4 NULL,"
    " bl BLOB NULL, dc DECIMAL(65,30) NULL, dt DATETIME(6) NULL, j JSON NULL, b BIT(64) NULL,"
    " u BIGINT UNSIGNED NULL, d DOUBLE NULL, e ENUM('a','b b') NULL, tm TIME(6) NULL)"
)
HOSTILE_ROW = "INSERT INTO hostile VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


def hostile_values(n: int):
    return (
        n,
        ["", "\\N", "a\tb", "line1\nline2", "quote ' \" `", "nul\x00byte", "😀 𝄞", None][n % 8],
        bytes(range(256))[n % 7 :],
        "-0.000000000000000000000000000001"
        if n % 2
        else "12345678901234567890.123456789012345678901234567891",
        "9999-12-31 23:59:59.999999" if n % 2 else "1000-01-01 00:00:00.000001",
        '{"k": "v\\t\\n", "n": [1, 2.5, null]}',
        (2**64 - 1 - n).to_bytes(8, "big"),
        2**64 - 1 - n,
        [5e-324, 1.7976931348623157e308, -0.0, 0.1][n % 4],
        ["a", "b b", None][n % 3],
        "-838:59:59.000000" if n % 2 else "838:59:59.999999",
    )


def server_for(servers, shard):
    return next(s for s in servers if s.endpoint.port == shard.instance.port)


def run_backup(kind, cluster, run_jobs) -> BackupSet:
    backup_set = backup_start(cluster=cluster, actor=make_user("operator"), kind=kind)
    run_jobs("backups")
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def next_second() -> None:
    now = time.time()
    time.sleep(int(now) + 1 - now + 0.05)


def purge_binlogs(server) -> None:
    """Rotate and purge every older binlog (the server keeps one until InnoDB checkpoints it)."""
    server.execute("FLUSH BINARY LOGS")
    current = server.execute("SHOW MASTER STATUS")[0][0]
    deadline = time.monotonic() + 30
    while len(server.execute("SHOW BINARY LOGS")) > 1:
        assert time.monotonic() < deadline, "the server kept its old binlogs"
        server.execute(f"PURGE BINARY LOGS TO '{current}'")
        time.sleep(0.2)


def checksum_of(server, database, table):
    conn = server.connect(database)
    try:
        return table_checksum(conn, database, table)
    finally:
        conn.close()


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    cluster = make_cluster(mariadb_servers[:2], name=f"pitr{unique_name}", tables={"t_order": 50})
    for shard in cluster.shards.select_related("instance"):
        server = server_for(mariadb_servers, shard)
        conn = server.connect(shard.database)
        with conn.cursor() as cur:
            cur.execute(HOSTILE_DDL)
            cur.executemany(HOSTILE_ROW, [hostile_values(n) for n in range(1, 20)])
        conn.close()
    return cluster


def test_point_in_time_restore_reaches_the_moment_before_an_accidental_delete(
    cluster, mariadb_servers, run_jobs
):
    shards = list(cluster.shards.select_related("instance"))
    full = run_backup("full", cluster, run_jobs)

    # Writes across shards: inserts, updates, deletes, hostile types and a schema change.
    for shard in shards:
        server = server_for(mariadb_servers, shard)
        conn = server.connect(shard.database)
        with conn.cursor() as cur:
            cur.executemany(HOSTILE_ROW, [hostile_values(n) for n in range(100, 140)])
            cur.execute("UPDATE hostile SET s = 'ünïcode\\\\', b = b'1010' WHERE id % 3 = 0")
            cur.execute("DELETE FROM hostile WHERE id BETWEEN 5 AND 9")
            cur.execute(
                "INSERT INTO t_order (id, shard, amount, note, created_at)"
                " SELECT seq, 'new', seq / 7, NULL, NOW(6) FROM seq_1000_to_1200"
            )
            cur.execute("ALTER TABLE t_order ADD COLUMN channel VARCHAR(20) NOT NULL DEFAULT 'web'")
            cur.execute("UPDATE t_order SET channel = 'app', amount = amount + 1 WHERE id % 4 = 0")
            cur.execute("DELETE FROM t_order WHERE id BETWEEN 10 AND 20")
        conn.close()
    first = run_backup("incremental", cluster, run_jobs)
    assert first.parent_id == full.pk and first.kind == "incremental"
    assert BinlogSegment.objects.filter(backup_set=first).count() >= 2
    segment = BinlogSegment.objects.filter(backup_set=first).first()
    assert any(t.endswith(".t_order") for t in segment.tables)

    for shard in shards:
        server_for(mariadb_servers, shard).execute(
            "UPDATE t_order SET note = 'late change' WHERE id = 30", database=shard.database
        )
    next_second()
    at = datetime.now(UTC).replace(microsecond=0)
    references = {}
    for shard in shards:
        server = server_for(mariadb_servers, shard)
        ref = f"{shard.database}_ref"
        server.execute(
            f"DROP DATABASE IF EXISTS {quote_ident(ref)}", f"CREATE DATABASE {quote_ident(ref)}"
        )
        for table in ("t_order", "hostile"):
            server.execute(
                f"CREATE TABLE {quote_ident(ref)}.{table} LIKE {quote_ident(shard.database)}.{table}",
                f"INSERT INTO {quote_ident(ref)}.{table} SELECT * FROM {quote_ident(shard.database)}.{table}",
            )
            references[(shard.name, table)] = checksum_of(server, ref, table)
    next_second()
    for shard in shards:  # the accident
        server_for(mariadb_servers, shard).execute("DELETE FROM t_order", database=shard.database)
    second = run_backup("incremental", cluster, run_jobs)
    assert second.parent_id == first.pk
    assert second.consistent_at >= at

    resolved_full, chain = pitr_resolve(cluster=cluster, at=at)
    assert resolved_full == full and chain == [first, second]
    earliest, latest = recoverable_window(cluster)
    assert earliest == full.consistent_at and latest == second.consistent_at

    from backups.services.restore_requests import (
        restore_request_approve,
        restore_request_file,
    )
    from backups.services.restore_run_states import restore_run_start

    request = restore_request_file(
        cluster=cluster, requester=make_user("operator"), at=at, target="side", reason="undo DELETE"
    )
    restore_request_approve(request=request, approver=make_user("approver"), comment="go")
    run = restore_run_start(
        request=RestoreRequest.objects.get(pk=request.pk), actor=make_user("operator")
    )
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.restored_to == at

    for shard in shards:
        server = server_for(mariadb_servers, shard)
        target = f"{shard.database}__r{request.pk}"
        for table in ("t_order", "hostile"):
            assert checksum_of(server, target, table) == references[(shard.name, table)], (
                shard.name,
                table,
            )
        columns = [row[0] for row in server.execute("SHOW COLUMNS FROM t_order", database=target)]
        assert "channel" in columns
        # The apply's bookkeeping table does not outlive a finished restore.
        assert (
            server.execute("SHOW TABLES LIKE '\\_\\_shardvault\\_applied'", database=target) == []
        )


def test_incremental_needs_a_full_backup_first(cluster):
    with pytest.raises(ChainError, match="run a full backup before incrementals"):
        incremental_start(cluster=cluster, actor="cli")
    # Still recorded, as failed with its reason; never as something restorable.
    refused = BackupSet.objects.get(cluster=cluster)
    assert refused.kind == "incremental" and refused.status == "failed"
    assert "run a full backup before incrementals" in refused.error


def test_a_set_that_others_depend_on_cannot_be_removed_and_the_window_is_bounded(
    cluster, mariadb_servers, run_jobs
):
    full = run_backup("full", cluster, run_jobs)
    shard = cluster.shards.select_related("instance").first()
    server_for(mariadb_servers, shard).execute(
        "UPDATE t_order SET note = 'x' WHERE id = 1", database=shard.database
    )
    incremental = run_backup("incremental", cluster, run_jobs)
    assert chain_after(full) == [incremental]
    with pytest.raises(ChainError, match=f"incremental set {incremental.pk} depends on it"):
        backup_set_delete_check(backup_set=full)
    backup_set_delete_check(backup_set=incremental)  # the newest link may go
    with pytest.raises(ChainError, match="depends on it"):
        backup_set_expire(backup_set=full, actor="cli")
    assert BackupSet.objects.get(pk=full.pk).status == "succeeded"

    too_late = incremental.consistent_at + timedelta(hours=1)
    with pytest.raises(ChainError, match="the newest recoverable point is"):
        pitr_resolve(cluster=cluster, at=too_late)
    with pytest.raises(ChainError, match="no succeeded full backup"):
        pitr_resolve(cluster=cluster, at=full.consistent_at - timedelta(days=1))


def test_incremental_after_purged_binlogs_fails_saying_a_full_backup_is_needed(
    mariadb_servers, unique_name, run_jobs
):
    cluster = make_cluster(mariadb_servers[2:3], name=f"purge{unique_name}", tables={"t_order": 5})
    run_backup("full", cluster, run_jobs)
    server = mariadb_servers[2]
    shard = cluster.shards.first()
    server.execute("UPDATE t_order SET note = 'gone' WHERE id = 1", database=shard.database)
    purge_binlogs(server)

    backup_set = backup_start(cluster=cluster, actor="cli", kind="incremental")
    run_jobs("backups")
    backup_set.refresh_from_db()
    assert backup_set.status == "failed"
    assert "new full backup is needed" in backup_set.error
    assert not BinlogSegment.objects.filter(backup_set=backup_set).exists()


@pytest.mark.parametrize("consistency", ["locked", "lockfree"])
def test_sets_and_incrementals_restore_a_gap_free_sequence_at_a_second(
    mariadb_servers, unique_name, run_jobs, consistency
):
    """DESIGN.md's sequence writer: numbers round-robin over shards on different servers.

    locked: any second after the cut. lockfree: the aligned instant (latest snapshot among
    shards, rounded up to its second), to which every shard is rolled forward.
    """
    import threading

    cluster = make_cluster(mariadb_servers[:2], name=f"seq{unique_name}", tables={"t_order": 1})
    shards = list(cluster.shards.select_related("instance"))
    conns = []
    for shard in shards:
        server = server_for(mariadb_servers, shard)
        server.execute("CREATE TABLE seq (n BIGINT PRIMARY KEY)", database=shard.database)
        conns.append(server.connect(shard.database))
    stamps: dict[int, tuple[float, float, int]] = {}  # n -> (before, after, shard index)
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            index = n % len(conns)
            before = time.time()
            with conns[index].cursor() as cur:
                cur.execute("INSERT INTO seq VALUES (%s)", (n,))
            stamps[n] = (before, time.time(), index)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(1)
        full = backup_start(cluster=cluster, actor="cli", kind="full", consistency=consistency)
        run_jobs("backups")
        full.refresh_from_db()
        assert full.status == "succeeded", full.error
        time.sleep(2.5)
        if consistency == "lockfree":
            at = aligned_instant(full_set=full)
            assert at >= full.consistent_at
        else:
            at = datetime.now(UTC).replace(microsecond=0)
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join()
        for conn in conns:
            conn.close()
    run_backup("incremental", cluster, run_jobs)

    from backups.services.restore_requests import (
        restore_request_approve,
        restore_request_file,
    )
    from backups.services.restore_run_states import restore_run_start

    request = restore_request_file(
        cluster=cluster, requester=make_user("operator"), at=at, target="side", reason="seq"
    )
    restore_request_approve(request=request, approver=make_user("approver"), comment="ok")
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.restored_to == at

    limit = at.timestamp() + 1  # binlog time is whole seconds: the whole second `at` counts
    restored_all: set[int] = set()
    for index, shard in enumerate(shards):
        server = server_for(mariadb_servers, shard)
        rows = server.execute("SELECT n FROM seq", database=f"{shard.database}__r{request.pk}")
        restored = {row[0] for row in rows}
        surely_in = {n for n, (b, a, i) in stamps.items() if i == index and a < at.timestamp()}
        maybe_in = {n for n, (b, a, i) in stamps.items() if i == index and b < limit}
        assert surely_in <= restored <= maybe_in, shard.name
        restored_all |= restored
    assert restored_all, "the writer wrote nothing before the target"
    k = max(restored_all)
    assert restored_all == set(range(1, k + 1)), "the restored numbers have a gap"
    whole_second_before = {n for n, (b, a, i) in stamps.items() if a < at.timestamp()}
    assert whole_second_before <= restored_all


def test_incremental_after_a_full_taken_without_binlog_is_recorded_failed_and_says_why(
    cluster, run_jobs
):
    import json
    from io import StringIO

    from django.core.management import call_command

    full = run_backup("full", cluster, run_jobs)
    # What a full backup of a server with log_bin=OFF records: no coordinates.
    full.shard_backups.update(binlog_file="", binlog_pos=None)
    out, err = StringIO(), StringIO()
    with pytest.raises(SystemExit) as exit_:
        call_command(
            "backup", cluster.name, "--kind", "incremental", "--json", stdout=out, stderr=err
        )
    assert exit_.value.code != 0
    result = json.loads(out.getvalue())
    assert result["kind"] == "incremental" and result["status"] == "failed"
    assert "binary logging was off" in result["error"] and "new full backup" in result["error"]
    assert len(err.getvalue().strip().splitlines()) == 1


def test_an_incremental_the_reaper_failed_mid_capture_never_ends_succeeded(cluster, run_jobs):
    from django.utils import timezone

    from backups.services import incrementals
    from backups.services.full_backups import backups_reap_stale

    run_backup("full", cluster, run_jobs)
    backup_set = incremental_start(cluster=cluster, actor="cli", enqueue=False)
    assert incrementals._begin(backup_set)
    # While the capture runs, its worker is taken for dead (no heartbeat) and the set failed...
    reaped = backups_reap_stale(now=timezone.now() + timedelta(hours=1))
    assert [s.pk for s in reaped] == [backup_set.pk]
    # ...so when the capture ends after all, the set must stay failed, not become restorable.
    incrementals._finish(backup_set, captures=[], manifest_sha256="", covered=None)
    backup_set.refresh_from_db()
    assert backup_set.status == "failed" and "no heartbeat" in backup_set.error


def test_an_incremental_that_cannot_be_queued_is_failed_with_the_reason(
    cluster, run_jobs, settings
):
    from tests.servers import free_port

    run_backup("full", cluster, run_jobs)
    for queue in settings.RQ_QUEUES.values():
        queue["URL"] = f"redis://127.0.0.1:{free_port()}/0"
    backup_set = incremental_start(cluster=cluster, actor="cli")
    backup_set.refresh_from_db()
    assert backup_set.status == "failed"
    assert "could not be queued" in backup_set.error


def test_chains_and_the_window_are_read_in_one_query_however_long_the_chain(
    cluster, django_assert_num_queries
):
    from django.utils import timezone

    from backups.selectors.incrementals import cluster_chains

    start = timezone.now().replace(microsecond=0) - timedelta(hours=3)
    full = BackupSet.objects.create(
        cluster=cluster, kind="full", status="succeeded", consistent_at=start
    )
    chain, parent = [], full
    for n in range(1, 21):
        parent = BackupSet.objects.create(
            cluster=cluster,
            kind="incremental",
            parent=parent,
            status="succeeded",
            consistent_at=start + timedelta(minutes=5 * n),
        )
        chain.append(parent)
    broken = BackupSet.objects.create(
        cluster=cluster, kind="incremental", parent=parent, status="failed"
    )
    with django_assert_num_queries(1):
        assert recoverable_window(cluster) == (start, chain[-1].consistent_at)
    assert chain_after(full) == chain
    with django_assert_num_queries(2):
        assert cluster_chains(cluster) == [[full, *chain, broken]]
