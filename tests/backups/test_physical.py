"""Physical backups (mariabackup) on real MariaDB: streaming, coordinates, encryption,
preflight refusals, and what a killed worker leaves behind."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import pytest

from backups.engine.manifest import manifest_objects
from backups.engine.physical import (
    ThrowawayServer,
    physical_extract,
    physical_prepare,
)
from backups.models import BackupSet
from backups.services.full_backups import backup_execute, backup_start
from backups.services.sets import set_data_key, set_manifest, set_storage
from shards.models import Instance
from tests.factories import make_cluster


def _with_datadirs(cluster, servers) -> None:
    by_port = {s.endpoint.port: s for s in servers}
    for instance in cluster.instances.all():
        instance.datadir = str(by_port[instance.port].datadir)
        instance.save(update_fields=["datadir"])


class SequenceWriter:
    """Inserts 1, 2, 3... into `<db>.seq` on one server, each committed before the next,
    and remembers the GTID of each insert."""

    def __init__(self, server, database: str) -> None:
        self.server = server
        self.database = database
        self.gtids: list[tuple[int, str]] = []
        self.stop = threading.Event()
        server.execute(
            "CREATE TABLE IF NOT EXISTS seq (n INT PRIMARY KEY) ENGINE=InnoDB", database=database
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from backups.engine.mysql import connect

        conn = connect(self.server.endpoint, self.database)
        conn.autocommit(True)
        n = 0
        with conn.cursor() as cur:
            while not self.stop.is_set():
                n += 1
                cur.execute("INSERT INTO seq VALUES (%s)", (n,))
                cur.execute("SELECT @@last_gtid")
                self.gtids.append((n, cur.fetchone()[0]))
                time.sleep(0.002)
        conn.close()

    def __enter__(self):
        self.thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def inserted_up_to(self, gtid_pos: str) -> int:
        """How many inserts a server at `gtid_pos` (domain-server-seq list) holds."""
        seqs = {}
        for item in gtid_pos.split(","):
            if item.strip():
                domain, server_id, seq = item.strip().split("-")
                seqs[(domain, server_id)] = int(seq)
        count = 0
        for n, gtid in self.gtids:
            domain, server_id, seq = gtid.split("-")
            if int(seq) <= seqs.get((domain, server_id), 0):
                count = n
        return count


def _restore_and_count(storage, obj, data_key, tmp_path: Path, database: str):
    target = tmp_path / f"restore-{obj['instance']}"
    physical_extract(
        storage, obj, data_key=data_key, target_dir=target, should_cancel=lambda: False
    )
    physical_prepare(target)
    server = ThrowawayServer(datadir=target, run_dir=tmp_path / f"run-{obj['instance']}")
    server.start()
    try:
        from backups.engine.mysql import connect, quote_ident

        conn = connect(server.endpoint)
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*), COALESCE(MAX(n), 0) FROM {quote_ident(database)}.seq")
            count, top = cur.fetchone()
        conn.close()
    finally:
        server.stop()
    return count, top


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_physical_backup_of_three_instances_with_writers_running(
    mariadb_servers, unique_name, tmp_path, encrypt
):
    cluster = make_cluster(mariadb_servers, name=f"ph{unique_name}")
    _with_datadirs(cluster, mariadb_servers)
    shards = {s.instance.name: s for s in cluster.shards.select_related("instance")}
    by_name = {s.name: s for s in mariadb_servers}
    writers = [SequenceWriter(by_name[name], shard.database) for name, shard in shards.items()]
    for writer in writers:
        writer.__enter__()
    try:
        backup_set = backup_start(
            cluster=cluster, actor="cli", method="physical", encrypt=encrypt, enqueue=False
        )
        backup_set = backup_execute(backup_set=backup_set)
    finally:
        for writer in writers:
            writer.__exit__()
    assert backup_set.status == "succeeded", backup_set.error
    assert backup_set.method == "physical"
    assert backup_set.stored_bytes > 0 and backup_set.raw_bytes > backup_set.stored_bytes

    storage = set_storage(backup_set)
    doc = set_manifest(backup_set)
    assert doc["method"] == "physical"
    objects = [o for o in manifest_objects(doc) if o["kind"] == "physical"]
    suffix = ".zst.enc" if encrypt else ".zst"
    assert sorted(o["key"] for o in objects) == sorted(
        f"{cluster.name}/{backup_set.pk}/physical/{name}/backup.mbstream{suffix}" for name in shards
    )
    for obj in objects:
        head = storage.head(obj["key"])
        assert head is not None and head.size == obj["stored_bytes"]
    first = next(iter(storage.get_stream(objects[0]["key"])))
    assert first.startswith(b"SVAE") if encrypt else first.startswith(b"\x28\xb5\x2f\xfd")

    # Each part's coordinates are those of its copied data: the restored files hold exactly
    # the writer's inserts up to the recorded GTID, with no gap.
    parts = {sb.instance_name: sb for sb in backup_set.shard_backups.all()}
    for writer, (name, shard) in zip(writers, shards.items(), strict=True):
        part = parts[name]
        assert part.binlog_file.startswith("binlog.") and part.binlog_pos and part.gtid
        obj = next(o for o in doc["physical"] if o["instance"] == name)
        assert (obj["binlog_file"], obj["binlog_pos"], obj["gtid"]) == (
            part.binlog_file,
            part.binlog_pos,
            part.gtid,
        )
        count, top = _restore_and_count(
            storage, obj, set_data_key(backup_set), tmp_path, shard.database
        )
        assert count == top > 0, "the restored sequence has a gap"
        assert top == writer.inserted_up_to(part.gtid)


def _fake_tool_dir(tmp_path: Path, version: str | None) -> str:
    """A PATH holding a `mariabackup` that claims `version`, or none at all."""
    directory = tmp_path / ("fake-" + (version or "none"))
    directory.mkdir()
    if version:
        script = directory / "mariabackup"
        script.write_text(
            f"#!/bin/sh\necho 'mariabackup based on MariaDB server {version}-MariaDB' >&2\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(directory)


@pytest.mark.django_db(transaction=True)
def test_physical_backup_refused_without_mariabackup_or_with_another_version(
    mariadb_servers, unique_name, tmp_path, monkeypatch
):
    cluster = make_cluster(mariadb_servers[:1], name=f"pr{unique_name}")
    _with_datadirs(cluster, mariadb_servers)
    monkeypatch.setenv("SHARDVAULT_MARIABACKUP_PATH", _fake_tool_dir(tmp_path, None))
    missing = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
    )
    assert missing.status == "failed"
    assert "mariabackup is not installed on worker" in missing.error

    monkeypatch.setenv("SHARDVAULT_MARIABACKUP_PATH", _fake_tool_dir(tmp_path, "10.6.12"))
    mismatch = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
    )
    assert mismatch.status == "failed"
    assert "is for MariaDB 10.6, but instance" in mismatch.error
    assert "runs 10.11" in mismatch.error
    assert not list(set_storage(mismatch).list(f"{cluster.name}/"))


@pytest.mark.django_db(transaction=True)
def test_physical_backup_refused_for_missing_datadir_and_privileges(
    mariadb_servers, unique_name, tmp_path
):
    server = mariadb_servers[0]
    user = f"pb{unique_name}"[:30]
    server.execute(f"DROP USER IF EXISTS '{user}'@'%'")
    server.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{unique_name}'")
    server.execute(f"GRANT SELECT, RELOAD ON *.* TO '{user}'@'%'")
    try:
        cluster = make_cluster([server], name=f"pp{unique_name}")
        instance = Instance.objects.get(cluster=cluster)
        from console.keys import encrypt_secret

        instance.user = user
        instance.password_encrypted = encrypt_secret(f"pw-{unique_name}")
        instance.datadir = str(tmp_path / "nowhere")
        instance.save()
        result = backup_execute(
            backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
        )
    finally:
        server.execute(f"DROP USER IF EXISTS '{user}'@'%'")
    assert result.status == "failed"
    assert f"the data directory {tmp_path / 'nowhere'} of instance" in result.error
    assert "lacks PROCESS, LOCK TABLES, BINLOG MONITOR (or REPLICATION CLIENT)" in result.error
    assert BackupSet.objects.get(pk=result.pk).shard_backups.get().error


def _command(process) -> str:
    try:
        return " ".join(process.cmdline())
    except Exception:  # noqa: BLE001 - gone or a zombie already
        return ""


def _backup_stage_free(server) -> bool:
    """True when a new connection can run a whole BACKUP STAGE cycle (only one connection
    at a time may be in a backup stage; a leftover mariabackup session would block it)."""
    from backups.engine.mysql import connect

    conn = connect(server.endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 5")
            for stage in ("START", "FLUSH", "BLOCK_DDL", "BLOCK_COMMIT", "END"):
                cur.execute(f"BACKUP STAGE {stage}")
        return True
    except Exception:  # noqa: BLE001 - lock wait timeout or "backup stage already in progress"
        return False
    finally:
        conn.close()


@pytest.mark.django_db(transaction=True)
def test_killed_worker_mid_stream_leaves_no_object_and_no_lock(
    mariadb_servers, unique_name, rq_worker_process, settings, monkeypatch
):
    import os
    import signal

    import psutil

    from backups.services.full_backups import backups_reap_stale

    settings.JOB_HEARTBEAT_STALE_SECONDS = 3
    monkeypatch.setenv("SHARDVAULT_HEARTBEAT_STALE_SECONDS", "3")
    cluster = make_cluster(mariadb_servers, name=f"pk{unique_name}", tables={"t_order": 150_000})
    _with_datadirs(cluster, mariadb_servers)
    worker = rq_worker_process("backups")
    # zstd level 19 keeps each instance's stream busy for seconds, so the kill lands mid-stream.
    backup_set = backup_start(cluster=cluster, actor="cli", method="physical", compression_level=19)

    def streaming():
        children = psutil.Process(worker.pid).children(recursive=True)
        return [p for p in children if "mariabackup --defaults-file" in _command(p)]

    deadline = time.monotonic() + 60
    tools = []
    while time.monotonic() < deadline and not tools:
        tools = streaming()
        time.sleep(0.01)
    assert tools, "mariabackup never started"
    # Kill the worker and its work horse, not mariabackup: it must die with its parent.
    horses = [p for p in psutil.Process(worker.pid).children(recursive=True) if p not in tools]
    tools = [p for p in tools if p.status() != psutil.STATUS_ZOMBIE]
    assert tools, "the stream ended before the kill"
    for process in [psutil.Process(worker.pid), *horses]:
        os.kill(process.pid, signal.SIGKILL)
    worker.wait()
    gone, alive = psutil.wait_procs(tools, timeout=10)
    assert not alive, "mariabackup outlived the worker that started it"

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        backups_reap_stale()
        backup_set.refresh_from_db()
        if backup_set.status != "running":
            break
        time.sleep(0.2)
    assert backup_set.status == "failed"
    assert "stopped (killed or crashed)" in backup_set.error
    storage = set_storage(backup_set)
    assert list(storage.list(backup_set.object_prefix + "/")) == []
    for server in mariadb_servers:
        assert _backup_stage_free(server), f"{server.name} still holds a backup stage lock"


@pytest.mark.django_db(transaction=True)
def test_drill_of_a_physical_set_gives_q_1_records_rto_and_removes_everything(
    mariadb_servers, unique_name
):
    import json
    from io import StringIO

    import psutil
    from django.core.management import call_command

    from backups.models import VerificationRun

    cluster = make_cluster(mariadb_servers[:2], name=f"pd{unique_name}")
    _with_datadirs(cluster, mariadb_servers)
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
    )
    assert backup_set.status == "succeeded", backup_set.error
    out = StringIO()
    call_command("verify", str(backup_set.pk), "--drill", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["drill"] is True
    assert (result["q"], result["t"], result["d"], result["a"]) == (1.0, 1.0, 1.0, 1.0), result
    run = VerificationRun.objects.get(backup_set=backup_set, drill=True)
    assert run.rto_seconds and run.rto_seconds > 0
    assert "CHECK TABLE and row counts" in run.progress_text
    backup_set.refresh_from_db()
    assert backup_set.q == 1.0
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "sv-drill-" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []


@pytest.mark.django_db(transaction=True)
def test_drill_of_a_physical_set_with_a_damaged_object_scores_below_1(
    mariadb_servers, unique_name, settings
):
    from backups.services.verification import verification_execute, verification_start

    cluster = make_cluster(mariadb_servers[:1], name=f"pq{unique_name}")
    _with_datadirs(cluster, mariadb_servers)
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
    )
    doc = set_manifest(backup_set)
    key = doc["physical"][0]["key"]
    path = Path(settings.STORAGE_URL.removeprefix("file://")) / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    run = verification_start(backup_set=backup_set, drill=True, enqueue=False)
    run = verification_execute(verification_id=run.pk)
    assert run.status == "succeeded", run.error
    assert run.q < 1.0 and run.a == 0.0 and run.t == 0.0
    assert any(p.get("object") == key for p in run.problems)


@pytest.mark.django_db(transaction=True)
def test_a_part_runs_on_the_worker_serving_its_instance_agent_queue(
    mariadb_servers, unique_name, rq_worker_process, monkeypatch, settings
):
    import os

    cluster = make_cluster(mariadb_servers[:2], name=f"pa{unique_name}")
    _with_datadirs(cluster, mariadb_servers)
    agent = cluster.instances.order_by("name").last()
    agent_queue = f"host-{agent.name}-{unique_name}"
    agent.agent_queue = agent_queue
    agent.save(update_fields=["agent_queue"])

    # Nobody serves the queue: the set fails saying so, and leaves nothing behind.
    settings.PHYSICAL_AGENT_PICKUP_SECONDS = 2
    lonely = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
    )
    assert lonely.status == "failed"
    assert f"no worker took the physical part of instance {agent.name}" in lonely.error
    assert list(set_storage(lonely).list(lonely.object_prefix + "/")) == []

    settings.PHYSICAL_AGENT_PICKUP_SECONDS = 60
    monkeypatch.setenv("SHARDVAULT_AGENT_QUEUES", agent_queue)
    rq_worker_process(agent_queue)
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
    )
    assert backup_set.status == "succeeded", backup_set.error
    workers = dict(backup_set.shard_backups.values_list("instance_name", "worker"))
    assert workers[agent.name] and not workers[agent.name].endswith(f":{os.getpid()}")
    other = next(name for name in workers if name != agent.name)
    assert workers[other]
    doc = set_manifest(backup_set)
    assert sorted(p["instance"] for p in doc["physical"]) == sorted(workers)
    part = backup_set.shard_backups.get(instance_name=agent.name)
    assert part.binlog_file and part.binlog_pos


@pytest.mark.django_db
def test_datadir_and_agent_queue_round_trip_through_the_topology_file(tmp_path, unique_name):
    from io import StringIO

    import yaml
    from django.core.management import CommandError, call_command

    name = f"ty{unique_name}"
    text = f"""
