"""Cold backups (DESIGN.md "Methods"): the global read lock held on every instance for the
whole dump, so non-InnoDB tables are copied at the cut too.

A writer appends sequence numbers round-robin to three shards on three servers, into a
MyISAM table and an InnoDB table in turn, each insert committed before the next begins. A
cold backup must restore to exactly 1..K (MyISAM rows included) and no insert may complete
while the lock is held; cancel, and a worker killed mid-dump, must free the writer at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from io import StringIO

import psutil
import pytest
from django.core.management import call_command

from backups.engine.dump import dump_cluster
from backups.engine.load import create_database_objects, load_table
from backups.engine.manifest import manifest_read
from backups.engine.mysql import quote_ident
from backups.engine.types import TableLoadJob
from backups.models import BackupSet
from backups.services.full_backups import backup_cancel, backup_start, backups_reap_stale
from backups.services.sets import set_storage
from console.keys import manifest_hmac_key
from tests.backups.conftest import drop_database, make_spec
from tests.factories import drop_cluster_databases, make_cluster, make_user

SEQ_TABLES = ("seq_m", "seq_i")  # MyISAM, InnoDB
STALE_SECONDS = 3


class SequenceWriter:
    """Inserts 1, 2, 3, ... round-robin over the shards (alternating MyISAM and InnoDB),
    one autocommit insert at a time; remembers when each began and when it returned."""

    def __init__(self, targets):  # [(server, database)] in shard order
        self.targets = targets
        self.commits: list[tuple[int, float, float]] = []  # (n, began, returned)
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conns = [server.connect(database) for server, database in self.targets]
        try:
            n = 0
            while not self._stop.is_set():
                n += 1
                table = SEQ_TABLES[n % 2]
                began = time.time()
                with conns[n % len(conns)].cursor() as cur:
                    cur.execute(f"INSERT INTO {table} VALUES (%s, REPEAT('x', 50))", (n,))
                self.commits.append((n, began, time.time()))
        except BaseException as exc:  # noqa: BLE001
            self.failures.append(exc)
        finally:
            for conn in conns:
                conn.close()

    def start(self) -> SequenceWriter:
        self._thread.start()
        wait_for(lambda: len(self.commits) > 60, 30, "the writer to get going")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the writer is still blocked"
        assert not self.failures, self.failures

    def committed_after(self, moment: float) -> float | None:
        """When the first insert that returned after `moment` returned (None: none yet)."""
        first = None
        for _, _, returned in reversed(self.commits):
            if returned <= moment:
                break
            first = returned
        return first

    def blocked_since(self) -> float:
        """Seconds since the last insert returned."""
        return time.time() - self.commits[-1][2]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def writer_held(writer: SequenceWriter, backup_set) -> bool:
    """True once the writer has been blocked for a second by the set's lock; fails at once
    when the set ended first (the dump was too short for the test to see the lock)."""
    backup_set.refresh_from_db()
    assert backup_set.status in ("pending", "running"), (backup_set.status, backup_set.error)
    return writer.blocked_since() > 1.0


def add_sequence_tables(cluster, servers) -> list[tuple[object, str]]:
    by_port = {s.endpoint.port: s for s in servers}
    targets = []
    for shard in cluster.shards.select_related("instance").order_by("name"):
        server = by_port[shard.instance.port]
        server.execute(
            "CREATE TABLE seq_m (n BIGINT PRIMARY KEY, pad VARCHAR(60)) ENGINE=MyISAM",
            "CREATE TABLE seq_i (n BIGINT PRIMARY KEY, pad VARCHAR(60)) ENGINE=InnoDB",
            database=shard.database,
        )
        targets.append((server, shard.database))
    return targets


def _cold_cluster(mariadb_servers, name: str, rows: int):
    cluster = make_cluster(mariadb_servers, name=name, tables={"t_order": rows}, max_connections=3)
    return cluster, add_sequence_tables(cluster, mariadb_servers)


@pytest.fixture
def cold_cluster(mariadb_servers, unique_name):
    cluster, targets = _cold_cluster(mariadb_servers, f"cold{unique_name}", 40_000)
    yield cluster, targets
    drop_cluster_databases(cluster, mariadb_servers)


@pytest.fixture
def long_cold_cluster(mariadb_servers, unique_name):
    """Enough rows that a cold dump on a worker holds the lock for several seconds on a fast
    machine too, so a test can see writers held before it cancels or kills the worker."""
    cluster, targets = _cold_cluster(mariadb_servers, f"coldl{unique_name}", 160_000)
    yield cluster, targets
    drop_cluster_databases(cluster, mariadb_servers)


@pytest.fixture
def slow_dumps(settings, monkeypatch):
    """Dumps that take a few seconds (zstd level 19, small chunks), also on a worker process."""
    settings.BACKUP_COMPRESSION_LEVEL = 19
    settings.BACKUP_CHUNK_ROWS = 1000
    settings.JOB_HEARTBEAT_STALE_SECONDS = STALE_SECONDS
    monkeypatch.setenv("SHARDVAULT_CHUNK_ROWS", "1000")
    monkeypatch.setenv("SHARDVAULT_HEARTBEAT_STALE_SECONDS", str(STALE_SECONDS))


def restored_numbers(backup_set, target, tag: str) -> tuple[list[int], dict[str, str]]:
    """Load every shard's sequence tables from the set's stored chunks into scratch
    databases on `target`; returns the numbers found and each restored table's engine."""
    storage = set_storage(backup_set)
    manifest = manifest_read(storage, backup_set.object_prefix, manifest_hmac_key())
    numbers: list[int] = []
    engines: dict[str, str] = {}
    for shard in manifest["shards"]:
        database = f"coldr_{tag}_{shard['name']}"
        drop_database(target, database)
        try:
            create_database_objects(target.endpoint, database, shard, tables=list(SEQ_TABLES))
            for table in shard["tables"]:
                if table["name"] not in SEQ_TABLES:
                    continue
                loaded = load_table(
                    TableLoadJob(
                        manifest_table=table,
                        target=target.endpoint,
                        target_database=database,
                        target_table=table["name"],
                    ),
                    storage,
                    progress=lambda e: None,
                    should_cancel=lambda: False,
                )
                assert loaded.checksum_ok, loaded.error
                numbers += [
                    row[0]
                    for row in target.execute(
                        f"SELECT n FROM {quote_ident(table['name'])}", database=database
                    )
                ]
            for name, engine in target.execute(
                "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES"
                f" WHERE TABLE_SCHEMA = '{database}'"
            ):
                engines[f"{shard['name']}.{name}"] = engine
        finally:
            drop_database(target, database)
    return numbers, engines


