"""backups.queue on a real Redis and a real RQ worker: jobs by dotted path, unique job ids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from backups import queue
from backups.jobs.housekeeping import periodic_job


@pytest.mark.django_db
def test_a_job_id_still_waiting_is_not_queued_twice_and_may_be_queued_again_once_done(run_jobs):
    first = queue.enqueue(
        "backups.jobs.housekeeping.periodic_job", "no-such-entry", queue=queue.DEFAULT,
        job_id="periodic-probe",
    )  # fmt: skip
    assert first == "periodic-probe"
    assert queue.job_status("periodic-probe") == "queued"
    again = queue.enqueue(
        "backups.jobs.housekeeping.periodic_job", "no-such-entry", queue=queue.DEFAULT,
        job_id="periodic-probe",
    )  # fmt: skip
    assert again is None  # refused: the first one is still waiting
    run_jobs(queue.DEFAULT)
    assert queue.job_status("periodic-probe") == "finished"
    assert (
        queue.enqueue(
            "backups.jobs.housekeeping.periodic_job",
            "no-such-entry",
            queue=queue.DEFAULT,
            job_id="periodic-probe",
        )  # fmt: skip
        == "periodic-probe"
    )
    # Leave nothing queued for a later test's worker.
    assert queue.dequeue_if_waiting("periodic-probe", queue=queue.DEFAULT) is True


@pytest.mark.django_db
def test_a_waiting_job_can_be_taken_off_its_queue_but_not_a_missing_one():
    queue.enqueue(
        "backups.jobs.housekeeping.periodic_job", "reap", queue=queue.RESTORES, job_id="take-me"
    )
    assert queue.dequeue_if_waiting("take-me", queue=queue.RESTORES) is True
    assert queue.dequeue_if_waiting("take-me", queue=queue.RESTORES) is False
    assert queue.job_status("never-queued") == "missing"


@pytest.mark.django_db(transaction=True)
def test_every_periodic_job_is_armed_once_and_rearms_itself_when_it_runs():
    assert sorted(queue.periodic_ensure_scheduled()) == sorted(queue.PERIODIC)
    assert queue.periodic_ensure_scheduled() == []  # already armed: nothing more
    scheduled = queue.scheduled_job_ids(queue.DEFAULT)
    assert len(scheduled) == len(queue.PERIODIC)

    # The gate of "reap" lapses a few seconds before its run is due; a run re-arms it.
    queue.redis_connection().delete(queue.PERIODIC["reap"].gate_key)
    result = periodic_job("reap")
    assert set(result) == {
        "backups_failed",
        "verifications_failed",
        "restores_resumed",
        "requests_expired",
    }
    assert len(queue.scheduled_job_ids(queue.DEFAULT)) == len(queue.PERIODIC) + 1


@pytest.mark.django_db(transaction=True)
def test_a_surviving_worker_takes_over_the_scheduler_of_a_sigkilled_one(rq_worker_process):
    """RQ's scheduler lock outlives a SIGKILLed holder by up to 61 s; a surviving worker
    takes it over soon after (not after RQ's 10-minute maintenance interval)."""
    import os
    import signal
    import time
    from datetime import timedelta

    conn = queue.redis_connection()
    lock_key = f"rq:scheduler-lock:{queue.DEFAULT}"

    def wait_for(predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def holder_pid():
        name = conn.get(lock_key)
        pid = name and conn.hget(f"rq:scheduler:{name.decode()}", "pid")
        return int(pid) if pid and int(pid) else None

    workers = [rq_worker_process(queue.DEFAULT, scheduler=True) for _ in range(2)]
    scheduler_pid = wait_for(holder_pid, 60, "a scheduler to hold the lock")
    (doomed,) = [w for w in workers if w.pid == os.getpgid(scheduler_pid)]
    (survivor,) = [w for w in workers if w is not doomed]
    time.sleep(2)  # both are in their main loop
    os.killpg(doomed.pid, signal.SIGKILL)  # worker, scheduler and all: nothing releases the lock
    doomed.wait(timeout=30)
    killed_at = time.monotonic()

    job_id = queue.enqueue(
        "backups.queue.queue_lengths", queue=queue.DEFAULT, after=timedelta(seconds=1)
    )
    assert queue.job_status(job_id) == "scheduled"
    wait_for(lambda: queue.job_status(job_id) == "finished", 90, "the scheduled job to run")
    assert time.monotonic() - killed_at < 90
    assert survivor.poll() is None
    assert os.getpgid(holder_pid()) == survivor.pid  # the survivor's scheduler holds the lock


def test_a_worker_loads_what_its_jobs_run_before_it_takes_one_and_commands_do_not():
    """Work horses are forked from the worker, so they start with the engine loaded; a
    command such as `manage.py backup` starts without it (it only records and queues)."""
    script = (
        "import django, sys; django.setup();"
        "import backups.management.commands.backup;"
        "print('backups.engine.dump' in sys.modules);"
        "from backups.queue import jobs_preload; jobs_preload();"
        "from backups.queue import JOB_MODULES;"
        "print(all(m in sys.modules for m in JOB_MODULES))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "console.settings"},
    ).stdout.split()
    assert out == ["False", "True"]
