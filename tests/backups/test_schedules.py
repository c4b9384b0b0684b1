"""Scheduled backups on real MariaDB, Redis and RQ: ticks, busy skips, arming, the real scheduler."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import django_rq
import pytest
from django.core import mail

from backups import queue
from backups.models import BackupPolicy, BackupSet, ScheduleTick, VerificationRun
from backups.selectors.backups import backup_set_json
from backups.services.full_backups import backup_start
from backups.services.housekeeping import housekeeping_checks
from backups.services.policies import policy_update
from backups.services.schedules import schedule_job_id, schedule_tick, schedules_arm
from console.models import AuditEvent
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

TICK = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"sch{unique_name}", tables={"t_order": 300})


def set_policy(cluster, **changes):
    return policy_update(cluster=cluster, actor=make_user("admin"), changes=changes)[0]


def sets_of(cluster):
    return list(BackupSet.objects.filter(cluster=cluster).order_by("id"))


def test_an_incremental_tick_takes_the_first_full_itself_then_incrementals(cluster, run_jobs):
    set_policy(cluster, incremental_every_minutes=5, full_consistency="lockfree")
    first = schedule_tick(cluster=cluster, kind="incremental", tick_at=TICK)
    assert first.outcome == "started"
    run_jobs("backups")
    full = sets_of(cluster)[-1]
    assert (full.kind, full.status, full.consistency) == ("full", "succeeded", "lockfree"), (
        full.error
    )
    assert full.trigger == "scheduler"
    assert backup_set_json(full)["triggered_by"] == "scheduler"

    second = schedule_tick(cluster=cluster, kind="incremental", tick_at=TICK + timedelta(minutes=5))
    run_jobs("backups")
    incremental = sets_of(cluster)[-1]
    assert second.backup_set_id == incremental.pk
    assert (incremental.kind, incremental.status) == ("incremental", "succeeded"), incremental.error
    assert incremental.parent_id == full.pk
    assert backup_set_json(incremental)["triggered_by"] == "scheduler"

    # A manual set says who ran it, not "scheduler".
    manual = backup_start(cluster=cluster, actor=make_user("operator", "op-manual"))
    run_jobs("backups")
    manual.refresh_from_db()
    assert backup_set_json(manual)["triggered_by"] == "op-manual"


def test_a_busy_tick_is_skipped_and_noted_once_not_failed_and_no_alert(cluster, run_jobs):
    set_policy(
        cluster,
        full_cron="0 2 * * *",
        incremental_every_minutes=5,
        webhook_url="http://127.0.0.1:9/never",
    )
    running = backup_start(cluster=cluster, actor=make_user("operator"), enqueue=False)
    mail.outbox.clear()

    full_tick = schedule_tick(cluster=cluster, kind="full", tick_at=TICK)
    incremental_tick = schedule_tick(
        cluster=cluster, kind="incremental", tick_at=TICK + timedelta(minutes=5)
    )
    assert full_tick.outcome == incremental_tick.outcome == "skipped"
    assert f"set {running.pk}" in full_tick.note
    assert sets_of(cluster) == [running]  # no failed set recorded
    assert not BackupSet.objects.filter(cluster=cluster, status="failed").exists()
    skipped = AuditEvent.objects.filter(action="schedule.skipped")
    assert skipped.count() == 2
    assert {e.details["kind"] for e in skipped} == {"full", "incremental"}
    assert mail.outbox == []


def test_the_same_tick_fired_twice_starts_one_set(cluster):
    set_policy(cluster, full_cron="0 2 * * *")
    assert schedule_tick(cluster=cluster, kind="full", tick_at=TICK) is not None
    assert schedule_tick(cluster=cluster, kind="full", tick_at=TICK) is None
    assert len(sets_of(cluster)) == 1
    assert ScheduleTick.objects.filter(cluster=cluster).count() == 1
    # A tick the policy no longer names (the cron changed after it was armed) does nothing.
    set_policy(cluster, full_cron="30 3 * * *")
    assert schedule_tick(cluster=cluster, kind="full", tick_at=TICK + timedelta(days=1)) is None
    assert len(sets_of(cluster)) == 1


def test_a_scheduled_physical_full_runs_mariabackup(cluster, mariadb_servers, run_jobs):
    by_port = {s.endpoint.port: s for s in mariadb_servers}
    for instance in cluster.instances.all():
        instance.datadir = str(by_port[instance.port].datadir)
        instance.save(update_fields=["datadir"])
    set_policy(cluster, full_cron="0 2 * * *", full_method="physical")
    tick = schedule_tick(cluster=cluster, kind="full", tick_at=TICK)
    assert tick.outcome == "started"
    run_jobs("backups")
    backup_set = BackupSet.objects.get(pk=tick.backup_set_id)
    assert (backup_set.status, backup_set.method, backup_set.trigger) == (
        "succeeded",
        "physical",
        "scheduler",
    ), (backup_set.method, backup_set.error)
    assert all(sb.binlog_file for sb in backup_set.shard_backups.all())


def test_a_scheduled_cold_full_runs_under_the_global_read_lock(cluster, run_jobs):
    set_policy(cluster, full_cron="0 2 * * *", full_consistency="cold")
    tick = schedule_tick(cluster=cluster, kind="full", tick_at=TICK)
    assert tick.outcome == "started"
    run_jobs("backups")
    backup_set = BackupSet.objects.get(pk=tick.backup_set_id)
    assert (backup_set.status, backup_set.consistency, backup_set.trigger) == (
        "succeeded",
        "cold",
        "scheduler",
    ), backup_set.error
    assert backup_set.lock_window_ms and backup_set.lock_window_ms > 0
    assert backup_set.lock_sessions == {}  # released, and nothing left for a cancel to kill


def test_an_incremental_due_with_a_full_leaves_that_minute_to_the_full(cluster, run_jobs):
    set_policy(cluster, full_cron="0 2 * * *", incremental_every_minutes=5)
    assert schedule_tick(cluster=cluster, kind="incremental", tick_at=TICK) is None
    full = schedule_tick(cluster=cluster, kind="full", tick_at=TICK)
    assert full.outcome == "started" and full.backup_set.kind == "full"
    assert not AuditEvent.objects.filter(action="schedule.skipped").exists()


def test_arming_queues_each_next_tick_once_and_follows_policy_changes(cluster):
    registry = django_rq.get_queue(queue.DEFAULT).scheduled_job_registry
    now = datetime(2026, 3, 1, 1, 58, 30, tzinfo=UTC)
    set_policy(cluster, full_cron="0 2 * * *", incremental_every_minutes=15)
    registry_ids = set(registry.get_job_ids())
    # policy_update arms after commit (with the real clock); arm again with the test clock.
    armed = schedules_arm(cluster_ids=[cluster.pk], now=now)
    full_id = schedule_job_id(cluster.pk, "full", TICK)
    incremental_id = schedule_job_id(cluster.pk, "incremental", TICK)
    assert sorted(armed) == sorted({full_id, incremental_id} - registry_ids)
    assert schedules_arm(cluster_ids=[cluster.pk], now=now) == []  # already armed
    ids = set(registry.get_job_ids())
    assert {full_id, incremental_id} <= ids
    assert registry.get_scheduled_time(full_id) == TICK

    # The cron moves to 03:30: the 02:00 tick is cancelled, 03:30 is armed.
    set_policy(cluster, full_cron="30 3 * * *", incremental_every_minutes=0)
    schedules_arm(cluster_ids=[cluster.pk], now=now)
    ids = set(registry.get_job_ids())
    assert full_id not in ids and incremental_id not in ids
    assert schedule_job_id(cluster.pk, "full", TICK.replace(hour=3, minute=30)) in ids


def test_a_due_drill_runs_from_the_hourly_checks(cluster, run_jobs):
    backup_start(cluster=cluster, actor=make_user("operator"))
    run_jobs("backups", "verify")
    set_policy(cluster, drill_every_days=7)
    result = housekeeping_checks()
    assert len(result["drills"]) == 1
    run_jobs("verify")
    drill = VerificationRun.objects.get(pk=result["drills"][0])
    assert drill.drill and drill.status == "succeeded", drill.error
    assert housekeeping_checks()["drills"] == []  # not due again for 7 days


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_the_real_scheduler_runs_an_every_minute_cron_once_per_tick_across_restarts(
    cluster, rq_worker_process
):
    """Two workers with --with-scheduler; a first one is stopped (as a restart does) after the
    policy armed its tick."""
    doomed = rq_worker_process(scheduler=True)
    set_policy(cluster, full_cron="* * * * *")  # arms the next minute's tick after commit
    assert any(
        j.startswith(f"schedule-{cluster.pk}-full-") for j in queue.scheduled_job_ids(queue.DEFAULT)
    )
    time.sleep(2)
    doomed.terminate()  # a warm shutdown, as a deploy's restart does: it hands the scheduler on
    doomed.wait(timeout=60)
    rq_worker_process(scheduler=True)
    rq_worker_process(scheduler=True)

    def scheduled_succeeded():
        return BackupSet.objects.filter(
            cluster=cluster, trigger="scheduler", status="succeeded"
        ).first()

    backup_set = wait_for(scheduled_succeeded, 180, "a scheduled set to succeed")
    tick = ScheduleTick.objects.get(backup_set=backup_set)
    assert tick.tick_at.second == 0
    assert timedelta(0) <= backup_set.created_at - tick.tick_at < timedelta(seconds=30)
    # Every tick so far started exactly one set; the next tick is armed again.
    BackupPolicy.objects.filter(cluster=cluster).update(full_cron="")
    for t in ScheduleTick.objects.filter(cluster=cluster):
        assert BackupSet.objects.filter(pk=t.backup_set_id).count() <= 1
    assert ScheduleTick.objects.filter(cluster=cluster).count() == len(
        {t.tick_at for t in ScheduleTick.objects.filter(cluster=cluster)}
    )


def test_the_housekeeping_command_arms_every_policys_next_tick(cluster):
    from django.core.management import call_command

    BackupPolicy.objects.create(cluster=cluster, full_cron="0 2 * * *")  # no arming on save
    assert not queue.scheduled_job_ids(queue.DEFAULT)
    call_command("housekeeping")
    armed = [j for j in queue.scheduled_job_ids(queue.DEFAULT) if j.startswith("schedule-")]
    assert len(armed) == 1 and armed[0].startswith(f"schedule-{cluster.pk}-full-")
    assert armed[0].endswith("T0200Z")


def test_a_starting_worker_arms_the_periodic_jobs_that_re_arm_the_schedules(
    cluster, rq_worker_process, redis_url
):
    import redis

    conn = redis.Redis.from_url(redis_url)
    assert not conn.exists(queue.PERIODIC["schedules"].gate_key)  # an empty Redis
    rq_worker_process("default")

    def armed() -> set[str]:
        jobs = [
            django_rq.get_queue(queue.DEFAULT).fetch_job(j)
            for j in queue.scheduled_job_ids(queue.DEFAULT)
        ]
        return {job.args[0] for job in jobs if job is not None}

    # The worker arms them one after another (reap, checks, schedules, retention): wait for
    # the whole set, not for one of them (CI once read the list before retention was in).
    wait_for(lambda: armed() == set(queue.PERIODIC), 60, "the worker to arm them")
    assert all(conn.exists(p.gate_key) for p in queue.PERIODIC.values())
