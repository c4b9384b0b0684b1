"""Policy max_threads_running: dumps and restores hold new chunks while a server is busy.

The load is real: connections running `SELECT SLEEP(n)` keep MariaDB's Threads_running up
for as long as they sleep.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from django.db import connection as django_connection
from django.urls import reverse

from backups.engine.throttle import ThreadsRunningGate
from backups.models import BackupPolicy, BackupSet, RestoreRequest, RestoreRun, VerificationRun
from backups.services.full_backups import backup_cancel, backup_start
from backups.services.restore_requests import restore_request_approve, restore_request_file
from backups.services.restore_run_states import restore_run_start
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 2
SLEEPERS = 4
ROWS = 150_000


class Sleepers:
    """`count` connections each running SELECT SLEEP(seconds) on `server`, in threads."""

    def __init__(self, server, count: int, seconds: float):
        self.server = server
        self.seconds = seconds
        self.conns = [server.connect() for _ in range(count)]
        self.threads = [
            threading.Thread(target=self._sleep, args=(c,), daemon=True) for c in self.conns
        ]
        self.ended_at: float | None = None

    def _sleep(self, conn) -> None:
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT SLEEP({self.seconds})")
                cur.fetchall()
        except Exception:  # noqa: BLE001 - killed by stop()
            pass

    def __enter__(self) -> Sleepers:
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 10
        while threads_running(self.server) < len(self.conns) + 1:
            assert time.monotonic() < deadline, "the sleepers never showed in Threads_running"
            time.sleep(0.05)
        return self

    def wait(self) -> None:
        for thread in self.threads:
            thread.join()
        self.ended_at = self.ended_at or time.monotonic()

    def stop(self) -> None:
        """End the sleeps now (KILL QUERY from another connection)."""
        for conn in self.conns:
            try:
                self.server.execute(f"KILL QUERY {int(conn.thread_id())}")
            except Exception:  # noqa: BLE001 - already done
                pass
        self.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
        for conn in self.conns:
            conn.close()


def threads_running(server) -> int:
    return int(server.execute("SHOW GLOBAL STATUS LIKE 'Threads_running'")[0][1])


class Watcher:
    """Samples (monotonic time, progress_text, rows_done) every 0.1 s of one row: `model`
    and `pk`, or the first row of a queryset given as `model` (rows_done 0 where the model
    has none)."""

    def __init__(self, model, pk: int | None = None, on_sample=None):
        self.rows = model.objects.filter(pk=pk) if pk is not None else model
        names = {f.name for f in self.rows.model._meta.get_fields()}
        self.fields = ["progress_text"] + (["rows_done"] if "rows_done" in names else [])
        self.on_sample = on_sample
        self.samples: list[tuple[float, str, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.done.is_set():
                values = self.rows.values_list(*self.fields).first() or ("",)
                text, rows = values[0], (values[1] if len(values) > 1 else 0)
                self.samples.append((time.monotonic(), text, rows))
                if self.on_sample is not None:
                    self.on_sample(text)
                time.sleep(0.1)
        finally:
            django_connection.close()

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def paused(self) -> list[tuple[float, str, int]]:
        return [s for s in self.samples if "paused: Threads_running" in s[1]]


@pytest.fixture
def cluster(mariadb_servers, unique_name, settings):
    # Enough chunks that the dump still runs for a few seconds after a pause ends.
    settings.BACKUP_CHUNK_ROWS = 100
    cluster = make_cluster(
        mariadb_servers[:1], name=f"th{unique_name}", tables={"t_order": ROWS, "t_user": 50}
    )
    BackupPolicy.objects.update_or_create(
        cluster=cluster, defaults={"max_threads_running": LIMIT, "verify_automatically": False}
    )
    return cluster


def test_the_gate_holds_work_while_the_server_is_busy_and_says_when_it_resumes(mariadb_servers):
    server = mariadb_servers[0]
    gate = ThreadsRunningGate(
        instance=server.name, endpoint=server.endpoint, limit=LIMIT, poll_interval=0.2
    )
    events = []
    try:
        assert gate.wait(stopped=lambda: False, report=events.append)  # idle: no pause
        assert events == [] and gate.pauses == 0, [e.message for e in events]
        with Sleepers(server, SLEEPERS, 3):
            time.sleep(0.25)  # past the idle reading the gate shares for one poll interval
            waiting_since = time.monotonic()
            assert gate.wait(stopped=lambda: False, report=events.append)
            waited = time.monotonic() - waiting_since
        assert waited > 2, waited  # held until the 3 s sleepers ended
        assert gate.pauses == 1, [e.message for e in events]
        # At least the sleepers are running (another client of the server may add one more).
        paused = re.fullmatch(
            rf"paused: Threads_running (\d+) > {LIMIT} on instance {server.name}",
            events[0].message,
        )
        assert paused and int(paused.group(1)) >= SLEEPERS, events[0].message
        assert events[-1].message == "" and events[-1].instance == server.name
        # The run's own connections inside a chunk are not counted against the limit.
        with gate.chunk(), gate.chunk(), gate.chunk():
            assert gate.others_running() == 0
        # A stop request ends the wait at once, without a green light.
        with Sleepers(server, SLEEPERS, 30):
            time.sleep(0.25)  # past the shared reading of the previous wait
            started = time.monotonic()
            stop = threading.Timer(0.5, lambda: None)
            stop.start()
            assert not gate.wait(stopped=lambda: not stop.is_alive(), report=events.append)
            assert time.monotonic() - started < 5
    finally:
        gate.close()


def test_a_backup_pauses_while_threads_running_is_high_and_finishes_after(
    cluster, mariadb_servers, run_jobs, client
):
    server = mariadb_servers[0]
    backup_set = backup_start(cluster=cluster, actor=make_user("operator"))
    client.force_login(make_user("auditor"))
    pages = []
    with Sleepers(server, SLEEPERS, 6) as sleepers:
        sleeper_ids = ",".join(str(c.thread_id()) for c in sleepers.conns)
        observer = server.connect()
        seen_connections = []

        def count_backup_connections(_text: str) -> None:
            with observer.cursor() as cur:
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'root'"
                    f" AND ID <> CONNECTION_ID() AND ID NOT IN ({sleeper_ids})"
                )
                seen_connections.append(cur.fetchone()[0])
            if "paused" in _text and not pages:  # what the set's page shows meanwhile
                url = reverse("backups:set_detail", args=[backup_set.pk])
                pages.append(client.get(url).content.decode())

        with Watcher(BackupSet, backup_set.pk, on_sample=count_backup_connections) as watcher:
            ender = threading.Thread(target=sleepers.wait, daemon=True)
            ender.start()
            run_jobs("backups")
        ender.join()
        observer.close()
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded", backup_set.error
    assert backup_set.rows == ROWS + 50
    assert pages and (
        f"paused: Threads_running {SLEEPERS} &gt; {LIMIT} on instance {server.name}" in pages[0]
    )
    # The throttle's poll connection counts within the instance's connection cap.
    instance = cluster.instances.get()
    assert 2 < max(seen_connections) <= instance.max_connections, seen_connections

    paused = watcher.paused()
    assert paused, [s[1] for s in watcher.samples]
    assert f"paused: Threads_running {SLEEPERS} > {LIMIT} on instance {server.name}" in paused[0][1]
    # Seen while the sleepers ran, and nothing was dumped during the pause.
    assert paused[0][0] < sleepers.ended_at
    assert all(rows == 0 for _, _, rows in paused)
    assert backup_set.finished_at is not None and backup_set.progress_text == "done"
    # The pause line went away when the server quietened.
    last_paused = paused[-1][0]
    after = [(text, rows) for t, text, rows in watcher.samples if t > last_paused]
    assert any(text and "paused" not in text and rows > 0 for text, rows in after), after


def test_cancel_still_ends_a_backup_that_is_paused(cluster, mariadb_servers, run_jobs):
    server = mariadb_servers[0]
    operator = make_user("operator")
    backup_set = backup_start(cluster=cluster, actor=operator)
    asked = threading.Event()

    def cancel_once_paused(text: str) -> None:
        if "paused: Threads_running" in text and not asked.is_set():
            asked.set()
            backup_cancel(backup_set=BackupSet.objects.get(pk=backup_set.pk), actor=operator)

    with Sleepers(server, SLEEPERS, 60):
        with Watcher(BackupSet, backup_set.pk, on_sample=cancel_once_paused):
            started = time.monotonic()
            run_jobs("backups")
            took = time.monotonic() - started
    backup_set.refresh_from_db()
    assert asked.is_set()
    assert backup_set.status == "cancelled", backup_set.error
    assert took < 30  # it did not wait for the 60 s sleepers


def test_a_restore_into_a_busy_instance_pauses_and_then_verifies(
    cluster, mariadb_servers, run_jobs
):
    server = mariadb_servers[0]
    BackupPolicy.objects.filter(cluster=cluster).update(max_threads_running=0)
    backup_set = backup_start(cluster=cluster, actor=make_user("operator"))
    run_jobs("backups")
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded", backup_set.error

    BackupPolicy.objects.filter(cluster=cluster).update(max_threads_running=LIMIT)
    request = restore_request_file(
        cluster=cluster,
        requester=make_user("operator"),
        source_set=backup_set,
        target="side",
        reason="throttled restore",
    )
    restore_request_approve(request=request, approver=make_user("approver"), comment="ok")
    run = restore_run_start(
        request=RestoreRequest.objects.get(pk=request.pk), actor=make_user("operator")
    )
    with Sleepers(server, SLEEPERS, 6) as sleepers:
        with Watcher(RestoreRun, run.pk) as watcher:
            ender = threading.Thread(target=sleepers.wait, daemon=True)
            ender.start()
            run_jobs("restores")
        ender.join()
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.q == 1.0
    paused = watcher.paused()
    assert paused, [s[1] for s in watcher.samples]
    assert f"paused: Threads_running {SLEEPERS} > {LIMIT} on instance {server.name}" in paused[0][1]
    assert paused[0][0] < sleepers.ended_at
    assert all(rows == 0 for _, _, rows in paused)  # no chunk loaded while paused
    after = [(text, rows) for t, text, rows in watcher.samples if t > paused[-1][0]]
    assert any(text and "paused" not in text and rows > 0 for text, rows in after), after
    shard = cluster.shards.get()
    server.execute(f"DROP DATABASE `{shard.database}__r{request.pk}`")


def test_a_drill_on_the_shards_own_instance_pauses_while_it_is_busy(
    cluster, mariadb_servers, run_jobs
):
    from tests.backups.test_verification import _verify_cli

    server = mariadb_servers[0]
    BackupPolicy.objects.filter(cluster=cluster).update(max_threads_running=0)
    backup_set = backup_start(cluster=cluster, actor=make_user("operator"))
    run_jobs("backups")
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded", backup_set.error

    BackupPolicy.objects.filter(cluster=cluster).update(max_threads_running=LIMIT)
    runs = VerificationRun.objects.filter(backup_set=backup_set, drill=True).order_by("-pk")
    with Sleepers(server, SLEEPERS, 8) as sleepers:
        with Watcher(runs) as watcher:
            ender = threading.Thread(target=sleepers.wait, daemon=True)
            ender.start()
            code, result, err = _verify_cli(backup_set.pk, "--drill")
        ender.join()
    assert code == 0, (result, err)
    assert result["q"] == 1.0
    paused = watcher.paused()
    assert paused, [s[1] for s in watcher.samples]
    assert f"paused: Threads_running {SLEEPERS} > {LIMIT} on instance {server.name}" in paused[0][1]
    assert paused[0][0] < sleepers.ended_at
    assert result["rto_seconds"] > 1  # the measured RTO includes the wait
