"""Flashback gaps (issue 13): bounded memory and batched checks, resumable runs, the
BINLOG privilege, artifacts kept from retention, stop points inside a transaction."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from backups.engine import flashback as engine
from backups.engine.mysql import Endpoint
from backups.models import RestoreRequest, RestoreRun
from backups.services import flashback as service
from backups.services import restore_runs as executor
from backups.services.flashback import flashback_inverses
from backups.services.restore_requests import restore_request_approve
from backups.services.restore_run_states import restore_run_start
from console.keys import encrypt_secret
from console.models import AuditEvent
from shards.models import Cluster
from tests.backups.test_binlog_browser import binlog_events_json
from tests.backups.test_flashback import request_flashback, rows_of
from tests.backups.test_pitr import checksum_of, next_second, run_backup, server_for
from tests.backups.test_stop_points import incident, request_cli  # noqa: F401 - a fixture
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


class SimulatedCrash(BaseException):
    """The worker dies (not an error the run could record)."""


class CountingConnection:
    """A real connection that counts the statements run through its cursors."""

    def __init__(self, conn):
        self.conn = conn
        self.statements: list[str] = []

    def cursor(self):
        outer = self
        cursor = self.conn.cursor()

        class Counting:
            def __enter__(self):
                cursor.__enter__()
                return self

            def __exit__(self, *exc):
                return cursor.__exit__(*exc)

            def execute(self, sql, params=None):
                outer.statements.append(sql)
                return cursor.execute(sql, params)

            def __getattr__(self, name):
                return getattr(cursor, name)

        return Counting()


def test_after_images_spill_to_a_file_and_rows_are_checked_a_batch_of_keys_per_query(
    mariadb_servers, unique_name, run_jobs, tmp_path, monkeypatch
):
    monkeypatch.setattr(engine, "KEY_BATCH", 7)
    monkeypatch.setattr(engine, "AFTER_FLUSH", 4)
    cluster = make_cluster(mariadb_servers[:1], name=f"fbg{unique_name}", tables={"t_order": 20})
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    run_backup("full", cluster, run_jobs)
    server.execute("UPDATE t_order SET amount = amount + 1", database=shard.database)  # bad
    server.execute("UPDATE t_order SET note = 'later' WHERE id = 2", database=shard.database)
    server.execute("DELETE FROM t_order WHERE id = 15", database=shard.database)
    run_backup("incremental", cluster, run_jobs)
    bad = next(
        t
        for t in binlog_events_json(cluster.name)["transactions"]
        if t["tables"] and t["tables"][0]["updated"] == 20
    )
    (item,) = flashback_inverses(
        cluster=cluster, spec={"gtids": [bad["gtid"]]}, shards=[], tables=[], workdir=str(tmp_path)
    )
    # The twenty after images live in a sqlite file in the work directory, not in memory.
    (path,) = tmp_path.rglob("*.after.sqlite3")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM after_image").fetchone()[0] == 20
    assert len(item.inverse.after) == 20
    conn = CountingConnection(server.connect(shard.database))
    try:
        count, sample = engine.flashback_conflicts(conn, item.inverse, item.infos)
    finally:
        conn.conn.close()
    assert count == 2
    assert sorted((c["key"]["id"], c["reason"]) for c in sample) == [
        (2, "the row was changed again after the change"),
        (15, "the row was deleted after the change"),
    ]
    # 20 keys, 7 per query: three round trips, not twenty.
    assert len(conn.statements) == 3
    # Big images split a batch further, by bytes: each query stays small.
    monkeypatch.setattr(engine, "CHECK_BYTES", 200)
    conn = CountingConnection(server.connect(shard.database))
    try:
        assert engine.flashback_conflicts(conn, item.inverse, item.infos)[0] == 2
    finally:
        conn.conn.close()
    assert len(conn.statements) > 3


def test_a_flashback_run_that_crashed_after_one_shard_committed_resumes_with_the_rest(
    mariadb_servers, unique_name, run_jobs, settings, monkeypatch
):
    cluster = make_cluster(mariadb_servers[:2], name=f"fbr{unique_name}", tables={"t_order": 10})
    shards = list(cluster.shards.select_related("instance").order_by("name"))
    run_backup("full", cluster, run_jobs)
    before = {}
    for shard in shards:
        server = server_for(mariadb_servers, shard)
        before[shard.name] = checksum_of(server, shard.database, "t_order")
        server.execute("DELETE FROM t_order WHERE id IN (3, 4)", database=shard.database)
    run_backup("incremental", cluster, run_jobs)
    bad = [
        t["gtid"]
        for t in binlog_events_json(cluster.name)["transactions"]
        if t["tables"] and t["tables"][0]["deleted"]
    ]
    assert len(bad) == 2
    filed = request_flashback(cluster, make_user("operator"), "--gtid", ",".join(bad))
    request = RestoreRequest.objects.get(pk=filed["id"])
    restore_request_approve(request=request, approver=make_user("approver"), comment="one")
    restore_request_approve(request=request, approver=make_user("approver"), comment="two")
    request.refresh_from_db()
    run = restore_run_start(request=request, actor=make_user("operator"))

    # The worker dies right after the first shard's transaction committed.
    original = service.flashback_apply

    def dying_apply(**kwargs):
        original(**kwargs)
        raise SimulatedCrash()

    monkeypatch.setattr(service, "flashback_apply", dying_apply)
    with pytest.raises(SimulatedCrash):
        executor.restore_run_execute(run=RestoreRun.objects.get(pk=run.pk))
    monkeypatch.setattr(service, "flashback_apply", original)
    run.refresh_from_db()
    assert run.status == "running"
    first, second = shards
    first_server = server_for(mariadb_servers, first)
    second_server = server_for(mariadb_servers, second)
    assert checksum_of(first_server, first.database, "t_order") == before[first.name]
    assert checksum_of(second_server, second.database, "t_order") != before[second.name]
    markers = first_server.execute(
        f"SELECT marker FROM {engine.MARKER_TABLE}", database=first.database
    )
    assert [tuple(m) for m in markers] == [(f"restore-request-{request.pk}",)]

    # Resumed (its heartbeat is stale): the first shard is skipped, not refused by its own
    # conflict check, and the second one is undone.
    settings.JOB_HEARTBEAT_STALE_SECONDS = 0
    resumed = restore_run_start(request=request, actor=make_user("operator"))
    assert resumed.pk == run.pk
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.rows_done == 4
    for shard in shards:
        server = server_for(mariadb_servers, shard)
        assert checksum_of(server, shard.database, "t_order") == before[shard.name]
        ids = [row[0] for row in rows_of(server, shard.database)]
        assert ids == list(range(1, 11))
        tables = server.execute(
            f"SHOW TABLES LIKE '{engine.MARKER_TABLE}'", database=shard.database
        )
        assert not tables  # the marker goes once the run is over
    applied = AuditEvent.objects.filter(
        action="restore.flashback_applied", object_id=str(request.pk)
    )
    assert sorted((e.details["shard"], e.details["resumed"]) for e in applied) == [
        (first.name, True),
        (second.name, False),
    ]


def test_filing_is_refused_naming_the_instance_whose_user_may_not_run_binlog_statements(
    mariadb_servers, unique_name, run_jobs
):
    cluster = make_cluster(mariadb_servers[:1], name=f"fbp{unique_name}", tables={"t_order": 10})
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    run_backup("full", cluster, run_jobs)
    server.execute("DELETE FROM t_order WHERE id IN (3, 4)", database=shard.database)
    run_backup("incremental", cluster, run_jobs)
    bad = [
        t["gtid"]
        for t in binlog_events_json(cluster.name)["transactions"]
        if t["tables"] and t["tables"][0]["deleted"]
    ]
    user = f"fbp{unique_name}"[:32]
    server.execute(
        f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'",
        f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP ON *.* TO '{user}'@'%'",
    )
    try:
        instance = shard.instance
        instance.user = user
        instance.password_encrypted = encrypt_secret("pw")
        instance.save(update_fields=["user", "password_encrypted"])
        # Preflight says so ahead of time...
        out = StringIO()
        try:
            call_command("topology", "discover", cluster.name, "--json", stdout=out)
        except SystemExit:
            pass  # (exit 1: this user also lacks what a backup needs, an error finding)
        found = [
            f for f in json.loads(out.getvalue())["findings"] if f["instance"] == instance.name
        ]
        assert any(
            f["severity"] == "warning"
            and f"user '{user}' on {instance.name} may not run BINLOG statements" in f["message"]
            for f in found
        ), found
        # ...and filing is refused in one sentence naming the instance.
        live = checksum_of(server, shard.database, "t_order")
        with pytest.raises(CommandError) as refused:
            request_flashback(cluster, make_user("operator"), "--gtid", ",".join(bad))
        message = str(refused.value)
        assert message.count(".") <= 2 and "\n" not in message  # one sentence
        assert f"instance {instance.name}: user '{user}' may not run BINLOG statements" in message
        assert "BINLOG REPLAY" in message
        assert not RestoreRequest.objects.filter(cluster=cluster).exists()
        assert checksum_of(server, shard.database, "t_order") == live
        # Granted BINLOG REPLAY (MariaDB 10.5+), the same user files it.
        server.execute(f"GRANT BINLOG REPLAY ON *.* TO '{user}'@'%'")
        filed = request_flashback(cluster, make_user("operator"), "--gtid", ",".join(bad))
        assert filed["state"] == "pending_approval" and filed["plan"]["rows"] == 2
    finally:
        server.execute(f"DROP USER IF EXISTS '{user}'@'%'")


def test_super_or_binlog_replay_on_every_database_lets_a_user_replay(mariadb_servers, unique_name):
    server = mariadb_servers[0]
    base = f"fbs{unique_name}"[:28]
    grants = {
        f"{base}_su": ("SUPER ON *.*", True),
        f"{base}_br": ("SELECT, BINLOG REPLAY ON *.*", True),
        f"{base}_db": ("ALL PRIVILEGES ON `mysql`.*", False),
        f"{base}_no": ("SELECT, INSERT ON *.*", False),
    }
    try:
        for user, (grant, _allowed) in grants.items():
            server.execute(
                f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'", f"GRANT {grant} TO '{user}'@'%'"
            )
        for user, (_grant, allowed) in grants.items():
            endpoint = Endpoint(
                name=server.name, host="127.0.0.1", port=server.port, user=user, password="pw"
            )
            assert engine.binlog_replay_allowed(endpoint) is allowed, user
    finally:
        for user in grants:
            server.execute(f"DROP USER IF EXISTS '{user}'@'%'")


def test_an_until_position_inside_a_transaction_is_refused_naming_its_boundaries(
    incident,  # noqa: F811 - the fixture imported above
):
    cluster = incident["cluster"]
    a_name, file, bad_start = incident["bad_at"]
    b_until = ":".join(str(x) for x in incident["b_until"])
    bad = next(
        t
        for t in binlog_events_json(cluster.name)["transactions"]
        if t["gtid"] == incident["bad_gtid"]
    )
    inside = f"{a_name}:{file}:{bad_start + 10}"
    code, filed, err = request_cli(cluster, "--until", inside, "--until", b_until)
    assert code != 0 and filed["id"] is None
    assert len(err.strip().splitlines()) == 1
    assert f"--until {inside} is inside transaction {incident['bad_gtid']}" in err
    assert f"{a_name}:{file}:{bad_start} to stop before it" in err
    assert f"{a_name}:{file}:{bad['end_pos']} to stop after it" in err
    assert not RestoreRequest.objects.filter(cluster=cluster).exists()
    # Its boundaries are taken as they are.
    end = f"{a_name}:{file}:{bad['end_pos']}"
    code, filed, err = request_cli(cluster, "--until", end, "--until", b_until)
    assert code == 0, err
    assert filed["until"] == [end, b_until]
    # The plan says what a position means.
    plan = RestoreRequest.objects.get(pk=filed["id"]).plan
    stops = {stop["instance"]: stop["stop"] for stop in plan["stops"]}
    assert stops[a_name] == (
        f"stops at {end} (a transaction boundary: every transaction ending at or before it "
        "is applied)"
    )


def test_browser_lists_ddl_run_without_a_default_database(mariadb_servers, unique_name, run_jobs):
    cluster = make_cluster(mariadb_servers[:1], name=f"fbd{unique_name}", tables={"t_order": 5})
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    other = f"fbd{unique_name}_other"
    server.execute(f"CREATE DATABASE {other}", f"CREATE TABLE {other}.t (id INT PRIMARY KEY)")
    try:
        run_backup("full", cluster, run_jobs)
        # DDL from a session without a default database.
        user = f"fbd{unique_name}"
        server.execute(
            f"ALTER TABLE `{shard.database}`.t_order ADD COLUMN extra INT NULL",
            f"ALTER TABLE {other}.t ADD COLUMN extra INT NULL",  # another database's table
            f"CREATE DATABASE {other}_made",  # logged under the database it creates
            f"CREATE USER '{user}'@'localhost'",  # names no database at all
        )
        run_backup("incremental", cluster, run_jobs)
        listed = binlog_events_json(cluster.name)["transactions"]
        ddl = [(t["instance"], t["shard"], t["database"], t["statement"]) for t in listed]
        assert ddl == [
            (
                shard.instance.name,
                shard.name,
                shard.database,
                f"ALTER TABLE `{shard.database}`.t_order ADD COLUMN extra INT NULL",
            ),
            # Not attributable to a shard: listed under its instance, database "".
            (shard.instance.name, "", "", f"CREATE USER '{user}'@'localhost'"),
        ]
        assert all(t["ddl"] for t in listed)
        # The table filter keeps the one that names the table.
        filtered = binlog_events_json(cluster.name, "--tables", "t_order")["transactions"]
        assert [t["database"] for t in filtered] == [shard.database]
    finally:
        server.execute(
            f"DROP DATABASE IF EXISTS {other}",
            f"DROP DATABASE IF EXISTS {other}_made",
            f"DROP USER IF EXISTS 'fbd{unique_name}'@'localhost'",
        )


# -- compressed query events (log_bin_compress), built here ----------------------------------


def compressed(event: bytes, checksum: bool = False) -> bytes:
    """The QUERY_COMPRESSED_EVENT MariaDB writes for `event` (a plain QUERY event)."""
    import struct
    import zlib

    from backups.engine.binlog_events import HEADER_LEN, QUERY_COMPRESSED_EVENT

    status_len = struct.unpack_from("<H", event, HEADER_LEN + 11)[0]
    start = HEADER_LEN + 13 + status_len + event[HEADER_LEN + 8] + 1
    statement = event[start:]
    lenlen = max(1, (len(statement).bit_length() + 7) // 8)
    packed = bytes([0x80 | lenlen]) + len(statement).to_bytes(lenlen, "big")
    body = bytearray(event[:start] + packed + zlib.compress(statement))
    body[4] = QUERY_COMPRESSED_EVENT
    body[9:13] = (len(body) + (4 if checksum else 0)).to_bytes(4, "little")
    if checksum:
        body += zlib.crc32(body).to_bytes(4, "little")
    return bytes(body)


def gtid_event(seq: int, standalone: bool = True) -> bytes:
    import struct

    from backups.engine.binlog_events import GTID_EVENT, HEADER_LEN

    body = struct.pack("<QIB", seq, 0, 1 if standalone else 0) + b"\x00" * 6
    return struct.pack("<IBIIIH", 1700000000, GTID_EVENT, 1, HEADER_LEN + len(body), 500, 0) + body


def test_a_compressed_query_event_reads_as_the_statement_it_packs():
    import zlib

    from backups.engine.binlog_events import QUERY_EVENT, query_of, query_uncompressed
    from tests.backups.test_ddl_window import query_event

    plain = query_event("other", "ALTER TABLE src.t ADD COLUMN c INT")
    assert query_uncompressed(compressed(plain), False) == plain
    with_crc = plain[:9] + (len(plain) + 4).to_bytes(4, "little") + plain[13:]
    with_crc += zlib.crc32(with_crc).to_bytes(4, "little")
    back = query_uncompressed(compressed(plain, checksum=True), True)
    assert back == with_crc and back[4] == QUERY_EVENT
    assert query_of(back[:-4]) == ("other", b"ALTER TABLE src.t ADD COLUMN c INT")
    broken = bytearray(compressed(plain))
    broken[-3] ^= 0xFF
    with pytest.raises(ValueError, match="compressed query event"):
        query_uncompressed(bytes(broken), False)


def test_compressed_ddl_in_the_window_is_applied_or_refused_by_name_never_skipped():
    from backups.engine.binlog_events import BINLOG_MAGIC, query_of
    from backups.engine.binlog_select import Scope, ScopeError, Transactions, plan_statements
    from tests.backups.test_ddl_window import query_event

    def window(statement: str, default_db: str = "other"):
        stream = BINLOG_MAGIC + gtid_event(7) + compressed(query_event(default_db, statement))
        (found,) = list(Transactions([stream]))
        group, _end, _ts, dbs, standalone = found
        assert standalone
        return plan_statements(group, Scope("src", "dst", {"t": "t"}), 8)

    # An ALTER of a restored table, compressed, reaches the target rewritten...
    decisions = window("ALTER TABLE src.t ADD COLUMN c INT")
    assert query_of(decisions[-1]) == ("dst", b"ALTER TABLE `dst`.`t` ADD COLUMN c INT")
    decisions = window("ALTER TABLE t ADD COLUMN c INT", default_db="src")
    assert query_of(decisions[-1]) == ("dst", b"ALTER TABLE `dst`.`t` ADD COLUMN c INT")
    # ...one that cannot be redirected is refused naming it...
    with pytest.raises(ScopeError, match="CREATE TRIGGER tr"):
        window("CREATE TRIGGER tr BEFORE INSERT ON src.t FOR EACH ROW SET NEW.a = 1")
    # ...and one that cannot be read is refused, not skipped.
    stream = bytearray(
        BINLOG_MAGIC + gtid_event(7) + compressed(query_event("src", "ALTER TABLE t ADD c INT"))
    )
    stream[-2] ^= 0xFF
    with pytest.raises(ScopeError, match="cannot be read"):
        list(Transactions([bytes(stream)]))


def test_a_server_with_log_bin_compress_its_ddl_is_listed_and_reaches_the_restore(
    unique_name, run_jobs, tmp_path
):
    """A mariadbd of this test's own (log_bin_compress is not set on the shared servers)."""
    from tests.backups.test_ddl_window import restore_at
    from tests.servers import MariaDBServer

    server = MariaDBServer(
        name="mz1",
        server_id=190,
        base_dir=tmp_path / "mz1",
        extra_args=["--log-bin-compress=ON", "--log-bin-compress-min-len=10"],
    )
    server.start(timeout=120)
    try:
        cluster = make_cluster([server], name=f"fbz{unique_name}", tables={"t_order": 10})
        shard = cluster.shards.select_related("instance").get()
        out = StringIO()
        call_command("topology", "discover", cluster.name, "--json", stdout=out)
        assert any(
            f["severity"] == "warning" and "log_bin_compress is ON on mz1" in f["message"]
            for f in json.loads(out.getvalue())["findings"]
        )
        run_backup("full", cluster, run_jobs)
        statement = f"ALTER TABLE `{shard.database}`.t_order ADD COLUMN compressed_col INT NULL"
        next_second()
        server.execute(statement)  # no default database, and long enough to be compressed
        run_backup("incremental", cluster, run_jobs)
        kinds = {
            event[2]
            for log in server.execute("SHOW BINARY LOGS")
            for event in server.execute(f"SHOW BINLOG EVENTS IN '{log[0]}'")
        }
        assert "Query_compressed" in kinds  # the server really compressed the ALTER
        listed = binlog_events_json(cluster.name)["transactions"]
        assert [(t["database"], t["statement"]) for t in listed] == [(shard.database, statement)]
        # (The browser does not decode compressed row events: it says so rather than
        # miscounting, so the rows come after the listing.)
        next_second()
        server.execute("UPDATE t_order SET compressed_col = id * 7", database=shard.database)
        at = datetime.now(UTC).replace(microsecond=0)  # --at is inclusive, to the second
        run_backup("incremental", cluster, run_jobs)
        request, run = restore_at(cluster, at, run_jobs)
        assert run.status == "succeeded", run.error
        side = f"{shard.database}__r{request.pk}"
        assert (
            server.execute("SELECT SUM(compressed_col) FROM t_order", database=side)[0][0] == 7 * 55
        )
    finally:
        server.kill()