@pytest.mark.django_db(transaction=True)
def test_cold_backup_blocks_writes_for_exactly_the_dump_and_restores_a_gap_free_cut_with_myisam(
    cold_cluster, mariadb_servers, run_jobs, slow_dumps
):
    cluster, targets = cold_cluster
    writer = SequenceWriter(targets).start()
    try:
        backup_set = backup_start(cluster=cluster, actor="cli", consistency="cold")
        run_jobs("backups")
        time.sleep(0.3)
    finally:
        writer.stop()
    backup_set.refresh_from_db()
    assert (backup_set.status, backup_set.consistency, backup_set.method) == (
        "succeeded",
        "cold",
        "logical",
    ), backup_set.error
    assert backup_set.lock_sessions == {}

    window = backup_set.lock_window_ms / 1000.0
    cut_at = backup_set.consistent_at.timestamp()
    released = cut_at + window  # at most this late (the window opened just before the cut)
    assert window > 0.5, f"a cold lock window is the whole dump, not {window:.3f} s"

    numbers, engines = restored_numbers(backup_set, mariadb_servers[0], f"{backup_set.pk}")
    k = len(numbers)
    assert sorted(numbers) == list(range(1, k + 1)), "the cold set is not a gap-free cut"
    assert any(n % 2 == 0 for n in numbers) and any(n % 2 for n in numbers)
    assert {e for name, e in engines.items() if name.endswith(".seq_m")} == {"MyISAM"}

    by_number = {n: (began, returned) for n, began, returned in writer.commits}
    # Every insert in the cut began before the cut; every later one returned only once the
    # lock was released: none completed while it was held.
    assert all(by_number[n][0] <= cut_at for n in range(1, k + 1))
    later = [returned for n, (_, returned) in by_number.items() if n > k]
    assert later, "the writer never got going again"
    assert min(later) >= released - 0.25, "an insert completed while the global lock was held"
    # ... and the writer was held back for exactly the lock: it went on as soon as it ended.
    blocked = min(later) - by_number[k][1]
    assert abs(blocked - window) < 0.6, (blocked, window)


