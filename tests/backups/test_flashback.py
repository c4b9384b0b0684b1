"""Flashback: undo one bad transaction in place, from the stored binlog, on real MariaDB."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core import mail
from django.core.management import CommandError, call_command

from backups.models import RestoreRequest
from backups.services.errors import RestoreDenied, RestoreError
from backups.services.flashback import flashback_artifact_open, flashback_preview
from backups.services.restore_requests import restore_request_approve
from backups.services.restore_run_states import restore_run_start
from console.models import AuditEvent
from tests.backups.test_binlog_browser import binlog_events_json, three_in_one_second
from tests.backups.test_pitr import checksum_of, run_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

MIXED_DDL = (
    "CREATE TABLE mixed (tenant INT NOT NULL, code VARCHAR(20) NOT NULL, doc JSON NULL,"
    " bin BLOB NULL, amount DECIMAL(30,10) NULL, at DATETIME(6) NULL, small TINYINT NULL,"
    " big BIGINT UNSIGNED NULL, tm TIME(6) NULL, bits BIT(10) NULL, e ENUM('x', 'y z') NULL,"
    " st SET('p', 'q', 'r') NULL, f FLOAT NULL, ts TIMESTAMP(6) NULL, yr YEAR NULL,"
    " neg MEDIUMINT NULL, PRIMARY KEY (tenant, code))"
)


def rows_of(server, database, table="t_order"):
    return server.execute(f"SELECT * FROM {table} ORDER BY 1, 2", database=database)


def request_flashback(cluster, operator, *args) -> dict:
    out = StringIO()
    call_command(
        "restore",
        "request",
        "--cluster",
        cluster.name,
        "--flashback",
        *args,
        "--reason",
        "undo the bad statement",
        "--as",
        operator.username,
        "--json",
        stdout=out,
    )
    return json.loads(out.getvalue())


def approve_twice_and_run(request_id, run_jobs):
    request = RestoreRequest.objects.get(pk=request_id)
    restore_request_approve(request=request, approver=make_user("approver"), comment="one")
    assert RestoreRequest.objects.get(pk=request_id).state == "pending_approval"
    restore_request_approve(request=request, approver=make_user("approver"), comment="two")
    request.refresh_from_db()
    assert request.state == "approved"
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    return run


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:1], name=f"fb{unique_name}", tables={"t_order": 20})


def test_flashback_of_the_bad_delete_brings_back_exactly_its_rows_and_keeps_later_writes(
    cluster, mariadb_servers, run_jobs, client
):
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    run_backup("full", cluster, run_jobs)
    before = rows_of(server, shard.database)
    three_in_one_second(server, shard.database)
    run_backup("incremental", cluster, run_jobs)
    after_good = rows_of(server, shard.database)
    listed = binlog_events_json(cluster.name)["transactions"]
    bad = next(t for t in listed if t["tables"][0]["deleted"])

    watcher = make_user("approver")
    watcher.email = "fb-approver@example.test"
    watcher.save()
    operator = make_user("operator")
    filed = request_flashback(cluster, operator, "--gtid", bad["gtid"])
    assert filed["state"] == "pending_approval" and filed["target"] == "inplace"
    told = [m for m in mail.outbox if m.to == ["fb-approver@example.test"]]
    assert told and f"flashback (undo in place) of {bad['gtid']}" in told[0].body
    assert filed["flashback"] == {"gtids": [bad["gtid"]]}
    plan = filed["plan"]
    assert plan["rows"] == 5 and plan["statements"] == 1 and plan["conflicts"] == 0
    assert plan["flashback_tables"] == [
        {
            "shard": shard.name,
            "instance": shard.instance.name,
            "database": shard.database,
            "table": "t_order",
            "insert": 5,
            "update": 0,
            "delete": 0,
        }
    ]
    assert plan["sample"] and plan["sample"][0].startswith(f"INSERT INTO `{shard.database}`")
    # The SQL is stored with its sha256, and named in the audit trail.
    request = RestoreRequest.objects.get(pk=filed["id"])
    stored = b"".join(flashback_artifact_open(request))
    assert hashlib.sha256(stored).hexdigest() == filed["artifact"]["sha256"]
    assert b"BINLOG '" in stored and b"### INSERT INTO" in stored
    # Downloadable from the request page by console users only, as stored.
    url = f"/restores/{request.pk}/flashback.sql"
    client.force_login(make_user(None))
    assert client.get(url).status_code == 403
    client.force_login(make_user("auditor"))
    download = client.get(url)
    assert download.status_code == 200 and b"".join(download.streaming_content) == stored
    audit = AuditEvent.objects.get(action="restore.requested", object_id=str(request.pk))
    assert audit.details["artifact_sha256"] == filed["artifact"]["sha256"]
    with pytest.raises(RestoreDenied):
        restore_request_approve(request=request, approver=operator)
    assert rows_of(server, shard.database) == after_good  # nothing runs before approval

    run = approve_twice_and_run(filed["id"], run_jobs)
    assert run.status == "succeeded", run.error
    assert run.rows_done == 5
    now = rows_of(server, shard.database)
    restored = {row[0]: row for row in now}
    # Exactly the deleted rows are back, as they were...
    for row in before:
        if 3 <= row[0] <= 7:
            assert restored[row[0]] == row
    # ...and the good writes before and after the bad one stay.
    assert restored[100][3] == "good before"
    assert restored[10][3] == "good after"
    assert len(now) == len(after_good) + 5
    shown = StringIO()
    call_command("restore", "show", str(filed["id"]), "--json", stdout=shown)
    result = json.loads(shown.getvalue())
    assert result["state"] == "succeeded"
    assert result["results"][0]["rows"] == 5 and result["results"][0]["table"] == "t_order"
    assert AuditEvent.objects.filter(
        action="restore.flashback_applied", object_id=str(request.pk)
    ).exists()
    text = StringIO()
    call_command("restore", "show", str(filed["id"]), stdout=text)
    assert f"flashback of {bad['gtid']}" in text.getvalue()
    assert "undoes 5 row(s) in 1 statement(s)" in text.getvalue()


def test_a_row_changed_again_after_the_bad_update_refuses_the_flashback(
    cluster, mariadb_servers, run_jobs
):
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    run_backup("full", cluster, run_jobs)
    server.execute("UPDATE t_order SET amount = 0 WHERE id <= 5", database=shard.database)
    server.execute(
        "UPDATE t_order SET note = 'fixed by hand' WHERE id = 2", database=shard.database
    )
    run_backup("incremental", cluster, run_jobs)
    bad = next(
        t
        for t in binlog_events_json(cluster.name)["transactions"]
        if t["tables"][0]["updated"] == 5
    )
    live = checksum_of(server, shard.database, "t_order")
    preview = flashback_preview(cluster=cluster, gtids=[bad["gtid"]])
    assert preview["conflicts"] == 1 and preview["rows"] == 5
    assert preview["conflict_sample"] == [
        {
            "shard": shard.name,
            "table": "t_order",
            "key": {"id": 2},
            "reason": "the row was changed again after the change",
        }
    ]
    with pytest.raises(CommandError, match="changed again after"):
        request_flashback(cluster, make_user("operator"), "--gtid", bad["gtid"])
    assert not RestoreRequest.objects.filter(cluster=cluster).exists()
    assert checksum_of(server, shard.database, "t_order") == live


def test_a_conflict_that_appears_after_approval_fails_the_run_and_changes_nothing(
    cluster, mariadb_servers, run_jobs
):
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    run_backup("full", cluster, run_jobs)
    server.execute("DELETE FROM t_order WHERE id IN (4, 5, 6)", database=shard.database)
    run_backup("incremental", cluster, run_jobs)
    bad = next(
        t for t in binlog_events_json(cluster.name)["transactions"] if t["tables"][0]["deleted"]
    )
    filed = request_flashback(cluster, make_user("operator"), "--gtid", bad["gtid"])
    # Someone re-creates one of the rows by hand before the run.
    server.execute(
        "INSERT INTO t_order VALUES (5, 'x', 9.99, 'by hand', NOW(6))", database=shard.database
    )
    live = checksum_of(server, shard.database, "t_order")
    run = approve_twice_and_run(filed["id"], run_jobs)
    assert run.status == "failed"
    assert "exists again" in run.error and "between approval and run" in run.error
    assert checksum_of(server, shard.database, "t_order") == live


def test_flashback_restores_json_blob_decimal_datetime_nulls_and_composite_keys(
    cluster, mariadb_servers, run_jobs
):
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    conn = server.connect(shard.database)
    with conn.cursor() as cur:
        cur.execute(MIXED_DDL)
        cur.executemany(
            "INSERT INTO mixed VALUES"
            " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (1, "a", '{"k": "v\\n", "n": [1, 2.5, null]}', bytes(range(256)), "-0.0000000001",
                 "1000-01-01 00:00:00.000001", -128, 2**64 - 1, "-838:59:58.999999", 682, "y z",
                 "p,r", 0.1, "2038-01-19 03:14:07.999999", 2155, -8388608),
                (1, "b", None, None, None, None, None, None, None, None, None, None, None, None,
                 None, None),
                (2, "a", "[]", b"\x00", "12345678901234567890.0123456789",
                 "9999-12-31 23:59:59.999999", 127, 0, "00:00:00.5", 0, "x", "", -1.5e10,
                 "1970-01-02 00:00:00", 1901, 8388607),
                (2, "é😀", '"text"', b"\xff\xfe", "0.5", "2024-02-29 12:00:00.5", 0, 42,
                 "-00:00:00.001", 1, None, "q", 3.25, None, None, -1),
            ],
        )  # fmt: skip
    conn.close()
    run_backup("full", cluster, run_jobs)
    reference = checksum_of(server, shard.database, "mixed")
    server.execute(
        "UPDATE mixed SET doc = NULL, bin = 'x', amount = 1, at = NOW(6), small = 1, tm = '01:02:03',"
        " bits = b'1', e = 'x', st = 'q', f = 2.5, ts = NOW(6), yr = 2000, neg = 5 WHERE tenant = 1",
        "DELETE FROM mixed WHERE tenant = 2",
        database=shard.database,
    )
    run_backup("incremental", cluster, run_jobs)
    bad = [t["gtid"] for t in binlog_events_json(cluster.name, "--tables", "mixed")["transactions"]]
    assert len(bad) == 2
    filed = request_flashback(cluster, make_user("operator"), "--gtid", ",".join(bad))
    assert filed["plan"]["flashback_tables"][0]["insert"] == 2
    assert filed["plan"]["flashback_tables"][0]["update"] == 2
    run = approve_twice_and_run(filed["id"], run_jobs)
    assert run.status == "succeeded", run.error
    assert checksum_of(server, shard.database, "mixed") == reference


def test_flashback_refusals_name_the_problem(cluster, mariadb_servers, run_jobs):
    shard = cluster.shards.select_related("instance").get()
    run_backup("full", cluster, run_jobs)
    server_for(mariadb_servers, shard).execute(
        "UPDATE t_order SET note = 'x' WHERE id = 1", database=shard.database
    )
    run_backup("incremental", cluster, run_jobs)
    operator = make_user("operator")
    with pytest.raises(
        CommandError, match="no stored incremental .* holds a change in scope for GTID 0-999-1"
    ):
        request_flashback(cluster, operator, "--gtid", "0-999-1")
    with pytest.raises(CommandError, match="needs --tables"):
        request_flashback(
            cluster, operator, "--since", "2020-01-01T00:00:00", "--until", "2999-01-01T00:00:00"
        )
    with pytest.raises(CommandError, match="is not a GTID"):
        request_flashback(cluster, operator, "--gtid", "bad")
    with pytest.raises(CommandError, match="may not request restores"):
        request_flashback(cluster, make_user("approver"), "--gtid", "0-1-1")
    # A window plus tables finds the same change.
    filed = request_flashback(
        cluster,
        operator,
        "--since",
        "2020-01-01T00:00:00",
        "--until",
        "2999-01-01T00:00:00",
        "--tables",
        "t_order",
    )
    assert filed["plan"]["flashback_tables"][0]["update"] == 1
    with pytest.raises(RestoreError):
        from backups.services.flashback import flashback_spec

        flashback_spec()


def test_ddl_among_the_chosen_transactions_is_refused_by_name(
    cluster, mariadb_servers, run_jobs, unique_name
):
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    db = shard.database
    other = f"other_{unique_name}"
    server.execute("CREATE TABLE t_user LIKE t_order", database=db)
    server.execute(f"DROP DATABASE IF EXISTS {other}", f"CREATE DATABASE {other}")
    run_backup("full", cluster, run_jobs)
    server.execute("DELETE FROM t_order WHERE id <= 3", database=db)
    server.execute("ALTER TABLE t_order ADD COLUMN c1 INT NULL", database=db)  # unqualified
    server.execute(f"ALTER TABLE {db}.t_user ADD COLUMN c2 INT NULL", database=other)
    server.execute(
        "CREATE TABLE _t_user_gho LIKE t_user",
        "RENAME TABLE t_user TO _t_user_old, _t_user_gho TO t_user",  # a gh-ost style swap
        database=db,
    )
    run_backup("incremental", cluster, run_jobs)
    listed = binlog_events_json(cluster.name)["transactions"]
    by_statement = {t["statement"]: t["gtid"] for t in listed}
    orders = checksum_of(server, db, "t_order")
    operator = make_user("operator")

    # A window over t_order takes in the unqualified ALTER: refused, naming it.
    with pytest.raises(CommandError, match="ALTER TABLE t_order ADD COLUMN c1"):
        request_flashback(
            cluster, operator, "--since", "2020-01-01T00:00:00", "--until",
            "2999-01-01T00:00:00", "--tables", "t_order",
        )  # fmt: skip
    # Qualified, from another default database.
    qualified = next(g for s, g in by_statement.items() if s and "c2" in s)
    with pytest.raises(CommandError, match=f"ALTER TABLE {db}.t_user ADD COLUMN c2"):
        request_flashback(cluster, operator, "--gtid", qualified, "--tables", "t_user")
    # The shadow-table swap.
    swap = next(g for s, g in by_statement.items() if s and s.startswith("RENAME"))
    with pytest.raises(CommandError, match="RENAME TABLE t_user TO _t_user_old"):
        request_flashback(cluster, operator, "--gtid", swap)
    # The DELETE itself, now that t_order has another column: refused, never half applied.
    delete = next(g for s, g in by_statement.items() if s and s.startswith("DELETE"))
    with pytest.raises(
        CommandError,
        match="ALTER TABLE t_order ADD COLUMN c1 INT NULL \\(GTID .*\\) changed it after",
    ):
        request_flashback(cluster, operator, "--gtid", delete)
    assert not RestoreRequest.objects.filter(cluster=cluster).exists()
    assert checksum_of(server, db, "t_order") == orders
    server.execute(f"DROP DATABASE IF EXISTS {other}")


def test_a_window_on_one_table_is_undone_on_every_shard_and_other_tables_keep_their_changes(
    mariadb_servers, unique_name, run_jobs
):
    cluster = make_cluster(
        mariadb_servers[:2], name=f"fbw{unique_name}", tables={"t_order": 10, "t_user": 5}
    )
    shards = list(cluster.shards.select_related("instance"))
    run_backup("full", cluster, run_jobs)
    before = {}
    for shard in shards:
        server = server_for(mariadb_servers, shard)
        before[shard.name] = checksum_of(server, shard.database, "t_order")
    since = datetime.now(UTC).replace(microsecond=0)
    for shard in shards:
        server_for(mariadb_servers, shard).execute(
            "UPDATE t_order SET amount = 0 WHERE id <= 3",
            "UPDATE t_user SET note = 'kept' WHERE id = 1",
            database=shard.database,
        )
    until = datetime.now(UTC) + timedelta(seconds=1)
    run_backup("incremental", cluster, run_jobs)
    filed = request_flashback(
        cluster,
        make_user("operator"),
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat(),
        "--tables",
        "t_order",
    )
    plan = filed["plan"]
    assert plan["rows"] == 6
    assert sorted((t["shard"], t["table"], t["update"]) for t in plan["flashback_tables"]) == [
        (shards[0].name, "t_order", 3),
        (shards[1].name, "t_order", 3),
    ]
    run = approve_twice_and_run(filed["id"], run_jobs)
    assert run.status == "succeeded", run.error
    assert run.rows_done == 6
    for shard in shards:
        server = server_for(mariadb_servers, shard)
        assert checksum_of(server, shard.database, "t_order") == before[shard.name]
        note = server.execute("SELECT note FROM t_user WHERE id = 1", database=shard.database)
        assert note[0][0] == "kept"
    applied = AuditEvent.objects.filter(
        action="restore.flashback_applied", object_id=str(filed["id"])
    )
    assert sorted(e.details["shard"] for e in applied) == [s.name for s in shards]


def test_a_shard_is_undone_in_one_transaction_a_failing_statement_undoes_nothing(
    cluster, mariadb_servers, run_jobs, tmp_path
):
    from backups.engine.flashback import flashback_apply
    from backups.services.flashback import flashback_inverses

    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    run_backup("full", cluster, run_jobs)
    server.execute("DELETE FROM t_order WHERE id IN (3, 4)", database=shard.database)
    server.execute("DELETE FROM t_order WHERE id IN (5, 6)", database=shard.database)
    run_backup("incremental", cluster, run_jobs)
    deletes = [t["gtid"] for t in binlog_events_json(cluster.name)["transactions"] if t["tables"]]
    built = flashback_inverses(
        cluster=cluster, spec={"gtids": deletes}, shards=[], tables=[], workdir=str(tmp_path)
    )
    (item,) = built
    assert item.inverse.statements == 2  # newest first: 5 and 6 come back, then 3 and 4
    # Row 3 reappears behind the check's back: the second statement must fail...
    server.execute(
        "INSERT INTO t_order VALUES (3, 'x', 1, 'by hand', NOW(6))", database=shard.database
    )
    live = checksum_of(server, shard.database, "t_order")
    item.inverse.after.clear()  # (skip the row check, to reach the statements)
    with open(item.inverse.sql_path, "rb") as lines, pytest.raises(Exception, match="Duplicate"):
        flashback_apply(
            endpoint=item.endpoint, inverse=item.inverse, infos=item.infos, sql_lines=lines
        )
    # ...and the first one's rows (5, 6) are rolled back with it.
    assert checksum_of(server, shard.database, "t_order") == live
