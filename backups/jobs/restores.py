"""RQ job for restore runs (queue `restores`, job id `restore-<run id>`): thin, idempotent."""

from __future__ import annotations

import logging
from datetime import timedelta

import django_rq
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backups.models import RestoreRun

QUEUE = "restores"
JOB_TIMEOUT_SECONDS = 24 * 3600
log = logging.getLogger(__name__)


def restore_job_id(run_id: int) -> str:
    return f"restore-{run_id}"


def restore_run_job(run_id: int) -> str:
    """Load the run and hand it to the executor, which re-checks the approval itself."""
    from backups.services.errors import RestoreError
    from backups.services.restore_run import restore_run_execute

    run = RestoreRun.objects.get(pk=run_id)
    try:
        run = restore_run_execute(run=run)
    except RestoreError as exc:
        log.warning("restore run %s refused: %s", run_id, exc)
        return f"refused: {exc}"
    return run.status


def restore_run_enqueue(*, run_id: int) -> Job | None:
    """Enqueue the run's job unless one with its id is already waiting or running live."""
    queue = django_rq.get_queue(QUEUE)
    job_id = restore_job_id(run_id)
    try:
        existing = Job.fetch(job_id, connection=queue.connection)
    except NoSuchJobError:
        existing = None
    if existing is not None and existing.get_status(refresh=True) == JobStatus.QUEUED:
        return existing
    restore_housekeeping_schedule()  # the reaper that resumes this run if its worker dies
    return queue.enqueue(
        restore_run_job,
        run_id,
        job_id=job_id,
        job_timeout=JOB_TIMEOUT_SECONDS,
        result_ttl=7 * 24 * 3600,
    )


def restore_run_dequeue(*, run_id: int) -> bool:
    """Take a run's job off the queue if no worker has picked it up (to run it in-process)."""
    queue = django_rq.get_queue(QUEUE)
    job_id = restore_job_id(run_id)
    try:
        job = Job.fetch(job_id, connection=queue.connection)
    except NoSuchJobError:
        return False
    if job.get_status(refresh=True) != JobStatus.QUEUED:
        return False
    return queue.remove(job_id) > 0


HOUSEKEEPING_GATE_KEY = "shardvault:housekeeping:restores"


def restore_housekeeping_job(reschedule: bool = True) -> dict:
    """Expire overdue requests and approvals; resume runs whose worker died."""
    from backups.services.restores import restore_requests_expire, restore_runs_resume_stale

    try:
        return {"expired": restore_requests_expire(), "resumed": restore_runs_resume_stale()}
    finally:
        if reschedule:
            restore_housekeeping_schedule()


def restore_housekeeping_schedule() -> bool:
    """Schedule the next restore housekeeping on `default`, at most once per interval.

    A Redis NX key gates it, so any number of callers schedule one job (it needs a worker
    started with --with-scheduler). Returns True when it scheduled a run.
    """
    from django.conf import settings

    queue = django_rq.get_queue("default")
    seconds = max(30, int(settings.JOB_HEARTBEAT_STALE_SECONDS))
    try:
        if not queue.connection.set(HOUSEKEEPING_GATE_KEY, "1", nx=True, ex=seconds - 5):
            return False
        queue.enqueue_in(
            timedelta(seconds=seconds),
            restore_housekeeping_job,
            description="expire restore requests, resume restore runs whose worker died",
            result_ttl=600,
            failure_ttl=24 * 3600,
        )
    except Exception:  # noqa: BLE001 - housekeeping is best effort; the next call retries
        log.exception("could not schedule restore housekeeping")
        return False
    return True