def test_the_engine_releases_the_cold_lock_first_when_cancelled(
    storage, mariadb_servers, unique_name
):
    """Without any help from the canceller, the dump itself frees writers within a second."""
    database = f"coldc_{unique_name}"
    targets = []
    for server in mariadb_servers:
        drop_database(server, database)
        server.execute(
            f"CREATE DATABASE {quote_ident(database)}",
            f"USE {quote_ident(database)}",
            "CREATE TABLE seq_m (n BIGINT PRIMARY KEY, pad VARCHAR(60)) ENGINE=MyISAM",
            "CREATE TABLE seq_i (n BIGINT PRIMARY KEY, pad VARCHAR(60)) ENGINE=InnoDB",
            "CREATE TABLE big (id BIGINT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB",
            "INSERT INTO big SELECT seq, REPEAT('v', 90) FROM seq_1_to_60000",
        )
        targets.append((server, database))
    spec = make_spec(
        [(f"s{i}", server, database) for i, server in enumerate(mariadb_servers)],
        cluster=f"cc{unique_name}",
        consistency="cold",
        chunk_rows=500,
        compression_level=19,
        connections_per_instance=1,
    )
    cancel = threading.Event()
    events = []
    outcome = {}

    def run():
        try:
            outcome["result"] = dump_cluster(
                spec, storage, progress=events.append, should_cancel=cancel.is_set
            )
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    writer = SequenceWriter(targets).start()
    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        wait_for(lambda: writer.blocked_since() > 0.5, 30, "the writer to block on the lock")
        held = [e for e in events if e.stage == "lock" and e.message]
        assert held and re.match(
            r"global read lock held for \d+ s on 3 instances", held[-1].message
        )
        assert set(held[-1].lock_sessions) == {s.name for s in mariadb_servers}
        asked = time.time()
        cancel.set()
        wait_for(lambda: writer.committed_after(asked), 5, "the writer to go on")
        assert writer.committed_after(asked) - asked < 1.0
        thread.join(30)
    finally:
        writer.stop()
        for server in mariadb_servers:
            drop_database(server, database)
    assert type(outcome.get("error")).__name__ == "Cancelled", outcome
    assert [e.lock_sessions for e in events if e.stage == "lock"][-1] == {}
    assert list(storage.list(spec.set_prefix + "/")) == []


def test_a_cold_lock_lost_mid_dump_fails_the_backup(storage, mariadb_servers, unique_name):
    """A DBA killing the lock connection: the tables could change under the dump."""
    server = mariadb_servers[0]
    database = f"coldl_{unique_name}"
    drop_database(server, database)
    server.execute(
        f"CREATE DATABASE {quote_ident(database)}",
        f"USE {quote_ident(database)}",
        "CREATE TABLE big (id BIGINT PRIMARY KEY, v VARCHAR(100)) ENGINE=MyISAM",
        "INSERT INTO big SELECT seq, REPEAT('v', 90) FROM seq_1_to_80000",
    )
    spec = make_spec(
        [("s0", server, database)],
        cluster=f"cl{unique_name}",
        consistency="cold",
        chunk_rows=500,
        compression_level=19,
        connections_per_instance=1,
    )
    killed = []

    def progress(event):
        if event.stage == "lock" and event.lock_sessions and not killed:
            for thread_id in event.lock_sessions.values():
                server.execute(f"KILL CONNECTION {int(thread_id)}")
                killed.append(thread_id)

    try:
        result = dump_cluster(spec, storage, progress=progress, should_cancel=lambda: False)
    finally:
        drop_database(server, database)
    assert killed
    assert not result.ok
    assert "global read lock of this cold backup was lost" in result.error
    assert list(storage.list(spec.set_prefix + "/")) == []


