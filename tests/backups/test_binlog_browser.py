"""The binlog browser (`binlog events`) on real incrementals of real MariaDB binlogs."""

from __future__ import annotations

import json
import re
import subprocess
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from backups.models import BinlogSegment
from backups.selectors.binlog_browser import binlog_transactions_page, segment_open
from tests.backups.test_pitr import run_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def three_in_one_second(server, database):
    """Good insert, bad DELETE, good update: three transactions, committed within a second."""
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t_order VALUES (100, 'x', 1.00, 'good before', NOW(6))")
            cur.execute("DELETE FROM t_order WHERE id BETWEEN 3 AND 7")
            cur.execute("UPDATE t_order SET note = 'good after' WHERE id = 10")
    finally:
        conn.close()


def binlog_events_json(*args) -> dict:
    out = StringIO()
    call_command("binlog", "events", *args, "--json", stdout=out)
    return json.loads(out.getvalue())


def tool_gtids(cluster, tmp_path) -> list[str]:
    """The GTIDs `mariadb-binlog` decodes from the same stored segments, for the shard databases."""
    databases = {s.database for s in cluster.shards.all()}
    gtids = []
    segments = BinlogSegment.objects.filter(backup_set__cluster=cluster).select_related(
        "backup_set"
    )
    for segment in segments.order_by("backup_set_id", "instance_name", "index"):
        path = tmp_path / f"seg-{segment.pk}"
        with open(path, "wb") as handle:
            for block in segment_open(segment):
                handle.write(block)
        text = subprocess.run(
            ["mariadb-binlog", "--no-defaults", str(path)],
            check=True,
            capture_output=True,
            text=True,
            errors="replace",
        ).stdout
        current = None
        for line in text.splitlines():
            found = re.search(r"\tGTID (\d+-\d+-\d+)", line)
            if found:
                current = found.group(1)
                continue
            mapped = re.search(r"Table_map: `([^`]+)`\.`([^`]+)`", line)
            if current and mapped and mapped.group(1) in databases:
                gtids.append(current)
                current = None
    return gtids


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(
        mariadb_servers[:2], name=f"bb{unique_name}", tables={"t_order": 20, "t_user": 5}
    )


def test_binlog_events_lists_each_transaction_with_its_rows_and_statement(
    cluster, mariadb_servers, run_jobs, tmp_path
):
    run_backup("full", cluster, run_jobs)
    shards = list(cluster.shards.select_related("instance"))
    first = shards[0]
    three_in_one_second(server_for(mariadb_servers, first), first.database)
    server_for(mariadb_servers, shards[1]).execute(
        "UPDATE t_user SET note = 'other shard' WHERE id <= 2", database=shards[1].database
    )
    run_backup("incremental", cluster, run_jobs)

    listed = binlog_events_json(cluster.name)
    assert listed["cluster"] == cluster.name
    rows = listed["transactions"]
    # The browser and mariadb-binlog see the same transactions in the same segments.
    assert sorted(r["gtid"] for r in rows) == sorted(tool_gtids(cluster, tmp_path))
    assert len(rows) == 4

    on_first = [r for r in rows if r["shard"] == first.name]
    assert [r["tables"] for r in on_first] == [
        [{"table": "t_order", "inserted": 1, "updated": 0, "deleted": 0}],
        [{"table": "t_order", "inserted": 0, "updated": 0, "deleted": 5}],
        [{"table": "t_order", "inserted": 0, "updated": 1, "deleted": 0}],
    ]
    bad = on_first[1]
    assert bad["statement"] == "DELETE FROM t_order WHERE id BETWEEN 3 AND 7"
    assert bad["instance"] == first.instance.name and bad["database"] == first.database
    assert bad["file"].startswith("binlog.") and bad["start_pos"] < bad["end_pos"]
    assert on_first[0]["end_pos"] <= bad["start_pos"] and bad["end_pos"] <= on_first[2]["start_pos"]
    assert set(bad) >= {
        "instance",
        "shard",
        "database",
        "gtid",
        "file",
        "start_pos",
        "end_pos",
        "committed_at",
        "tables",
        "statement",
    }

    # Filters: a shard, a table, a time window.
    only_second = binlog_events_json(cluster.name, "--shards", shards[1].name)["transactions"]
    assert [r["shard"] for r in only_second] == [shards[1].name]
    assert only_second[0]["tables"] == [
        {"table": "t_user", "inserted": 0, "updated": 2, "deleted": 0}
    ]
    only_orders = binlog_events_json(cluster.name, "--tables", "t_order")["transactions"]
    assert [r["gtid"] for r in only_orders] == [r["gtid"] for r in on_first]
    later = binlog_events_json(cluster.name, "--since", "2999-01-01T00:00:00")["transactions"]
    assert later == []

    text = StringIO()
    call_command("binlog", "events", cluster.name, "--tables", "t_order", stdout=text)
    assert "DELETE FROM t_order WHERE id BETWEEN 3 AND 7" in text.getvalue()
    assert "t_order +0 ~0 -5" in text.getvalue()


