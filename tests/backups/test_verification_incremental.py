"""Restore drills of incremental sets: the full set restored, then rolled forward through the chain.

Real MariaDB servers with ROW binlogs, real local storage, real full and incremental backups
made by the backup services, and the real `verify` command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.urls import reverse

from backups.engine import verify as engine
from backups.engine.checksum import table_checksum
from backups.engine.mysql import connect
from backups.models import BackupPolicy, BackupSet, BinlogSegment, VerificationRun
from backups.services.full_backups import backup_execute, backup_start
from backups.services.incrementals import incremental_execute, incremental_start
from console.models import AuditEvent
from shards.models import Instance
from tests.backups.test_verification import _scratch_databases, _verify_cli
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

TABLES = ("t_order", "t_user")
# Statements (each its own autocommitted transaction) per shard in each write round.
WRITES_FIRST = (
    "INSERT INTO t_order (id, shard, amount, note, created_at)"
    " SELECT seq, 'new', seq / 7, 'inserted', NOW(6) FROM seq_1000_to_1150",
    "UPDATE t_order SET amount = amount + 1, note = 'updated' WHERE id % 5 = 0",
    "DELETE FROM t_order WHERE id BETWEEN 10 AND 30",
    "INSERT INTO t_user (id, shard, amount, note, created_at)"
    " VALUES (900, 'x', 1.50, 'quote '' \\\\ tab\\t', '2025-01-01 00:00:00')",
    "UPDATE t_user SET note = NULL WHERE id = 3",
)
WRITES_SECOND = (
    "DELETE FROM t_user WHERE id > 30",
    "UPDATE t_order SET note = 'second round' WHERE id BETWEEN 1000 AND 1010",
    "INSERT INTO t_order (id, shard, amount, note, created_at)"
    " VALUES (5000, 'late', 9.99, NULL, NOW(6))",
)


@pytest.fixture
def cluster(mariadb_servers, unique_name, settings):
    settings.SHARDVAULT_CHUNK_ROWS = 100
    settings.BACKUP_CHUNK_ROWS = 100
    cluster = make_cluster(
        mariadb_servers[:2], name=f"vi{unique_name}", tables={"t_order": 400, "t_user": 40}
    )
    # These tests file their own verifications.
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"verify_automatically": False})
    return cluster


def _shards(cluster, servers):
    by_port = {s.endpoint.port: s for s in servers}
    return [
        (shard, by_port[shard.instance.port])
        for shard in cluster.shards.select_related("instance").order_by("name")
    ]


def _write(cluster, servers, statements):
    for shard, server in _shards(cluster, servers):
        server.execute(*statements, database=shard.database)


def _checksums(cluster, servers) -> dict[tuple[str, str], tuple[int, str]]:
    result = {}
    for shard, server in _shards(cluster, servers):
        conn = server.connect(shard.database)
        try:
            for table in TABLES:
                result[(shard.database, table)] = table_checksum(conn, shard.database, table)
        finally:
            conn.close()
    return result


def _full(cluster) -> BackupSet:
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", enqueue=False)
    )
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def _incremental(cluster) -> BackupSet:
    backup_set = incremental_execute(
        backup_set=incremental_start(cluster=cluster, actor="cli", enqueue=False)
    )
    assert backup_set.status == "succeeded", backup_set.error
    assert backup_set.kind == "incremental"
    return backup_set


@pytest.fixture
def scratch_snapshots(monkeypatch):
    """Checksums of the drill's scratch tables, taken by the server just before they are dropped.

    Keyed by (source database, table): a scratch database is `__svdrill_<run>_<source db>`.
    """
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    dropped: list[tuple[int, str]] = []  # (port, scratch database)
    original = engine.drill_cleanup

    def observe_then_cleanup(scratch, outcome=None):
        for endpoint, database in scratch:
            source = database.split("_", 4)[-1]
            conn = connect(endpoint, database)
            try:
                with conn.cursor() as cur:
                    cur.execute("SHOW TABLES")
                    present = {row[0] for row in cur.fetchall()}
                for table in TABLES:
                    if table in present:
                        seen[(source, table)] = table_checksum(conn, database, table)
            finally:
                conn.close()
            dropped.append((int(endpoint.port), database))
        return original(scratch, outcome)

    monkeypatch.setattr(engine, "drill_cleanup", observe_then_cleanup)
    seen_and_dropped = {"checksums": seen, "dropped": dropped}
    return seen_and_dropped


def _finish_details(run_id: int) -> dict:
    event = AuditEvent.objects.get(
        object_type="backups.verificationrun",
        object_id=str(run_id),
        action="verification.finish",
    )
    details = event.details
    return json.loads(details) if isinstance(details, str) else details


def test_drill_of_an_incremental_restores_the_full_set_and_rolls_forward_to_its_instant(
    cluster, mariadb_servers, scratch_snapshots
):
    at_full = _checksums(cluster, mariadb_servers)
    full = _full(cluster)
    _write(cluster, mariadb_servers, WRITES_FIRST)
    first = _incremental(cluster)
    at_first = _checksums(cluster, mariadb_servers)
    _write(cluster, mariadb_servers, WRITES_SECOND)
    second = _incremental(cluster)
    assert second.parent_id == first.pk and first.parent_id == full.pk
    at_second = _checksums(cluster, mariadb_servers)
    # Every table changed in each round, so only a real roll-forward can match.
    for key in at_full:
        assert at_full[key] != at_first[key] != at_second[key], key
    _write(cluster, mariadb_servers, ["UPDATE t_order SET note = 'after the chain'"])

    # The newest set: the full set plus both incrementals.
    code, result, err = _verify_cli(second.pk, "--drill")
    assert code == 0, (result, err)
    assert result["set"] == second.pk and result["drill"] is True
    assert result["status"] == "succeeded" and result["problems"] == []
    assert (result["q"], result["t"], result["d"], result["a"]) == (1.0, 1.0, 1.0, 1.0)
    assert result["rto_seconds"] > 0
    assert any("proven by a successful apply" in w for w in result["warnings"])
    assert scratch_snapshots["checksums"] == at_second
    run = VerificationRun.objects.get(pk=result["verification"])
    assert run.rto_seconds == result["rto_seconds"] and run.q == 1.0
    assert "no manifest checksum of the rolled-forward state" in run.progress_text
    second.refresh_from_db()
    assert second.q == 1.0 and second.verified_at is not None
    details = _finish_details(run.pk)
    assert details["chain"] == [full.pk, first.pk, second.pk]
    statements = len(WRITES_FIRST) + len(WRITES_SECOND)
    assert {name: s["transactions"] for name, s in details["binlog"]["shards"].items()} == {
        "s00": statements,
        "s01": statements,
    }
    assert details["binlog"]["transactions"] == 2 * statements
    assert _scratch_databases(mariadb_servers, run.pk) == []

    # The middle set: rolled forward to its own instant, not to the end of the chain.
    scratch_snapshots["checksums"].clear()
    code, result, err = _verify_cli(first.pk, "--drill")
    assert code == 0, (result, err)
    assert (result["q"], result["t"], result["d"], result["a"]) == (1.0, 1.0, 1.0, 1.0)
    assert scratch_snapshots["checksums"] == at_first
    details = _finish_details(result["verification"])
    assert details["chain"] == [full.pk, first.pk]
    assert details["binlog"]["transactions"] == 2 * len(WRITES_FIRST)
    assert _scratch_databases(mariadb_servers, result["verification"]) == []

    # The apply's bookkeeping table lived in the scratch databases only, never in a source.
    for shard, server in _shards(cluster, mariadb_servers):
        tables = {r[0] for r in server.execute("SHOW TABLES", database=shard.database)}
        assert tables == set(TABLES)

    # Without --drill the incremental's own storage is checked, as before.
    code, result, err = _verify_cli(second.pk)
    assert code == 0, (result, err)
    assert result["drill"] is False and result["q"] == 1.0


def test_drill_with_a_corrupt_binlog_segment_names_it_fails_the_shard_and_drops_scratch(
    cluster, mariadb_servers, settings, scratch_snapshots
):
    _full(cluster)
    _write(cluster, mariadb_servers, WRITES_FIRST)
    incremental = _incremental(cluster)
    segment = BinlogSegment.objects.filter(backup_set=incremental).order_by("instance_name").first()
    path = Path(settings.STORAGE_URL.removeprefix("file://")) / segment.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    code, result, err = _verify_cli(incremental.pk, "--drill")
    assert code == 1
    assert result["status"] == "succeeded" and result["drill"] is True
    assert result["a"] < 1 and result["q"] < 1 and result["d"] < 1
    assert [p["object"] for p in result["problems"] if "object" in p] == [segment.key]
    assert f"set {incremental.pk} has Q = " in err and segment.key in err
    # The shard whose instance's segment is damaged was not rolled forward: its tables fail,
    # saying why; the other shard's tables still match.
    shard = cluster.shards.get(instance__name=segment.instance_name)
    failed = {p["table"]: p["reason"] for p in result["problems"] if "table" in p}
    assert sorted(failed) == [f"{shard.name}/{shard.database}.{t}" for t in TABLES]
    assert all("rolling forward through the binlog failed" in r for r in failed.values())
    assert all(segment.key in r for r in failed.values())
    assert result["d"] == 0.5
    # The scratch databases existed and are gone; nothing was written into the sources.
    assert len(scratch_snapshots["dropped"]) == 2
    assert _scratch_databases(mariadb_servers, result["verification"]) == []
    for shard, server in _shards(cluster, mariadb_servers):
        tables = {r[0] for r in server.execute("SHOW TABLES", database=shard.database)}
        assert tables == set(TABLES)
    incremental.refresh_from_db()
    assert incremental.q < 1


def test_drill_button_on_an_encrypted_incremental_runs_on_the_drill_instance(
    cluster, mariadb_servers, client, run_jobs, scratch_snapshots
):

    BackupPolicy.objects.filter(cluster=cluster).update(encrypt=True)
    drill_server = mariadb_servers[2]
    cluster.drill_instance = Instance.objects.create(
        cluster=cluster, name="drill", host="127.0.0.1", port=drill_server.port, user="root"
    )
    cluster.save()
    full = _full(cluster)
    _write(cluster, mariadb_servers, WRITES_FIRST)
    incremental = _incremental(cluster)
    assert full.encrypted and incremental.encrypted
    assert BinlogSegment.objects.filter(backup_set=incremental, key__endswith=".enc").exists()
    expected = _checksums(cluster, mariadb_servers)

    client.force_login(make_user("operator"))
    url = reverse("backups:verify_start", args=[incremental.pk])
    assert client.post(url, {"drill": "1"}).status_code == 302
    run = VerificationRun.objects.get(backup_set=incremental, drill=True)
    assert run.status == "pending"
    run_jobs("verify")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert (run.q, run.t, run.d, run.a) == (1.0, 1.0, 1.0, 1.0)
    assert run.drill_instance_name == "drill" and run.rto_seconds > 0
    assert scratch_snapshots["checksums"] == expected
    # Every scratch database went to the drill instance, and is gone from it.
    assert [port for port, _db in scratch_snapshots["dropped"]] == [drill_server.port] * 2
    assert _scratch_databases([drill_server], run.pk) == []
    assert _scratch_databases(mariadb_servers[:2], run.pk) == []
    detail = client.get(reverse("backups:set_detail", args=[incremental.pk])).content.decode()
    assert 'data-q-level="good"' in detail
