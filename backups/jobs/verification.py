"""RQ jobs for verification (queue `verify`) and the drill/alert housekeeping (queue `default`)."""

from __future__ import annotations

from datetime import timedelta

HOUSEKEEPING_EVERY = timedelta(hours=1)


def verification_job(verification_id: int) -> dict:
    """Run one verification; idempotent (a run that is no longer pending is left alone)."""
    from backups.services.verification import verification_execute, verification_summary

    return verification_summary(verification_execute(verification_id=verification_id))


def verification_housekeeping_job(reschedule: bool = True) -> dict:
    """Queue due drills and raise RPO alerts, then schedule itself again.

    Needs a worker started with `--with-scheduler` (RQ's own scheduler) for the repeat.
    """
    from backups.services.verification import verification_drills_schedule
    from console.alerts import alerts_check_rpo

    drills = verification_drills_schedule()
    alerted = alerts_check_rpo()
    if reschedule:
        verification_housekeeping_schedule()
    return {"drills": [d.pk for d in drills], "rpo_alerts": alerted}


def verification_housekeeping_schedule() -> None:
    import django_rq

    queue = django_rq.get_queue("default")
    queue.enqueue_in(
        HOUSEKEEPING_EVERY, verification_housekeeping_job, job_id="housekeeping-verification"
    )