def test_retention_keeps_flashback_sql_and_no_cluster_may_take_its_prefix(
    mariadb_servers, unique_name, run_jobs, tmp_path
):
    from backups.services.flashback import flashback_artifact_open
    from backups.services.sets import backup_set_expire, default_storage
    from shards.services.topology import TopologyError, cluster_create

    cluster = make_cluster(mariadb_servers[:1], name=f"fbk{unique_name}", tables={"t_order": 10})
    shard = cluster.shards.select_related("instance").get()
    server = server_for(mariadb_servers, shard)
    full = run_backup("full", cluster, run_jobs)
    server.execute("DELETE FROM t_order WHERE id IN (3, 4)", database=shard.database)
    incremental = run_backup("incremental", cluster, run_jobs)
    bad = [
        t["gtid"]
        for t in binlog_events_json(cluster.name)["transactions"]
        if t["tables"] and t["tables"][0]["deleted"]
    ]
    filed = request_flashback(cluster, make_user("operator"), "--gtid", ",".join(bad))
    request = RestoreRequest.objects.get(pk=filed["id"])
    key = f"flashback/{cluster.name}/request-{request.pk}.sql"
    assert request.artifact_key.endswith("#" + key)
    stored = b"".join(flashback_artifact_open(request))
    # Retention expires every set of the cluster: their objects go, the request's SQL stays.
    storage = default_storage()
    assert list(storage.list(f"{cluster.name}/"))
    operator = make_user("operator")
    backup_set_expire(backup_set=incremental, actor=operator)
    backup_set_expire(backup_set=full, actor=operator)
    assert not list(storage.list(f"{cluster.name}/"))
    assert b"".join(flashback_artifact_open(request)) == stored
    # The artifacts' prefix is no cluster's: a cluster named so (whose sets and whose
    # orphan sweep would cover flashback/...) is refused, by the console and by import.
    with pytest.raises(TopologyError, match="reserved"):
        cluster_create(actor=make_user("admin"), name="flashback")
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        "clusters:\n  - name: flashback\n    instances: []\n    shards: []\n", encoding="utf-8"
    )
    with pytest.raises(CommandError, match="cluster name 'flashback' is reserved"):
        call_command("topology", "import", str(topology), stdout=StringIO())
    assert not Cluster.objects.filter(name="flashback").exists()


