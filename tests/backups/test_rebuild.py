"""Fault recovery: `restore request --target rebuild:INSTANCE --datadir PATH [--at ISO]` on
real MariaDB: two approvals, prepare, move, roll forward, and the refusals."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from backups.engine.binlog_apply import APPLIED_TABLE
from backups.engine.checksum import table_checksum
from backups.engine.mysql import connect
from backups.models import RestoreRequest
from backups.services.full_backups import backup_execute, backup_start
from backups.services.incrementals import incremental_execute
from tests.factories import make_cluster, make_user
from tests.servers import MariaDBServer

pytestmark = pytest.mark.django_db(transaction=True)


def restore(*args) -> dict | str:
    out = StringIO()
    call_command("restore", *args, stdout=out)
    text = out.getvalue().strip()
    return json.loads(text) if "--json" in args else text


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    cluster = make_cluster(mariadb_servers[:2], name=f"rb{unique_name}")
    by_port = {s.endpoint.port: s for s in mariadb_servers}
    for instance in cluster.instances.all():
        instance.datadir = str(by_port[instance.port].datadir)
        instance.save(update_fields=["datadir"])
    return cluster


def physical_set(cluster, *, encrypt=False):
    backup_set = backup_execute(
        backup_set=backup_start(
            cluster=cluster, actor="cli", method="physical", encrypt=encrypt, enqueue=False
        )
    )
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def request_rebuild(cluster, instance_name, datadir, *selection, operator=None) -> dict:
    operator = operator or make_user("operator")
    return restore(
        "request",
        "--cluster",
        cluster.name,
        *selection,
        "--target",
        f"rebuild:{instance_name}",
        "--datadir",
        str(datadir),
        "--reason",
        "server m0 lost its disk",
        "--as",
        operator.username,
        "--json",
    )


def approve_twice(request_id) -> dict:
    restore("approve", str(request_id), "--as", make_user("approver").username)
    return restore("approve", str(request_id), "--as", make_user("approver").username, "--json")


def checksums(endpoint, databases) -> dict:
    conn = connect(endpoint)
    try:
        with conn.cursor() as cur:
            result = {}
            for database in databases:
                cur.execute(
                    "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
                    "AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
                    (database,),
                )
                for (table,) in cur.fetchall():
                    result[(database, table)] = table_checksum(conn, database, table)
            return result
    finally:
        conn.close()


def started_on(datadir_parent, server_id=901) -> MariaDBServer:
    """The test's own mariadbd on the rebuilt data directory (`<parent>/data`)."""
    server = MariaDBServer(name="rebuilt", server_id=server_id, base_dir=datadir_parent)
    server.start()
    return server


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_rebuild_of_one_instance_into_a_fresh_datadir_matches_the_source(
    cluster, mariadb_servers, tmp_path, encrypt, client
):
    instance = cluster.instances.order_by("name").first()
    source = next(s for s in mariadb_servers if s.endpoint.port == instance.port)
    databases = list(cluster.shards.filter(instance=instance).values_list("database", flat=True))
    backup_set = physical_set(cluster, encrypt=encrypt)
    expected = checksums(source.endpoint, databases)  # nothing wrote since the set

    datadir = tmp_path / "rebuilt" / "data"
    filed = request_rebuild(cluster, instance.name, datadir, "--set", str(backup_set.pk))
    assert filed["state"] == "pending_approval" and filed["target"] == f"rebuild:{instance.name}"
    request = RestoreRequest.objects.get(pk=filed["id"])
    assert request.approvals_required == 2
    plan = request.plan
    assert plan["bytes"] > 0 and plan["raw_bytes"] > plan["bytes"]
    assert any("mariabackup --prepare" in step for step in plan["steps"])
    assert "estimate" in plan
    assert filed["datadir"] == str(datadir) and filed["plan"]["steps"] == plan["steps"]
    approver = make_user("approver")
    client.force_login(approver)
    page = client.get(f"/restores/{filed['id']}/").content.decode()
    assert f"rebuild:{instance.name}" in page and str(datadir) in page
    assert "mariabackup --prepare" in page

    assert approve_twice(filed["id"])["state"] == "approved"
    ran = restore("run", str(filed["id"]), "--wait", "--json")
    assert ran["state"] == "succeeded", ran["error"]
    assert ran["q"] == 1.0

    server = started_on(tmp_path / "rebuilt")
    try:
        rebuilt = checksums(server.endpoint, databases)
    finally:
        server.stop()
    assert expected and rebuilt == expected

    # The next plan has an estimate from this measured rebuild.
    again = request_rebuild(
        cluster, instance.name, tmp_path / "second" / "data", "--set", str(backup_set.pk)
    )
    assert (
        "measured on earlier rebuilds"
        in RestoreRequest.objects.get(pk=again["id"]).plan["estimate"]
    )