@pytest.mark.django_db(transaction=True)
def test_cancel_mid_cold_dump_frees_writers_within_a_second_and_shows_the_lock_live(
    long_cold_cluster, rq_worker_process, slow_dumps, settings, client
):
    from django.urls import reverse

    cluster, targets = long_cold_cluster
    rq_worker_process("backups")
    operator = make_user("operator")
    writer = SequenceWriter(targets).start()
    try:
        backup_set = backup_start(cluster=cluster, actor=operator, consistency="cold")

        def lock_shown():
            backup_set.refresh_from_db()
            assert backup_set.status in ("pending", "running"), backup_set.error
            return backup_set.lock_sessions and "global read lock held" in (
                backup_set.progress_text
            )

        wait_for(lock_shown, 60, "the page's progress line to show the lock")
        assert re.search(
            r"global read lock held for \d+ s on 3 instances", backup_set.progress_text
        ), backup_set.progress_text
        client.force_login(operator)  # the set's page polls this fragment every second
        fragment = client.get(
            reverse("backups:set_progress", args=[backup_set.pk]), HTTP_HX_REQUEST="true"
        ).content.decode()
        assert re.search(r"global read lock held for \d+ s on 3 instances", fragment), fragment
        wait_for(lambda: writer_held(writer, backup_set), 30, "the writer to be held by the lock")
        asked = time.time()
        backup_cancel(backup_set=backup_set, actor=operator)
        wait_for(lambda: writer.committed_after(asked), 5, "the writer to go on after cancel")
        assert writer.committed_after(asked) - asked < 1.0
    finally:
        writer.stop()

    def ended():
        backup_set.refresh_from_db()
        return not backup_set.is_active

    wait_for(ended, 30, "the job to stop after cancel")
    assert backup_set.status == "cancelled", backup_set.error
    storage = set_storage(backup_set)
    assert list(storage.list(backup_set.object_prefix + "/")) == []


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_cold_dump_leaves_no_lock(
    long_cold_cluster, mariadb_servers, rq_worker_process, slow_dumps
):
    cluster, targets = long_cold_cluster
    worker = rq_worker_process("backups")
    writer = SequenceWriter(targets).start()
    try:
        backup_set = backup_start(cluster=cluster, actor="cli", consistency="cold")

        def locked():
            backup_set.refresh_from_db()
            assert backup_set.status in ("pending", "running"), backup_set.error
            return len(backup_set.lock_sessions) == 3

        wait_for(locked, 60, "the cold lock to be taken")
        wait_for(lambda: writer_held(writer, backup_set), 30, "the writer to be held by the lock")
        processes = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(True)]
        assert len(processes) >= 2, "the worker should be running the job in a work horse"
        killed_at = time.time()
        for process in processes:
            os.kill(process.pid, signal.SIGKILL)
        psutil.wait_procs(processes, timeout=5)
        wait_for(lambda: writer.committed_after(killed_at), 10, "the writer to go on")
        assert writer.committed_after(killed_at) - killed_at < 2.0
    finally:
        writer.stop()
    # The connections that held the lock are gone from every server.
    by_name = {s.name: s for s in mariadb_servers}
    for name, thread_id in backup_set.lock_sessions.items():
        assert not by_name[name].execute(
            f"SELECT ID FROM information_schema.PROCESSLIST WHERE ID = {int(thread_id)}"
        )

    def reaped():
        backups_reap_stale()
        backup_set.refresh_from_db()
        return backup_set.status != "running"

    wait_for(reaped, 10 * STALE_SECONDS, "the reaper to fail the set")
    assert backup_set.status == "failed"
    assert list(set_storage(backup_set).list(backup_set.object_prefix + "/")) == []


