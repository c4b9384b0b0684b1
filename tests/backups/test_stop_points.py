"""Stop points: `--before-gtid` and `--until INSTANCE:FILE:POS` restore exactly the state
between transactions committed in the same second; what no incremental covers is refused."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from backups.models import RestoreRequest
from backups.services.restore_requests import restore_request_approve
from backups.services.restore_run_states import restore_run_start
from tests.backups.test_pitr import next_second, run_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def request_cli(cluster, *args):
    """`manage.py restore request ... --json`: (exit code, JSON object, stderr)."""
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command(
            "restore",
            "request",
            "--cluster",
            cluster.name,
            *args,
            "--target",
            "side",
            "--reason",
            "undo the bad delete",
            "--as",
            "op",
            "--json",
            stdout=out,
            stderr=err,
        )
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # CommandError when called in-process
        err.write(str(exc))
        code = 1
    return code, json.loads(out.getvalue()), err.getvalue()


def approve_and_run(request_id, run_jobs):
    request = RestoreRequest.objects.get(pk=request_id)
    restore_request_approve(request=request, approver=make_user("approver"), comment="ok")
    run = restore_run_start(request=RestoreRequest.objects.get(pk=request_id), actor=None)
    run_jobs("restores")
    run.refresh_from_db()
    return run


def notes(server, database):
    return server.execute("SELECT id, note FROM t_order ORDER BY id", database=database)


def commit(conn, statement):
    with conn.cursor() as cur:
        cur.execute(statement)
        conn.commit()
        cur.execute("SELECT @@last_gtid")
        gtid = cur.fetchone()[0]
        cur.execute("SHOW MASTER STATUS")
        file, pos = cur.fetchone()[:2]
    return gtid, file, int(pos)


@pytest.fixture
def incident(mariadb_servers, unique_name, run_jobs):
    """Good, bad, good within one second on s00; s01 writes in that second and a later one."""
    make_user("operator", username="op")
    cluster = make_cluster(mariadb_servers[:2], name=f"stop{unique_name}", tables={"t_order": 30})
    s00, s01 = cluster.shards.select_related("instance").order_by("name")
    a, b = server_for(mariadb_servers, s00), server_for(mariadb_servers, s01)
    run_backup("full", cluster, run_jobs)
    before = {s00.name: notes(a, s00.database), s01.name: notes(b, s01.database)}
    conn_a, conn_b = a.connect(s00.database), b.connect(s01.database)
    try:
        next_second()
        _g1, file, bad_start = commit(conn_a, "UPDATE t_order SET note = 'good 1' WHERE id = 1")
        bad_gtid, _f, _p = commit(conn_a, "DELETE FROM t_order WHERE id > 10")
        commit(conn_a, "UPDATE t_order SET note = 'good 2' WHERE id = 2")
        _g, b_file, b_pos = commit(conn_b, "UPDATE t_order SET note = 'same second' WHERE id = 5")
    finally:
        conn_a.close()
    next_second()
    commit(conn_b, "UPDATE t_order SET note = 'later' WHERE id = 6")
    conn_b.close()
    next_second()
    run_backup("incremental", cluster, run_jobs)

    expected_a = [(i, "good 1" if i == 1 else n) for i, n in before[s00.name]]
    expected_b = [(i, "same second" if i == 5 else n) for i, n in before[s01.name]]
    return {
        "cluster": cluster,
        "shards": (s00, s01),
        "servers": (a, b),
        "bad_gtid": bad_gtid,
        "bad_at": (a.name, file, bad_start),
        "b_until": (b.name, b_file, b_pos),
        "expected": (expected_a, expected_b),
    }


def test_before_gtid_restores_exactly_the_state_before_the_bad_transaction(
    incident, run_jobs, client
):
    cluster, gtid = incident["cluster"], incident["bad_gtid"]
    (s00, s01), (a, b) = incident["shards"], incident["servers"]
    instance, file, pos = incident["bad_at"]

    code, filed, err = request_cli(cluster, "--before-gtid", gtid)
    assert code == 0, err
    assert filed["before_gtid"] == gtid
    request = RestoreRequest.objects.get(pk=filed["id"])
    stops = {s["shard"]: s["stop"] for s in request.plan["stops"]}
    assert stops[s00.name] == f"stops before GTID {gtid} at {file}:{pos}"
    assert stops[s01.name].startswith(f"at the commit second of GTID {gtid}")

    run = approve_and_run(request.pk, run_jobs)
    assert run.status == "succeeded", run.error
    expected_a, expected_b = incident["expected"]
    assert notes(a, f"{s00.database}__r{request.pk}") == expected_a
    assert notes(b, f"{s01.database}__r{request.pk}") == expected_b
    points = {p["shard"]: p for p in run.stop_points}
    assert points[s00.name]["next_gtid"] == gtid and points[s00.name]["reached"]
    assert (points[s00.name]["file"], points[s00.name]["pos"]) == (file, pos)

    out = StringIO()
    call_command("restore", "show", str(request.pk), "--json", stdout=out)
    shown = json.loads(out.getvalue())
    assert {p["shard"] for p in shown["stop_points"]} == {s00.name, s01.name}
    out = StringIO()
    call_command("restore", "show", str(request.pk), stdout=out)
    assert f"stopped at {instance}:{file}:{pos}" in out.getvalue()
    assert f"before GTID {gtid}" in out.getvalue()

    # The run page says where each shard stopped.
    client.force_login(make_user("auditor"))
    page = client.get(f"/restores/{request.pk}/").content.decode()
    assert 'id="run-stop-points"' in page and f"{instance}:{file}:{pos}" in page
    assert f"stops before GTID {gtid}" in page


def test_the_wizard_takes_a_gtid_from_a_link_and_shows_each_shards_stop(incident, client):
    cluster, gtid = incident["cluster"], incident["bad_gtid"]
    s00, s01 = incident["shards"]
    client.force_login(make_user("operator"))
    linked = client.get("/restores/new/", {"cluster": cluster.name, "before_gtid": gtid})
    assert linked.status_code == 200
    assert f'value="{gtid}"' in linked.content.decode()

    base = {"cluster": cluster.name, "preview": "1", "before_gtid": gtid, "target": "side"}
    preview = client.get("/restores/new/", base)
    assert preview.status_code == 200, preview.content.decode()
    text = preview.content.decode()
    assert 'id="plan-stops"' in text and f"stops before GTID {gtid}" in text
    assert f"at the commit second of GTID {gtid}" in text

    both = client.get("/restores/new/", {**base, "at": "2026-01-01T00:00:00"})
    assert both.status_code == 200 and "Choose one source" in both.content.decode()

    filed = client.post("/restores/new/", {**base, "reason": "undo the bad delete"})
    request = RestoreRequest.objects.get(cluster=cluster)
    assert filed.status_code == 302
    assert request.before_gtid == gtid and request.stop_positions[0]["gtid"] == gtid


def test_until_positions_restore_the_same_state(incident, run_jobs):
    cluster = incident["cluster"]
    (s00, s01), (a, b) = incident["shards"], incident["servers"]
    until_a = ":".join(str(x) for x in incident["bad_at"])
    until_b = ":".join(str(x) for x in incident["b_until"])

    code, filed, err = request_cli(cluster, "--until", until_a)
    assert code != 0 and "no position for instance" in err and b.name in err

    code, filed, err = request_cli(cluster, "--until", until_a, "--until", until_b)
    assert code == 0, err
    assert filed["until"] == [until_a, until_b]
    run = approve_and_run(filed["id"], run_jobs)
    assert run.status == "succeeded", run.error
    expected_a, expected_b = incident["expected"]
    assert notes(a, f"{s00.database}__r{filed['id']}") == expected_a
    assert notes(b, f"{s01.database}__r{filed['id']}") == expected_b


def test_a_gtid_or_position_no_incremental_covers_is_refused_naming_what_is_covered(
    incident,
):
    cluster = incident["cluster"]
    a_name, file, _pos = incident["bad_at"]
    domain, server_id, _seq = incident["bad_gtid"].split("-")

    code, filed, err = request_cli(cluster, "--before-gtid", f"{domain}-{server_id}-999999")
    assert code != 0 and filed["id"] is None
    assert "is in no stored incremental" in err and f"{a_name}: " in err and "GTIDs" in err
    assert len(err.strip().splitlines()) == 1

    code, filed, err = request_cli(cluster, "--until", f"{a_name}:{file}:999999999")
    assert code != 0 and "is in no stored incremental" in err and f"{a_name}: " in err
    assert not RestoreRequest.objects.filter(cluster=cluster).exists()