clusters:
  - name: {name}
    instances:
      - {{name: a, host: 127.0.0.1, port: 3306, user: backup, password_env: SHARD_A_PW,
          datadir: /var/lib/mysql, agent_queue: host-a}}
      - {{name: b, host: 127.0.0.1, port: 3307, user: backup, password_env: SHARD_B_PW}}
    shards:
      - {{name: s00, instance: a, database: orders_00}}
"""
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    call_command("topology", "import", str(path), stdout=StringIO())
    a = Instance.objects.get(cluster__name=name, name="a")
    assert (a.datadir, a.agent_queue) == ("/var/lib/mysql", "host-a")
    out = StringIO()
    call_command("topology", "export", "--cluster", name, stdout=out)
    exported = yaml.safe_load(out.getvalue())["clusters"][0]["instances"]
    assert exported[0]["datadir"] == "/var/lib/mysql" and exported[0]["agent_queue"] == "host-a"
    assert "datadir" not in exported[1] and "agent_queue" not in exported[1]

    path.write_text(text.replace("datadir: /var/lib/mysql", "datadir: var/lib/mysql"))
    with pytest.raises(CommandError, match="datadir must be an absolute path"):
        call_command("topology", "import", str(path), stdout=StringIO())


@pytest.mark.django_db
def test_instance_page_form_saves_datadir_and_agent_queue(client, unique_name):
    from shards.models import Cluster
    from tests.factories import make_user

    cluster = Cluster.objects.create(name=f"fp{unique_name}")
    client.force_login(make_user("operator"))
    response = client.post(
        f"/topology/clusters/{cluster.name}/instances/new/",
        {
            "name": "a",
            "host": "127.0.0.1",
            "port": 3306,
            "user": "backup",
            "password_env": "SHARD_A_PW",
            "max_connections": 4,
            "datadir": "/srv/mysql/a",
            "agent_queue": "host-a",
        },
    )
    assert response.status_code in (200, 302), response.content[:500]
    instance = Instance.objects.get(cluster=cluster, name="a")
    assert (instance.datadir, instance.agent_queue) == ("/srv/mysql/a", "host-a")
    page = client.get(f"/topology/clusters/{cluster.name}/instances/a/edit/").content.decode()
    assert "/srv/mysql/a" in page and "host-a" in page


@pytest.mark.django_db(transaction=True)
def test_discovery_reports_physical_readiness_per_instance(mariadb_servers, unique_name, tmp_path):
    import json
    from io import StringIO

    from django.core.management import call_command

    from backups.services.policies import policy_update
    from tests.factories import make_user

    cluster = make_cluster(mariadb_servers[:2], name=f"pf{unique_name}")
    _with_datadirs(cluster, mariadb_servers)
    broken = cluster.instances.order_by("name").last()
    broken.datadir = str(tmp_path / "missing")
    broken.save(update_fields=["datadir"])

    def findings():
        out = StringIO()
        try:
            call_command("topology", "discover", cluster.name, "--json", stdout=out)
        except SystemExit:
            pass
        return [
            f
            for f in json.loads(out.getvalue())["findings"]
            if "physical" in f["message"] or "data directory" in f["message"]
        ]

    found = findings()
    ready = [f for f in found if f["severity"] == "ok"]
    assert len(ready) == 1 and "can be backed up physically" in ready[0]["message"]
    problem = next(f for f in found if f["instance"] == broken.name)
    assert problem["severity"] == "warning" and "is not readable" in problem["message"]

    policy_update(cluster=cluster, actor=make_user("admin"), changes={"full_method": "physical"})
    problem = next(f for f in findings() if f["instance"] == broken.name)
    assert problem["severity"] == "error"


@pytest.mark.django_db(transaction=True)
def test_cancel_stops_a_physical_backup_mid_stream_and_keeps_no_object(
    mariadb_servers, unique_name
):
    from django.db import connections

    from backups.services.full_backups import backup_cancel
    from tests.factories import make_user

    cluster = make_cluster(mariadb_servers, name=f"pc{unique_name}", tables={"t_order": 150_000})
    _with_datadirs(cluster, mariadb_servers)
    backup_set = backup_start(
        cluster=cluster, actor="cli", method="physical", compression_level=19, enqueue=False
    )
    outcome = {}

    def run():
        try:
            outcome["set"] = backup_execute(backup_set=backup_set)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        backup_set.refresh_from_db()
        if backup_set.status == "running" and "mariabackup" in backup_set.progress_text:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    cancelled_at = time.monotonic()
    backup_cancel(backup_set=backup_set, actor=make_user("operator"))
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 10
    result = outcome["set"]
    assert result.status == "cancelled", result.error
    assert list(set_storage(result).list(result.object_prefix + "/")) == []
    for server in mariadb_servers:
        assert _backup_stage_free(server)


@pytest.mark.django_db(transaction=True)
def test_the_password_reaches_mariabackup_through_a_file_never_argv(mariadb_servers, unique_name):
    import psutil

    from console.keys import encrypt_secret

    server = mariadb_servers[0]
    user = f"pw{unique_name}"[:30]
    password = f"S3cret-{unique_name}"
    server.execute(f"DROP USER IF EXISTS '{user}'@'%'")
    server.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
    server.execute(
        f"GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR, SELECT ON *.* TO '{user}'@'%'"
    )
    seen: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for process in psutil.process_iter(["cmdline"]):
                line = " ".join(process.info["cmdline"] or [])
                if "mariabackup" in line and "--backup" in line:
                    seen.append(line)
            time.sleep(0.01)

    try:
        cluster = make_cluster([server], name=f"pw{unique_name}")
        instance = Instance.objects.get(cluster=cluster)
        instance.user = user
        instance.password_encrypted = encrypt_secret(password)
        instance.datadir = str(server.datadir)
        instance.save()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = backup_execute(
            backup_set=backup_start(
                cluster=cluster, actor="cli", method="physical", compression_level=19, enqueue=False
            )
        )
    finally:
        stop.set()
        server.execute(f"DROP USER IF EXISTS '{user}'@'%'")
    assert result.status == "succeeded", result.error
    assert seen, "mariabackup was never seen running"
    assert not any(password in line for line in seen)


@pytest.mark.django_db(transaction=True)
def test_set_page_lists_each_instances_object_with_bytes_sha256_and_coordinates(
    mariadb_servers, unique_name, client
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    from tests.factories import make_user

    cluster = make_cluster(mariadb_servers[:2], name=f"po{unique_name}")
    _with_datadirs(cluster, mariadb_servers)
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", method="physical", enqueue=False)
    )
    assert backup_set.status == "succeeded", backup_set.error
    stored = {o["instance"]: o for o in set_manifest(backup_set)["physical"]}
    assert len(stored) == 2
    client.force_login(make_user("auditor"))
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse("backups:set_detail", args=[backup_set.pk]))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="physical-objects"' in page
    for name, obj in stored.items():
        assert f'data-instance="{name}"' in page
        assert obj["key"] in page and obj["sha256"] in page
        assert f'data-bytes="{obj["stored_bytes"]}"' in page
        assert f"{obj['binlog_file']}:{obj['binlog_pos']}" in page
    reads = [q for q in queries.captured_queries if "backups_physicalobject" in q["sql"]]
    assert len(reads) == 1  # one query for every instance's object
