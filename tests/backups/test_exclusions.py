"""Policy exclude_tables: a MyISAM (or scratch) table no longer blocks hot backups, is listed
as excluded in the manifest and on the set, and is never restored, also by point in time."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from django.urls import reverse

from backups.engine.checksum import table_checksum
from backups.engine.mysql import quote_ident
from backups.models import BackupPolicy, BackupSet, RestoreRequest, TableBackup
from backups.services.errors import RestoreError
from backups.services.full_backups import backup_start
from backups.services.restore_requests import restore_request_approve, restore_request_file
from backups.services.restore_run_states import restore_run_start
from backups.services.sets import set_manifest
from shards.models import Finding
from shards.services.discovery_runs import discovery_run
from tests.backups.test_verification import _verify_cli
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

SCRATCH_DDL = (
    "CREATE TABLE scratch_log (id INT PRIMARY KEY, msg VARCHAR(100) NOT NULL) ENGINE=MyISAM"
)


def server_for(servers, shard):
    return next(s for s in servers if s.endpoint.port == shard.instance.port)


def shards_of(cluster, servers):
    return [(s, server_for(servers, s)) for s in cluster.shards.select_related("instance")]


def checksum_of(server, database, table):
    conn = server.connect(database)
    try:
        return table_checksum(conn, database, table)
    finally:
        conn.close()


def tables_of(server, database):
    return {
        row[0]
        for row in server.execute(
            f"SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{database}'"
        )
    }


def next_second() -> None:
    now = time.time()
    time.sleep(int(now) + 1 - now + 0.05)


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    """Two shards on two servers; each shard also holds a MyISAM scratch table with rows."""
    cluster = make_cluster(
        mariadb_servers[:2], name=f"ex{unique_name}", tables={"t_order": 40, "t_user": 10}
    )
    for shard, server in shards_of(cluster, mariadb_servers):
        server.execute(SCRATCH_DDL, database=shard.database)
        server.execute(
            "INSERT INTO scratch_log SELECT seq, CONCAT('m', seq) FROM seq_1_to_25",
            database=shard.database,
        )
    return cluster


def exclude(cluster, *patterns):
    BackupPolicy.objects.update_or_create(
        cluster=cluster, defaults={"exclude_tables": list(patterns)}
    )


def run_backup(cluster, run_jobs, *, kind="full", consistency="locked") -> BackupSet:
    backup_set = backup_start(
        cluster=cluster, actor=make_user("operator"), kind=kind, consistency=consistency
    )
    run_jobs("backups")
    backup_set.refresh_from_db()
    return backup_set


def run_restore(request, run_jobs):
    restore_request_approve(request=request, approver=make_user("approver"), comment="ok")
    run = restore_run_start(
        request=RestoreRequest.objects.get(pk=request.pk), actor=make_user("operator")
    )
    run_jobs("restores")
    run.refresh_from_db()
    return run


def test_without_an_exclusion_a_myisam_table_refuses_the_hot_backup(cluster, run_jobs):
    backup_set = run_backup(cluster, run_jobs)
    assert backup_set.status == "failed"
    assert "hot backups need InnoDB" in backup_set.error and "scratch_log" in backup_set.error
    assert "exclude_tables" in backup_set.error  # the way out, named

    discovery_run(cluster=cluster, actor=make_user("operator"))
    errors = Finding.objects.filter(cluster=cluster, code="table.engine", severity="error")
    assert {f.table for f in errors} == {"scratch_log"}


@pytest.mark.parametrize("consistency", ["locked", "lockfree"])
def test_an_excluded_myisam_table_is_left_out_and_the_rest_restores_exactly(
    cluster, mariadb_servers, run_jobs, client, consistency
):
    exclude(cluster, "*.scratch_*")
    shards = shards_of(cluster, mariadb_servers)
    expected = {
        (shard.name, table): checksum_of(server, shard.database, table)
        for shard, server in shards
        for table in ("t_order", "t_user")
    }

    backup_set = run_backup(cluster, run_jobs, consistency=consistency)
    assert backup_set.status == "succeeded", backup_set.error
    excluded = sorted(f"{shard.database}.scratch_log" for shard, _ in shards)
    assert backup_set.excluded_tables == excluded
    assert not TableBackup.objects.filter(
        shard_backup__backup_set=backup_set, name="scratch_log"
    ).exists()
    assert set(
        TableBackup.objects.filter(shard_backup__backup_set=backup_set).values_list(
            "name", flat=True
        )
    ) == {"t_order", "t_user"}

    manifest = set_manifest(backup_set)  # read back and its signature verified
    assert manifest["excluded"] == excluded and manifest["exclude_tables"] == ["*.scratch_*"]
    for shard_doc in manifest["shards"]:
        assert shard_doc["excluded_tables"] == ["scratch_log"]
        assert {t["name"] for t in shard_doc["tables"]} == {"t_order", "t_user"}
        assert not any("scratch_log" in t["schema_key"] for t in shard_doc["tables"])

    client.force_login(make_user("auditor"))
    page = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
    assert "Excluded tables" in page and all(name in page for name in excluded)

    request = restore_request_file(
        cluster=cluster,
        requester=make_user("operator"),
        source_set=backup_set,
        target="side",
        reason="whole cluster",
    )
    assert request.plan["excluded"] == excluded
    run = run_restore(request, run_jobs)
    assert run.status == "succeeded", run.error
    for shard, server in shards:
        side = f"{shard.database}__r{request.pk}"
        assert tables_of(server, side) == {"t_order", "t_user"}
        for table in ("t_order", "t_user"):
            assert checksum_of(server, side, table) == expected[(shard.name, table)]
        server.execute(f"DROP DATABASE {quote_ident(side)}")


def test_a_restore_that_names_an_excluded_table_is_refused_in_one_sentence(cluster, run_jobs):
    exclude(cluster, "*.scratch_log")
    backup_set = run_backup(cluster, run_jobs)
    assert backup_set.status == "succeeded", backup_set.error
    with pytest.raises(RestoreError) as refused:
        restore_request_file(
            cluster=cluster,
            requester=make_user("operator"),
            source_set=backup_set,
            tables=["scratch_log"],
            target="side",
            reason="want the scratch table",
        )
    message = str(refused.value)
    assert "excluded" in message and "exclude_tables" in message and "\n" not in message
    assert not RestoreRequest.objects.filter(cluster=cluster).exists()


def test_discovery_reports_excluded_tables_as_ok_not_as_a_refusal(cluster):
    exclude(cluster, "*.SCRATCH_LOG")  # names compare case-sensitively on Linux servers
    discovery_run(cluster=cluster, actor=make_user("operator"))
    assert Finding.objects.filter(cluster=cluster, code="table.engine").count() == 2

    exclude(cluster, "*.scratch_log")
    discovery_run(cluster=cluster, actor=make_user("operator"))
    assert not Finding.objects.filter(cluster=cluster, severity="error").exists()
    excluded = Finding.objects.filter(cluster=cluster, code="table.excluded")
    assert {(f.table, f.severity) for f in excluded} == {("scratch_log", "ok")}
    assert excluded.count() == 2


def test_point_in_time_restore_and_drill_never_apply_events_of_an_excluded_table(
    cluster, mariadb_servers, run_jobs
):
    exclude(cluster, "*.scratch_log")
    shards = shards_of(cluster, mariadb_servers)
    full = run_backup(cluster, run_jobs)
    assert full.status == "succeeded", full.error
    for shard, server in shards:
        server.execute(
            "INSERT INTO scratch_log SELECT seq, 'after' FROM seq_100_to_140",
            "UPDATE scratch_log SET msg = 'changed' WHERE id < 10",
            "ALTER TABLE scratch_log ADD COLUMN extra INT NULL",
            "INSERT INTO t_order (id, shard, amount, note, created_at)"
            " SELECT seq, 'new', seq / 3, NULL, NOW(6) FROM seq_500_to_560",
            "UPDATE t_order SET note = 'later' WHERE id % 5 = 0",
            database=shard.database,
        )
    next_second()
    at = datetime.now(UTC).replace(microsecond=0)
    expected = {
        (shard.name, table): checksum_of(server, shard.database, table)
        for shard, server in shards
        for table in ("t_order", "t_user")
    }
    next_second()
    incremental = run_backup(cluster, run_jobs, kind="incremental")
    assert incremental.status == "succeeded", incremental.error
    # Capture keeps the excluded table's events; only restores leave them out.
    assert any(t.endswith(".scratch_log") for seg in incremental.segments.all() for t in seg.tables)

    request = restore_request_file(
        cluster=cluster, requester=make_user("operator"), at=at, target="side", reason="pitr"
    )
    run = run_restore(request, run_jobs)
    assert run.status == "succeeded", run.error
    for shard, server in shards:
        side = f"{shard.database}__r{request.pk}"
        assert tables_of(server, side) == {"t_order", "t_user"}
        for table in ("t_order", "t_user"):
            assert checksum_of(server, side, table) == expected[(shard.name, table)]
        server.execute(f"DROP DATABASE {quote_ident(side)}")

    # A restore drill of the incremental rolls every table of the database forward, but
    # not the excluded one (its rows, and the ALTER of it, would have nowhere to go).
    code, result, err = _verify_cli(incremental.pk, "--drill")
    assert code == 0, (result, err)
    assert (result["q"], result["t"], result["d"], result["a"]) == (1.0, 1.0, 1.0, 1.0)


def test_patterns_match_whole_database_table_names_as_the_server_compares_them():
    from backups.engine.exclusions import Exclusions

    linux = Exclusions(("scratch.*", "*.tmp_?", "app.audit_[0-9]*"), case_sensitive=True)
    assert linux.split("scratch", ["a", "b"]) == ([], ["a", "b"])
    assert linux.split("app", ["tmp_1", "tmp_12", "audit_2024", "audit_x", "orders"]) == (
        ["tmp_12", "audit_x", "orders"],
        ["tmp_1", "audit_2024"],
    )
    assert not linux.excludes("Scratch", "a")  # lower_case_table_names=0: names differ
    assert not linux.excludes("scratchy", "a") and not linux.excludes("app", "x.tmp_1")
    folded = Exclusions(("Scratch.*",), case_sensitive=False)
    assert folded.excludes("scratch", "A") and folded.excludes("SCRATCH", "a")
    assert not Exclusions().excludes("scratch", "a")