def test_rebuild_at_a_second_rolls_forward_through_an_incremental(
    cluster, mariadb_servers, tmp_path
):
    instance = cluster.instances.order_by("name").first()
    source = next(s for s in mariadb_servers if s.endpoint.port == instance.port)
    shard = cluster.shards.filter(instance=instance).order_by("name").first()
    source.execute("CREATE TABLE pitr_rows (n INT PRIMARY KEY)", database=shard.database)
    backup_set = physical_set(cluster)

    source.execute("INSERT INTO pitr_rows VALUES (1), (2), (3)", database=shard.database)
    time.sleep(1.2)
    at = datetime.now(UTC).replace(microsecond=0)
    time.sleep(1.2)
    source.execute("INSERT INTO pitr_rows VALUES (4), (5)", database=shard.database)
    incremental = incremental_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", kind="incremental", enqueue=False)
    )
    assert incremental.status == "succeeded", incremental.error
    assert incremental.parent_id == backup_set.pk

    datadir = tmp_path / "pitr" / "data"
    filed = request_rebuild(
        cluster, instance.name, datadir, "--set", str(backup_set.pk), "--at", at.isoformat()
    )
    plan = RestoreRequest.objects.get(pk=filed["id"]).plan
    assert plan["needs_incrementals"] and plan["chain"] == [incremental.pk]
    approve_twice(filed["id"])
    ran = restore("run", str(filed["id"]), "--wait", "--json")
    assert ran["state"] == "succeeded", ran["error"]

    server = started_on(tmp_path / "pitr", server_id=902)
    try:
        rows = server.execute("SELECT n FROM pitr_rows ORDER BY n", database=shard.database)
        leftovers = server.execute(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
            f"AND TABLE_NAME = '{APPLIED_TABLE}'",
            database=shard.database,
        )
    finally:
        server.stop()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert leftovers[0][0] == 0


def test_rebuild_refusals_non_empty_datadir_logical_set_and_one_approval(
    cluster, tmp_path, run_jobs
):
    instance = cluster.instances.order_by("name").first()
    backup_set = physical_set(cluster)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "ibdata1").write_bytes(b"x")
    with pytest.raises(CommandError, match="is not empty"):
        request_rebuild(cluster, instance.name, busy, "--set", str(backup_set.pk))

    logical = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", consistency="lockfree", enqueue=False)
    )
    assert logical.status == "succeeded", logical.error
    with pytest.raises(CommandError, match="not a physical full set"):
        request_rebuild(cluster, instance.name, tmp_path / "x" / "data", "--set", str(logical.pk))
    with pytest.raises(CommandError, match="--datadir"):
        restore(
            "request",
            "--cluster",
            cluster.name,
            "--set",
            str(backup_set.pk),
            "--target",
            f"rebuild:{instance.name}",
            "--reason",
            "r",
            "--as",
            make_user("operator").username,
        )
    assert not RestoreRequest.objects.exists()

    datadir = tmp_path / "one" / "data"
    filed = request_rebuild(cluster, instance.name, datadir, "--set", str(backup_set.pk))
    once = restore("approve", str(filed["id"]), "--as", make_user("approver").username, "--json")
    assert once["state"] == "pending_approval"
    with pytest.raises(CommandError, match="not approved|pending_approval"):
        restore("run", str(filed["id"]))
    assert not datadir.exists()

    # A datadir filled after the approval is refused again by the run, untouched.
    filed = request_rebuild(cluster, instance.name, datadir, "--set", str(backup_set.pk))
    approve_twice(filed["id"])
    datadir.mkdir(parents=True)
    (datadir / "keep-me").write_text("precious")
    with pytest.raises(CommandError, match="is not empty"):
        restore("run", str(filed["id"]), "--wait")
    assert [p.name for p in datadir.iterdir()] == ["keep-me"]


