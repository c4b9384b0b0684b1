"""Per-instance connection caps hold across jobs: full backups, incrementals, drills, discovery
and schedule ticks share one server's slots (issue 14).

Two clusters register the same real MariaDB server with a cap of CAP connections. A full
backup of one holds every slot (paused by its throttle while real `SELECT SLEEP` sessions
keep Threads_running up); the other cluster's incremental and drill, run by real rqworkers,
wait and say so, its discovery says which instance is at its cap, its scheduled tick is
skipped; once the backup ends they proceed. ShardVault's own MariaDB user is watched in the
server's processlist throughout. A SIGKILLed worker's slots expire after their ttl.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime

import psutil
import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from backups import queue
from backups.models import BackupPolicy, BackupSet, ScheduleTick, VerificationRun
from backups.services.connection_slots import (
    ConnectionSlots,
    SlotNeed,
    SlotsUnavailable,
    connection_slots_held,
    slot_holders,
    slots_in_use,
)
from backups.services.full_backups import backup_start
from backups.services.incrementals import incremental_slot_holder, incremental_start
from backups.services.schedules import schedule_tick
from backups.services.verification import (
    drill_slot_holder,
    verification_drills_schedule,
    verification_start,
)
from console.keys import encrypt_secret
from console.models import AuditEvent
from shards.models import DiscoveryRun, Instance
from shards.services import discovery_runs
from tests.backups.test_throttle import Sleepers
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

CAP = 3
LIMIT = 2  # max_threads_running of both policies
SLEEPERS = 4
STALE = 3  # the workers' heartbeat window: slots they hold expire 6 s after they die
USER = "svcaps"
PASSWORD = "caps-pw-1"


def _wait_for(what: str, check, timeout: float = 30.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


class ProcesslistWatch:
    """Samples how many connections ShardVault's MariaDB user has open on the server."""

    def __init__(self, server):
        self.conn = server.connect()
        self.samples: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", (USER,)
                )
                self.samples.append(int(cur.fetchone()[0]))
            time.sleep(0.05)

    def __enter__(self) -> ProcesslistWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.conn.close()


@pytest.fixture
def shared_server(mariadb_servers, unique_name, monkeypatch):
    """(server, cluster A, cluster B): both clusters on one server, as ShardVault's own user."""
    server = mariadb_servers[0]
    server.execute(
        f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
        f"GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%'",
    )
    busy = make_cluster([server], name=f"ca{unique_name}", tables={"t_a": 600})
    other = make_cluster([server], name=f"cb{unique_name}", tables={"t_b": 300})
    Instance.objects.filter(cluster__in=[busy, other]).update(
        user=USER, password_encrypted=encrypt_secret(PASSWORD), max_connections=CAP
    )
    for cluster in (busy, other):
        BackupPolicy.objects.update_or_create(
            cluster=cluster,
            defaults={
                "max_threads_running": LIMIT,
                "verify_automatically": False,
                "incremental_every_minutes": 5,
            },
        )
    monkeypatch.setenv("SHARDVAULT_HEARTBEAT_STALE_SECONDS", str(STALE))
    yield server, busy, other
    for (name,) in server.execute("SHOW DATABASES LIKE '\\_\\_svdrill\\_%'"):
        server.execute(f"DROP DATABASE IF EXISTS `{name}`")