def test_binlog_events_refuses_unknown_names_in_one_line(cluster):
    with pytest.raises(CommandError, match="no cluster named 'nope'"):
        call_command("binlog", "events", "nope")
    with pytest.raises(CommandError, match="no shard named s99"):
        call_command("binlog", "events", cluster.name, "--shards", "s99")
    with pytest.raises(CommandError, match="is not an ISO 8601 time"):
        call_command("binlog", "events", cluster.name, "--since", "yesterday")


def test_preflight_warns_when_the_binlog_does_not_record_statements(cluster, mariadb_servers):
    server = mariadb_servers[1]
    server.execute("SET GLOBAL binlog_annotate_row_events = OFF")
    try:
        out = StringIO()
        try:
            call_command("topology", "discover", cluster.name, "--json", stdout=out)
        except SystemExit:
            pass
    finally:
        server.execute("SET GLOBAL binlog_annotate_row_events = ON")
    findings = json.loads(out.getvalue())["findings"]
    warned = [f for f in findings if "binlog_annotate_row_events" in f["message"]]
    assert [(f["severity"], f["instance"]) for f in warned] == [("warning", server.name)]


def test_transactions_page_lists_and_pages_for_readers_only(
    cluster, mariadb_servers, run_jobs, client
):
    run_backup("full", cluster, run_jobs)
    shard = cluster.shards.select_related("instance").first()
    server = server_for(mariadb_servers, shard)
    for n in range(3):
        server.execute(f"UPDATE t_order SET note = 'n{n}' WHERE id = 1", database=shard.database)
    run_backup("incremental", cluster, run_jobs)
    url = f"/backups/transactions/{cluster.name}/"
    assert client.get(url).status_code == 302  # to the login page
    client.force_login(make_user(None))
    assert client.get(url).status_code == 403
    client.force_login(make_user("auditor"))
    page = client.get(url, {"shard": shard.name})
    assert page.status_code == 200
    body = page.content.decode()
    assert body.count('class="transaction"') == 3
    assert "undo this (flashback)" not in body  # auditors change nothing
    rows, more = binlog_transactions_page(cluster=cluster, shards=[shard.name], page_size=2)
    assert len(rows) == 2 and more
    rest, more = binlog_transactions_page(cluster=cluster, shards=[shard.name], page_size=2, page=2)
    assert len(rest) == 1 and not more
    assert {r["gtid"] for r in rows}.isdisjoint(r["gtid"] for r in rest)
    client.force_login(make_user("operator"))
    body = client.get(url, {"tables": "t_order", "page": "2"}).content.decode()
    assert body.count('class="transaction"') == 0 and "No stored transaction matches" in body
    body = client.get(url, {"since": "yesterday"})
    assert body.status_code == 400