def test_a_flashback_run_failing_after_one_shard_names_it_and_leaves_no_marker(
    mariadb_servers, unique_name, run_jobs, monkeypatch
):
    cluster = make_cluster(mariadb_servers[:2], name=f"fbf{unique_name}", tables={"t_order": 10})
    first, second = list(cluster.shards.select_related("instance").order_by("name"))
    run_backup("full", cluster, run_jobs)
    for shard in (first, second):
        server_for(mariadb_servers, shard).execute(
            "DELETE FROM t_order WHERE id IN (3, 4)", database=shard.database
        )
    run_backup("incremental", cluster, run_jobs)
    bad = [
        t["gtid"]
        for t in binlog_events_json(cluster.name)["transactions"]
        if t["tables"] and t["tables"][0]["deleted"]
    ]
    filed = request_flashback(cluster, make_user("operator"), "--gtid", ",".join(bad))
    request = RestoreRequest.objects.get(pk=filed["id"])
    restore_request_approve(request=request, approver=make_user("approver"), comment="one")
    restore_request_approve(request=request, approver=make_user("approver"), comment="two")
    original = service.flashback_apply

    def apply_then_someone_writes(**kwargs):
        result = original(**kwargs)
        # Between the two shards, row 3 of the second one is re-created by hand.
        server_for(mariadb_servers, second).execute(
            "INSERT IGNORE INTO t_order VALUES (3, 'x', 1, 'by hand', NOW(6))",
            database=second.database,
        )
        return result

    monkeypatch.setattr(service, "flashback_apply", apply_then_someone_writes)
    run = restore_run_start(request=RestoreRequest.objects.get(pk=request.pk), actor=None)
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "failed"
    assert "exists again" in run.error
    assert f"shards already undone (committed): {first.name}" in run.error
    for shard in (first, second):
        tables = server_for(mariadb_servers, shard).execute(
            f"SHOW TABLES LIKE '{engine.MARKER_TABLE}'", database=shard.database
        )
        assert not tables
