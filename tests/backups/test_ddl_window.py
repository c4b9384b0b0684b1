"""DDL in a point-in-time restore's window: applied to the restore's target, or the restore
is refused naming the statement and a stop point before it. Never skipped."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from backups.engine.mysql import quote_ident
from backups.models import RestoreRequest
from backups.services.restore_requests import restore_request_approve, restore_request_file
from backups.services.restore_run_states import restore_run_start
from tests.backups.test_pitr import checksum_of, next_second, run_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

COLUMNS = "id, shard, amount, note, created_at"


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[2:3], name=f"ddl{unique_name}", tables={"t_order": 30})


def restore_at(cluster, at, run_jobs, **scope):
    request = restore_request_file(
        cluster=cluster,
        requester=make_user("operator"),
        at=at,
        target="side",
        reason="ddl window",
        **scope,
    )
    restore_request_approve(request=request, approver=make_user("approver"), comment="ok")
    run = restore_run_start(request=RestoreRequest.objects.get(pk=request.pk), actor=None)
    run_jobs("restores")
    run.refresh_from_db()
    return request, run


def snapshot(server, database, table):
    """A copy of the table as it is now, in `<database>_ref`; returns its checksum."""
    ref = f"{database}_ref"
    server.execute(
        f"DROP DATABASE IF EXISTS {quote_ident(ref)}",
        f"CREATE DATABASE {quote_ident(ref)}",
        f"CREATE TABLE {quote_ident(ref)}.{table} LIKE {quote_ident(database)}.{table}",
        f"INSERT INTO {quote_ident(ref)}.{table} SELECT * FROM {quote_ident(database)}.{table}",
    )
    return checksum_of(server, ref, table)


def test_qualified_unqualified_and_ghost_swap_ddl_is_applied_to_the_side_database(
    cluster, mariadb_servers, run_jobs, unique_name
):
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    db = quote_ident(shard.database)
    other = f"other_{unique_name}"
    server.execute(
        f"DROP DATABASE IF EXISTS {quote_ident(other)}", f"CREATE DATABASE {quote_ident(other)}"
    )
    run_backup("full", cluster, run_jobs)

    # Qualified, from a session whose default database is another one.
    server.execute(
        f"ALTER TABLE {db}.t_order ADD COLUMN channel VARCHAR(20) NOT NULL DEFAULT 'web'",
        database=other,
    )
    server.execute("UPDATE t_order SET channel = 'app' WHERE id % 2 = 0", database=shard.database)
    # Qualified, from a session without a default database (the lost ALTER).
    server.execute(f"ALTER TABLE {db}.t_order ADD COLUMN c2 INT NULL")
    # Unqualified, the session's default database being the shard's.
    server.execute(
        "ALTER TABLE t_order ADD INDEX ix_note (note)",
        "UPDATE t_order SET c2 = id * 3 WHERE id < 10",
        database=shard.database,
    )
    # A gh-ost style migration: shadow copy, rows copied, the swap, the old table dropped.
    server.execute(
        "CREATE TABLE _t_order_gho LIKE t_order",
        "ALTER TABLE _t_order_gho ADD COLUMN c3 INT NOT NULL DEFAULT 7",
        f"INSERT INTO _t_order_gho ({COLUMNS}, channel, c2) "
        f"SELECT {COLUMNS}, channel, c2 FROM t_order",
        "RENAME TABLE t_order TO _t_order_del, _t_order_gho TO t_order",
        "DROP TABLE _t_order_del",
        "UPDATE t_order SET c3 = 9 WHERE id = 3",
        # A table created in the window: part of a whole-database restore only.
        "CREATE TABLE extra (id INT PRIMARY KEY, v VARCHAR(10))",
        "INSERT INTO extra VALUES (1, 'x'), (2, 'y')",
        database=shard.database,
    )
    next_second()
    at = datetime.now(UTC).replace(microsecond=0)
    reference = snapshot(server, shard.database, "t_order")
    next_second()
    server.execute("DELETE FROM t_order WHERE id > 5", database=shard.database)
    run_backup("incremental", cluster, run_jobs)

    request, run = restore_at(cluster, at, run_jobs, tables=["t_order"])
    assert run.status == "succeeded", run.error
    target = f"{shard.database}__r{request.pk}"
    columns = [r[0] for r in server.execute("SHOW COLUMNS FROM t_order", database=target)]
    assert columns[-3:] == ["channel", "c2", "c3"]
    assert checksum_of(server, target, "t_order") == reference
    assert [r[0] for r in server.execute("SHOW TABLES", database=target)] == ["t_order"]

    whole, run = restore_at(cluster, at, run_jobs)
    assert run.status == "succeeded", run.error
    target = f"{shard.database}__r{whole.pk}"
    assert checksum_of(server, target, "t_order") == reference
    assert sorted(r[0] for r in server.execute("SHOW TABLES", database=target)) == [
        "extra",
        "t_order",
    ]
    assert server.execute("SELECT id, v FROM extra ORDER BY id", database=target) == [
        (1, "x"),
        (2, "y"),
    ]
    # The source itself kept its own history; nothing was run against it by the restores.
    assert server.execute("SELECT COUNT(*) FROM t_order", database=shard.database)[0][0] == 5
    server.execute(f"DROP DATABASE IF EXISTS {quote_ident(other)}")


def test_a_swap_bringing_in_a_table_outside_the_restore_is_refused_by_name(
    cluster, mariadb_servers, run_jobs
):
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    server.execute(
        "CREATE TABLE t_order_new LIKE t_order",
        f"INSERT INTO t_order_new ({COLUMNS}) SELECT {COLUMNS} FROM t_order WHERE id < 5",
        database=shard.database,
    )
    run_backup("full", cluster, run_jobs)
    server.execute("UPDATE t_order SET note = 'kept' WHERE id = 1", database=shard.database)
    server.execute(
        "RENAME TABLE t_order TO t_order_old, t_order_new TO t_order", database=shard.database
    )
    gtid = server.execute("SELECT @@gtid_binlog_pos")[0][0]
    next_second()
    at = datetime.now(UTC).replace(microsecond=0)
    next_second()
    run_backup("incremental", cluster, run_jobs)

    # Only t_order is restored: the table the rename puts in its place is not in the restore.
    request, run = restore_at(cluster, at, run_jobs, tables=["t_order"])
    assert run.status == "failed"
    assert "RENAME TABLE t_order TO t_order_old, t_order_new TO t_order" in run.error
    assert f"shard {shard.name}" in run.error
    assert f"--before-gtid {gtid}" in run.error
    assert run.restored_to is None


# -- the statement rules, on QUERY events built here (no server needed) --------------------


def query_event(database: str, statement: str) -> bytes:
    import struct

    from backups.engine.binlog_events import HEADER_LEN, QUERY_EVENT

    status = b"\x00\x00\x00\x00\x00"  # Q_FLAGS2_CODE 0: one status variable
    body = (
        struct.pack("<IIBHH", 7, 0, len(database), 0, len(status))
        + status
        + database.encode()
        + b"\x00"
        + statement.encode()
    )
    return struct.pack("<IBIIIH", 1700000000, QUERY_EVENT, 1, HEADER_LEN + len(body), 999, 0) + body


def decide(scope, database, statement):
    from backups.engine.binlog_events import query_of

    decision = scope.plan_query(query_event(database, statement), False)
    return query_of(decision) if isinstance(decision, bytes) else decision


@pytest.mark.parametrize(
    ("default_db", "statement", "expected"),
    [
        ("src", "ALTER TABLE t ADD COLUMN c INT", "ALTER TABLE `dst`.`t` ADD COLUMN c INT"),
        ("other", "ALTER TABLE src.t ADD COLUMN c INT", "ALTER TABLE `dst`.`t` ADD COLUMN c INT"),
        ("", "ALTER TABLE `src`.`t` ADD COLUMN c INT", "ALTER TABLE `dst`.`t` ADD COLUMN c INT"),
        ("src", "CREATE INDEX ix ON t (a)", "CREATE INDEX ix ON `dst`.`t` (a)"),
        ("src", "TRUNCATE TABLE t", "TRUNCATE TABLE `dst`.`t`"),
        ("src", "ALTER TABLE u ADD COLUMN c INT", False),  # not restored
        ("other", "ALTER TABLE t ADD COLUMN c INT", False),  # another database's t
        ("src", "OPTIMIZE TABLE t", False),  # changes neither rows nor shape
        ("src", "ALTER TABLE t COMMENT 'src.u'", "ALTER TABLE `dst`.`t` COMMENT 'src.u'"),
    ],
)
def test_ddl_of_restored_tables_is_rewritten_to_the_target_whatever_the_default_database(
    default_db, statement, expected
):
    from backups.engine.binlog_select import Scope

    result = decide(Scope("src", "dst", {"t": "t"}), default_db, statement)
    if expected is False:
        assert result is False
    else:
        assert result == ("dst", expected.encode())


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        ("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW SET NEW.a = 1", "CREATE TRIGGER tr"),
        ("CREATE TABLE t2 SELECT * FROM t", "CREATE TABLE t2 SELECT"),
        ("ALTER TABLE t ADD FOREIGN KEY (a) REFERENCES u (id)", "REFERENCES u"),
        ("RENAME TABLE t TO other.t", "RENAME TABLE t TO other.t"),
        ("INSERT INTO t VALUES (1)", "INSERT INTO t"),
        ("DROP DATABASE src", "DROP DATABASE src"),
    ],
)
def test_ddl_that_cannot_be_redirected_is_refused_naming_the_statement(statement, named):
    from backups.engine.binlog_select import Scope, ScopeError

    with pytest.raises(ScopeError, match=named):
        decide(Scope("src", "dst", {"t": "t"}), "src", statement)


def test_in_place_shadow_tables_take_alters_but_refuse_renames():
    from backups.engine.binlog_select import Scope, ScopeError

    scope = Scope("src", "src", {"t": "t__sv_new_4"})
    assert decide(scope, "src", "ALTER TABLE t ADD COLUMN c INT") == (
        "src",
        b"ALTER TABLE `src`.`t__sv_new_4` ADD COLUMN c INT",
    )
    with pytest.raises(ScopeError, match="shadow"):
        decide(scope, "src", "RENAME TABLE t TO t_old, t_gho TO t")