def test_a_logical_restore_of_a_physical_set_points_to_rebuild(cluster):
    physical = physical_set(cluster)
    operator = make_user("operator")
    args = ["request", "--cluster", cluster.name, "--reason", "r", "--as", operator.username]
    with pytest.raises(CommandError, match="restore it with --target rebuild:INSTANCE"):
        restore(*args, "--set", str(physical.pk), "--target", "side")


def test_a_rebuild_runs_on_the_host_agent_of_its_instance(
    cluster, tmp_path, rq_worker_process, monkeypatch, unique_name
):
    from backups import queue
    from backups.models import RestoreRun

    instance = cluster.instances.order_by("name").first()
    agent_queue = f"host-{instance.name}-{unique_name}"
    instance.agent_queue = agent_queue
    instance.save(update_fields=["agent_queue"])
    monkeypatch.setenv("SHARDVAULT_AGENT_QUEUES", agent_queue)
    rq_worker_process(agent_queue)  # only the host agent: nobody serves `restores`
    backup_set = physical_set(cluster)  # the part itself runs on the agent too
    datadir = tmp_path / "agent" / "data"
    filed = request_rebuild(cluster, instance.name, datadir, "--set", str(backup_set.pk))
    approve_twice(filed["id"])
    restore("run", str(filed["id"]))
    run = RestoreRun.objects.get(request_id=filed["id"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.3)
        run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert queue.job_status(run.job_id, queue=agent_queue) == "finished"
    assert (datadir / "ibdata1").exists()


def test_the_restore_wizard_offers_rebuild_with_a_datadir_and_files_it_for_two_approvals(
    cluster, tmp_path, client
):
    from django.urls import reverse

    instance = cluster.instances.order_by("name").first()
    url = reverse("restores:request_new")
    client.force_login(make_user("operator"))
    # No physical set yet: no rebuild target offered.
    page = client.get(url, {"cluster": cluster.name}).content.decode()
    assert f'value="rebuild:{instance.name}"' not in page
    backup_set = physical_set(cluster)
    page = client.get(url, {"cluster": cluster.name}).content.decode()
    assert f'value="rebuild:{instance.name}"' in page and 'name="datadir"' in page

    datadir = tmp_path / "fresh" / "data"
    choice = {
        "cluster": cluster.name,
        "preview": "1",
        "source_set": backup_set.pk,
        "target": f"rebuild:{instance.name}",
    }
    missing = client.get(url, choice)
    assert "A rebuild needs the empty data directory" in missing.content.decode()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "ibdata1").write_bytes(b"x")
    refused = client.get(url, {**choice, "datadir": str(busy)})
    assert refused.status_code == 400 and "is not empty" in refused.content.decode()

    preview = client.get(url, {**choice, "datadir": str(datadir)})
    assert preview.status_code == 200
    plan = preview.content.decode()
    assert 'id="plan-rebuild"' in plan and str(datadir) in plan
    assert (
        "mariabackup --prepare" in plan
        and f"move the prepared files into the empty {datadir}" in plan
    )
    assert 'id="plan-estimate"' in plan and 'id="file-request"' in plan
    assert not RestoreRequest.objects.exists()

    filed = client.post(url, {**choice, "datadir": str(datadir), "reason": "m0 lost its disk"})
    assert filed.status_code == 302
    request = RestoreRequest.objects.get()
    assert (request.target_kind, request.target_instance, request.datadir) == (
        "rebuild",
        instance,
        str(datadir),
    )
    assert request.approvals_required == 2 and request.state == "pending_approval"
    assert request.plan["steps"] and request.plan["object"]["stored_bytes"] > 0
    assert not datadir.exists()  # filing touches nothing