@pytest.mark.django_db(transaction=True)
def test_backup_json_names_the_method(mariadb_servers, unique_name):
    cluster = make_cluster(mariadb_servers[:1], name=f"cj{unique_name}", tables={"t_order": 50})
    add_sequence_tables(cluster, mariadb_servers)
    out = StringIO()
    call_command("backup", cluster.name, "--consistency", "cold", "--wait", "--json", stdout=out)
    made = json.loads(out.getvalue())
    assert (made["status"], made["consistency"], made["method"]) == (
        "succeeded",
        "cold",
        "logical",
    ), made
    assert made["method_label"] == "cold, logical"
    assert made["lock_window_ms"] > 0

    out = StringIO()
    call_command("backups", "list", "--cluster", cluster.name, "--json", stdout=out)
    listed = {s["id"]: s for s in json.loads(out.getvalue())["sets"]}
    assert listed[made["id"]]["method"] == "logical"
    assert listed[made["id"]]["consistency"] == "cold"
    assert listed[made["id"]]["method_label"] == "cold, logical"

    out = StringIO()
    call_command("backups", "list", "--cluster", cluster.name, stdout=out)
    assert "cold, logical" in out.getvalue()
    assert BackupSet.objects.get(pk=made["id"]).method_label == "cold, logical"
    drop_cluster_databases(cluster, mariadb_servers)


@pytest.mark.django_db(transaction=True)
def test_pages_warn_before_a_cold_start_and_name_every_sets_method(
    client, mariadb_servers, unique_name, run_jobs
):
    from django.urls import reverse

    cluster = make_cluster(mariadb_servers[:2], name=f"cp{unique_name}", tables={"t_order": 50})
    add_sequence_tables(cluster, mariadb_servers)
    client.force_login(make_user("operator"))

    page = client.get(reverse("backups:set_list")).content.decode()
    assert 'id="cold-warning"' in page and "every write waits" in page
    for cost in ("costs production nothing", "a global read lock of a few ms", "whole dump"):
        assert cost in page

    response = client.post(
        reverse("backups:set_start"),
        {"cluster": cluster.name, "kind": "full", "consistency": "cold", "method": "logical"},
    )
    assert response.status_code == 302
    backup_set = BackupSet.objects.get(cluster=cluster)
    assert (backup_set.consistency, backup_set.method) == ("cold", "logical")
    page = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
    assert 'id="cold-lock-warning"' in page  # queued: the page says writes will wait
    run_jobs("backups")

    page = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
    assert "cold, logical" in page and 'id="cold-lock-warning"' not in page
    assert "copied under the global read lock" in page and "seq_m</span> (MyISAM)" in page
    listing = client.get(reverse("backups:set_list") + f"?cluster={cluster.name}")
    assert "cold, logical" in listing.content.decode()

    # A warm set of the same cluster refuses its MyISAM tables and says cold is the way.
    response = client.post(
        reverse("backups:set_start"),
        {"cluster": cluster.name, "kind": "full", "consistency": "locked"},
    )
    run_jobs("backups")
    warm = BackupSet.objects.filter(cluster=cluster).order_by("-id").first()
    assert (warm.status, warm.method_label) == ("failed", "warm (locked), logical")
    assert "cold backup" in warm.error
    drop_cluster_databases(cluster, mariadb_servers)


@pytest.mark.django_db
def test_cold_is_refused_for_physical_backups_in_one_line(mariadb_servers, unique_name, capsys):
    cluster = make_cluster(mariadb_servers[:1], name=f"cx{unique_name}", tables={"t_order": 5})
    with pytest.raises(SystemExit) as exited:
        call_command("backup", cluster.name, "--consistency", "cold", "--method", "physical")
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "cold applies to logical backups" in err and "\n" not in err
    assert not BackupSet.objects.filter(cluster=cluster).exists()
    drop_cluster_databases(cluster, mariadb_servers)