def test_incrementals_drills_discovery_and_ticks_wait_for_a_backups_slots(
    shared_server, run_jobs, rq_worker_process, monkeypatch, client
):
    server, busy, other = shared_server
    address = f"{server.endpoint.host}:{server.endpoint.port}"
    redis = queue.redis_connection(queue.BACKUPS)
    instance_name = other.instances.get().name

    # The other cluster's full set, for its incremental and its drill to build on.
    base = backup_start(cluster=other, actor="test")
    run_jobs("backups")
    base.refresh_from_db()
    assert base.status == "succeeded", base.error

    workers = [rq_worker_process("backups"), rq_worker_process("backups")]
    drill_worker = rq_worker_process("verify")
    with ProcesslistWatch(server) as processlist:
        with Sleepers(server, SLEEPERS, 60) as sleepers:
            full = backup_start(cluster=busy, actor="test")
            full_holder = f"backup-{full.pk}"
            _wait_for(
                "the full backup to hold every slot",
                lambda: (
                    slots_in_use(redis, address) == CAP
                    and set(slot_holders(redis, address)) == {full_holder}
                ),
            )
            # A scheduled incremental that cannot get its slot is skipped, saying why.
            tick = schedule_tick(
                cluster=other, kind="incremental", tick_at=datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
            )
            assert tick.outcome == ScheduleTick.Outcome.SKIPPED
            assert f"instance {instance_name} ({address}) is at its cap of {CAP}" in tick.note
            assert full_holder in tick.note
            assert not BackupSet.objects.filter(cluster=other, kind="incremental").exists()
            # A scheduled full backup of the other cluster is skipped too.
            BackupPolicy.objects.filter(cluster=other).update(full_cron="0 2 * * *")
            tick = schedule_tick(
                cluster=other, kind="full", tick_at=datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
            )
            assert tick.outcome == ScheduleTick.Outcome.SKIPPED
            assert f"instance {instance_name} ({address}) is at its cap" in tick.note

            # So is a drill housekeeping finds due: it stays due for the next run.
            BackupPolicy.objects.filter(cluster=other).update(drill_every_days=1)
            assert verification_drills_schedule() == []
            skipped = AuditEvent.objects.get(action="verification.skipped")
            assert skipped.details["reason"].startswith(f"instance {instance_name} ({address})")
            assert not VerificationRun.objects.exists()

            incremental = incremental_start(cluster=other, actor="test")
            drill = verification_start(backup_set=base, drill=True)
            # Interactive discovery waits briefly, then says which instance is at its cap.
            monkeypatch.setattr(discovery_runs, "DISCOVERY_SLOT_WAIT_SECONDS", 1)
            with pytest.raises(CommandError) as refused:
                call_command("topology", "discover", other.name)
            sentence = str(refused.value)
            assert sentence.startswith(
                f"discovery of {other.name} failed: instance {instance_name} ({address}) "
                f"is at its cap of {CAP} connection(s)"
            ), sentence
            assert full_holder in sentence and "\n" not in sentence
            assert DiscoveryRun.objects.filter(cluster=other).get().status == "failed"

            waiting = f"waiting for a connection slot on {instance_name}"
            _wait_for(
                "the incremental to wait",
                lambda: waiting in BackupSet.objects.get(pk=incremental.pk).progress_text,
            )
            _wait_for(
                "the drill to wait",
                lambda: waiting in VerificationRun.objects.get(pk=drill.pk).progress_text,
            )
            assert set(slot_holders(redis, address)) == {full_holder}
            assert BackupSet.objects.get(pk=incremental.pk).status == "running"
            # The cluster page says who holds the server's connections.
            client.force_login(make_user("auditor"))
            page = client.get(reverse("shards:cluster_detail", args=[other.name]))
            assert f"connections in use: {CAP} of {CAP} ({full_holder} ×{CAP})" in (
                page.content.decode()
            )
            sleepers.stop()  # the server quietens: the full backup goes on and ends

        finished = {}
        for model, pk in (
            (BackupSet, full.pk),
            (BackupSet, incremental.pk),
            (VerificationRun, drill.pk),
        ):
            row = _wait_for(
                f"{model.__name__} {pk} to end",
                lambda m=model, p=pk: (r := m.objects.get(pk=p)).finished_at and r,
                timeout=60,
            )
            assert row.status == "succeeded", (row.progress_text, getattr(row, "error", ""))
            finished[pk, model] = row.finished_at
        assert finished[incremental.pk, BackupSet] > finished[full.pk, BackupSet]
        assert finished[drill.pk, VerificationRun] > finished[full.pk, BackupSet]
        assert slots_in_use(redis, address) == 0

        # A worker killed with SIGKILL cannot release: its slots expire after their ttl.
        with Sleepers(server, SLEEPERS, 60):
            second = verification_start(backup_set=base, drill=True)
            holder = drill_slot_holder(second.pk)
            _wait_for(
                "the second drill to pause holding its slots",
                lambda: (
                    "paused: Threads_running"
                    in VerificationRun.objects.get(pk=second.pk).progress_text
                    and holder in slot_holders(redis, address)
                ),
            )
            assert slots_in_use(redis, address) == CAP  # a poll and two loads
            # The worker and its work horse (RQ puts the horse in a process group of its own).
            processes = [drill_worker_process := psutil.Process(drill_worker.pid)]
            processes += drill_worker_process.children(recursive=True)
            assert len(processes) >= 2, "the worker should be running the drill in a work horse"
            for process in processes:
                os.kill(process.pid, signal.SIGKILL)
            psutil.wait_procs(processes, timeout=5)
            drill_worker.wait()
            killed_at = time.monotonic()
            assert holder in slot_holders(redis, address)
            monkeypatch.setattr(discovery_runs, "DISCOVERY_SLOT_WAIT_SECONDS", 20)
            run = discovery_runs.discovery_run(cluster=other, actor="test")
            waited = time.monotonic() - killed_at
        assert run.status == "succeeded", run.error
        assert 1 < waited < 2 * STALE + 5, waited  # expired after their ttl, not at the kill
        assert holder not in slot_holders(redis, address)

    assert max(processlist.samples) <= CAP, processlist.samples
    assert CAP in processlist.samples  # the cap was reached, and never passed
    assert incremental_slot_holder(incremental.pk) not in slot_holders(redis, address)
    for worker in workers:
        assert worker.poll() is None


def test_held_slots_outlive_their_ttl_while_held_and_a_third_job_is_told_who_holds_them():
    redis = queue.redis_connection(queue.DEFAULT)
    address, names = "10.0.0.9:3306", {"10.0.0.9:3306": "m9"}
    restore = ConnectionSlots(
        redis, {address: SlotNeed(cap=2, minimum=1, wanted=1)}, holder="restore-9", ttl=60
    )
    assert restore.try_acquire() == {address: 1}
    lines: list[str] = []
    with connection_slots_held(
        needs={address: SlotNeed(cap=2, minimum=1, wanted=2)},
        names=names,
        holder="drill-5",
        wait=1,
        ttl=1.0,
    ) as granted:
        assert granted == {address: 1}  # what was free
        time.sleep(1.6)  # past the ttl: the holder's own heartbeat kept them
        assert slot_holders(redis, address) == {"drill-5": 1, "restore-9": 1}
        with pytest.raises(SlotsUnavailable) as refused:
            with connection_slots_held(
                needs={address: SlotNeed(cap=2, minimum=1, wanted=1)},
                names=names,
                holder="discovery-3",
                wait=0.6,
                say=lines.append,
            ):
                pytest.fail("no slot was free")
    assert lines == [
        "waiting for a connection slot on m9 — connections in use: 2 of 2 (drill-5, restore-9)"
    ]
    assert str(refused.value) == (
        "instance m9 (10.0.0.9:3306) is at its cap of 2 connection(s) from ShardVault, in use "
        "by drill-5, restore-9; try again when those jobs end, or raise its max connections"
    )
    assert slot_holders(redis, address) == {"restore-9": 1}  # released at the block's end
