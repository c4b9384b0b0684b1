"""backups.queue on a real Redis and a real RQ worker: jobs by dotted path, unique job ids."""

from __future__ import annotations

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
