"""RQ jobs for verification (queue `verify`) and the drill/alert housekeeping (queue `default`)."""

from __future__ import annotations

from datetime import timedelta

HOUSEKEEPING_EVERY = timedelta(hours=1)


def verification_job(verification_id: int) -> dict:
    """Run one verification; idempotent (a run that is no longer pending is left alone)."""
    from backups.services.verification import verification_execute, verification_summary

    return verification_summary(verification_execute(verification_id=verification_id))


def verification_housekeeping_job(reschedule: bool = True) -> dict:
    """Reap dead verifications, queue missed storage checks and due drills, raise RPO and
    failed-backup alerts, then schedule itself again.

    Needs a worker started with `--with-scheduler` (RQ's own scheduler) for the repeat.
    """
    from backups.services.verification import (
        verification_backfill_automatic,
        verification_drills_schedule,
        verifications_reap_stale,
    )
    from console.alerts import alerts_check_failed_backups, alerts_check_rpo

    reaped = verifications_reap_stale()
    checks = verification_backfill_automatic()
    drills = verification_drills_schedule()
    alerted = alerts_check_rpo()
    failed_alerts = alerts_check_failed_backups()
    if reschedule:
        verification_housekeeping_schedule()
    return {
        "reaped": [r.pk for r in reaped],
        "storage_checks": [c.pk for c in checks],
        "drills": [d.pk for d in drills],
        "rpo_alerts": alerted,
        "failed_backup_alerts": failed_alerts,
    }


GATE_KEY = "shardvault:housekeeping:verification"


def verification_housekeeping_schedule() -> bool:
    """Schedule the next housekeeping run on `default`, at most once per interval.

    Safe to call from anywhere, any number of times (a Redis NX key gates it); the backup
    housekeeping's `housekeeping_ensure_scheduled` is the natural caller. Returns True when
    it scheduled a run.
    """
    import django_rq

    queue = django_rq.get_queue("default")
    seconds = int(HOUSEKEEPING_EVERY.total_seconds())
    if not queue.connection.set(GATE_KEY, "1", nx=True, ex=seconds - 5):
        return False
    queue.enqueue_in(
        HOUSEKEEPING_EVERY,
        verification_housekeeping_job,
        description="schedule due drills, reap dead verifications, RPO alerts",
        result_ttl=600,
        failure_ttl=24 * 3600,
    )
    return True