def test_a_cold_lock_outlives_its_short_server_timeout_while_the_dump_runs(
    storage, mariadb_servers, unique_name, monkeypatch
):
    """The lock connections get a short server-side wait_timeout (so a vanished worker's
    lock dies with it) and are pinged meanwhile, so a long dump keeps its lock."""
    from backups.engine import dump

    monkeypatch.setattr(dump, "COLD_LOCK_SESSION_TIMEOUT", 2)
    monkeypatch.setattr(dump, "COLD_LOCK_WATCH", 0.3)
    server = mariadb_servers[1]
    database = f"coldk_{unique_name}"
    drop_database(server, database)
    server.execute(
        f"CREATE DATABASE {quote_ident(database)}",
        f"USE {quote_ident(database)}",
        "CREATE TABLE big (id BIGINT PRIMARY KEY, v VARCHAR(100)) ENGINE=MyISAM",
        "INSERT INTO big SELECT seq, REPEAT('v', 90) FROM seq_1_to_40000",
    )
    spec = make_spec(
        [("s0", server, database)],
        cluster=f"ck{unique_name}",
        consistency="cold",
        chunk_rows=500,
        compression_level=19,
        connections_per_instance=1,
    )
    try:
        result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
    finally:
        drop_database(server, database)
    assert result.ok, result.error
    assert result.lock_window_ms > 3000, "the dump should outlast the 2 s server timeout"
    assert result.notes and "big (MyISAM)" in result.notes[0]


def test_a_cold_lock_left_idle_past_its_server_timeout_is_dropped_and_fails_the_backup(
    storage, mariadb_servers, unique_name, monkeypatch
):
    """What a worker that vanished without closing its socket leaves: the server ends the
    lock connection after its short wait_timeout, and a dump that lost its lock fails."""
    from backups.engine import dump

    monkeypatch.setattr(dump, "COLD_LOCK_SESSION_TIMEOUT", 1)
    monkeypatch.setattr(dump, "COLD_LOCK_WATCH", 3600)  # no pings during the dump
    server = mariadb_servers[1]
    database = f"coldt_{unique_name}"
    drop_database(server, database)
    server.execute(
        f"CREATE DATABASE {quote_ident(database)}",
        f"USE {quote_ident(database)}",
        "CREATE TABLE big (id BIGINT PRIMARY KEY, v VARCHAR(100)) ENGINE=MyISAM",
        "INSERT INTO big SELECT seq, REPEAT('v', 90) FROM seq_1_to_20000",
    )
    spec = make_spec(
        [("s0", server, database)],
        cluster=f"ct{unique_name}",
        consistency="cold",
        chunk_rows=500,
        compression_level=19,
        connections_per_instance=1,
    )
    try:
        result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
    finally:
        drop_database(server, database)
    assert not result.ok
    assert f"global read lock of this cold backup was lost on {server.name}" in result.error


@pytest.mark.django_db
def test_discovery_notes_non_innodb_tables_when_the_policy_takes_cold_fulls(
    mariadb_servers, unique_name
):
    from backups.services.policies import policy_update
    from shards.models import Finding
    from shards.services.discovery_runs import discovery_run

    cluster = make_cluster(mariadb_servers[:1], name=f"cd{unique_name}", tables={"t_order": 5})
    add_sequence_tables(cluster, mariadb_servers)
    operator = make_user("operator")

    discovery_run(cluster=cluster, actor=operator)
    refused = Finding.objects.get(cluster=cluster, code="table.engine")
    assert refused.severity == "error" and "cold" in refused.message

    policy_update(cluster=cluster, actor=make_user("admin"), changes={"full_consistency": "cold"})
    discovery_run(cluster=cluster, actor=operator)
    noted = Finding.objects.get(cluster=cluster, code="table.engine")
    assert (noted.table, noted.severity) == ("seq_m", "warning")
    assert "global read lock" in noted.message
    assert not Finding.objects.filter(cluster=cluster, severity="error").exists()
    drop_cluster_databases(cluster, mariadb_servers)
